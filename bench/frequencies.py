"""What keeping TagFrequency true costs on the hot path (issue 11).

    python -m bench.frequencies [--n 5000] [--k 150] [--tags 20] [--rounds 30]

On a synthetic library (``bench.rebuild_worker.populate``: 512-d vectors around 300 topics,
posts of one to three images, ~6 tags each) clustered with K = 150, prints one JSON object:

- ``recount_queries`` / ``recount_ms``: ``frequencies.recount_posts`` of one clustered post that
  was just given ``--tags`` new tags (the median over ``--rounds``, each in a rolled-back
  transaction);
- ``add_tags_ms`` with and without the recount (the recount replaced by a no-op: the code before
  issue 11), interleaved round by round, and their ratio;
- ``new_post_recount_queries``: the same for a post whose images are not clustered yet (an upload
  from the form: features come later, from the worker);
- ``delete_tag_ms`` with and without the PostTag signal handlers (with them, Django can no longer
  delete a tag's PostTag rows in one statement and loads them first), for a tag on ~40 % of posts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import DEFAULT_WORKDIR, median
from bench.rebuild_worker import populate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frequencies")
    parser.add_argument("--n", type=int, default=5000, help="images (default %(default)s)")
    parser.add_argument("--k", type=int, default=150, help="clusters (default %(default)s)")
    parser.add_argument("--tags", type=int, default=20, help="new tags (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds (default %(default)s)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    name = f"frequencies{args.n}"
    populate(args.workdir, name, args.n, 512, "float32", seed=0)
    # populate configured Django already; rebuild on the same database.
    print(json.dumps(measure(args.k, args.tags, args.rounds)))
    return 0


def measure(k: int, n_tags: int, rounds: int) -> dict[str, float]:
    from django.db import connection, transaction
    from django.db.models.signals import post_delete
    from django.test.utils import CaptureQueriesContext

    from imagetags import signal_handlers
    from imagetags.models import ClusterMembership, Post, PostTag, Tag
    from imagetags.services import frequencies, tagging
    from imagetags.services.rebuild import rebuild_clusters

    cluster_set = rebuild_clusters(k=k, algorithm="kmeans", seed=0)
    clustered = Post.objects.get(
        pk=ClusterMembership.objects.filter(cluster_set=cluster_set)
        .order_by("image_id")
        .values_list("image__post_id", flat=True)
        .first()
    )
    names = [f"bench-new-{i}" for i in range(n_tags)]

    def rolled_back(work):  # each round leaves the library as it was
        with transaction.atomic():
            started = time.perf_counter()
            result = work()
            seconds = time.perf_counter() - started
            transaction.set_rollback(True)
        return seconds, result

    def recount_round() -> tuple[float, int]:
        def work() -> tuple[float, int]:
            tagging.add_tags(clustered, names)
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                frequencies.recount_posts([clustered.pk])
                return time.perf_counter() - started, len(queries.captured_queries)

        return rolled_back(work)[1]

    recounts = [recount_round() for _ in range(rounds)]

    real_recount = frequencies.recount_posts
    with_recount, without_recount = [], []
    for _ in range(rounds):
        with_recount.append(rolled_back(lambda: tagging.add_tags(clustered, names))[0])
        frequencies.recount_posts = lambda post_ids, tag_ids=(): 0
        try:
            without_recount.append(rolled_back(lambda: tagging.add_tags(clustered, names))[0])
        finally:
            frequencies.recount_posts = real_recount

    with transaction.atomic():
        fresh = Post.objects.create(title="upload")
        with CaptureQueriesContext(connection) as new_post:
            frequencies.recount_posts([fresh.pk])
        transaction.set_rollback(True)

    tasty = Tag.objects.get(name="tasty")
    posts_with_tasty = PostTag.objects.filter(tag=tasty).count()
    delete_with, delete_without = [], []
    for _ in range(max(3, rounds // 5)):
        delete_with.append(rolled_back(lambda: Tag.objects.filter(pk=tasty.pk).delete())[0])
        post_delete.disconnect(sender=PostTag, dispatch_uid="imagetags_post_tag_deleted")
        try:
            delete_without.append(rolled_back(lambda: Tag.objects.filter(pk=tasty.pk).delete())[0])
        finally:
            post_delete.connect(
                signal_handlers.post_tag_deleted,
                sender=PostTag,
                dispatch_uid="imagetags_post_tag_deleted",
            )
    return {
        "images": cluster_set.n_images,
        "k": cluster_set.k,
        "new_tags": n_tags,
        "clusters_of_post": ClusterMembership.objects.filter(image__post=clustered).count(),
        "recount_queries": max(queries for _seconds, queries in recounts),
        "recount_ms": round(1000 * median([seconds for seconds, _q in recounts]), 3),
        "add_tags_ms": round(1000 * median(with_recount), 3),
        "add_tags_without_recount_ms": round(1000 * median(without_recount), 3),
        "add_tags_ratio": round(median(with_recount) / median(without_recount), 3),
        "new_post_recount_queries": len(new_post.captured_queries),
        "delete_tag_posts": posts_with_tasty,
        "delete_tag_ms": round(1000 * median(delete_with), 1),
        "delete_tag_without_handlers_ms": round(1000 * median(delete_without), 1),
    }


if __name__ == "__main__":
    raise SystemExit(main())
