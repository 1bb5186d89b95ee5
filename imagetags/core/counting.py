"""Counting tags once per post: per cluster (the patent's counts), over the whole library (the
popularity baseline) and as library-wide shares of voters (the prior of neighbour voting).

The site (``services``) and the offline evaluation count with these same functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np


def count_tag_frequencies(
    labels: Sequence[int] | np.ndarray,
    post_ids: Sequence[Hashable],
    post_tags: Mapping[Hashable, Iterable[Hashable]],
    k: int,
) -> tuple[list[int], list[Counter]]:
    """Per cluster: how many distinct posts it holds, and in how many of them each tag occurs.

    A tag counts **once per post** per cluster, however many of the post's images fall into the
    cluster: a 9-image post gets one vote, like a 1-image post. A post whose images fall into two
    clusters votes in both.
    """
    members: list[set[Hashable]] = [set() for _ in range(k)]
    for label, post in zip(labels, post_ids, strict=True):
        members[int(label)].add(post)
    post_counts = [len(posts) for posts in members]
    frequencies: list[Counter] = []
    for posts in members:
        counter: Counter = Counter()
        for post in posts:
            counter.update(set(post_tags.get(post, ())))
        frequencies.append(counter)
    return post_counts, frequencies


def popularity_ranking(
    post_tags: Mapping[Hashable, Iterable[Hashable]],
) -> list[tuple[Hashable, int]]:
    """Tags by how many posts of the whole library carry them (the baseline every method must beat)."""
    counter: Counter = Counter()
    for tags in post_tags.values():
        counter.update(set(tags))
    return sorted(counter.items(), key=lambda item: (-item[1], str(item[0])))


def prior_shares(
    post_tags: Mapping[Hashable, Iterable[Hashable]],
    voters: Mapping[Hashable, Hashable] | None = None,
) -> dict[Hashable, float]:
    """Library-wide share of voters carrying each tag (``voters`` maps post → voter; default:
    each post votes for itself), counted once per voter like the neighbour votes."""
    posts = list(post_tags)
    if not posts:
        return {}
    tags_by_voter: dict[Hashable, set[Hashable]] = {}
    for post in posts:
        voter = voters[post] if voters is not None else post
        tags_by_voter.setdefault(voter, set()).update(post_tags[post])
    counter: Counter = Counter()
    for tags in tags_by_voter.values():
        counter.update(tags)
    return {tag: count / len(tags_by_voter) for tag, count in counter.items()}
