"""What the clusters of a set "are": labels, neighbours, and a 2-D map of the whole library.

:func:`build_library_map` projects the vectors of a cluster set onto their first two principal
components and lays them out for an SVG picture: one dot per image, coloured by cluster, each
cluster labelled at the middle of its dots. Large libraries are sampled (``max_points``), and
vectors are read in chunks, so drawing the map of a million images reads only the sample.

:func:`cluster_labels` names each cluster by the tag that best tells it apart from the rest of
the library: on a food library "food" is on nearly every post and would label every cluster.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from django.db.models import Sum
from django.utils.safestring import SafeString, mark_safe

from imagetags.conf import imagetags_settings
from imagetags.models import (
    Cluster,
    ClusterMembership,
    ClusterSet,
    FeatureStatus,
    StockImage,
    TagFrequency,
)
from imagetags.services import vectors
from imagetags.services.serving import serving_cache
from imagetags.services.store import IDS_PER_QUERY

MAX_POINTS = 20_000
# Fixed palette (Tableau 20, strong shades first): a cluster keeps its colour across page loads
# and colours differ most between neighbouring indexes. Beyond 20 clusters colours repeat; the
# labels tell those clusters apart.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip
LABEL_MAX_CHARS = 24
_LABEL_FONT_PX = 12
_LABEL_CHAR_PX = 7.0  # average advance of a bold 12 px sans-serif character, for overlap tests
_LABEL_DOT_PX = 12  # the colour dot before a label's text, with its gap
_ID_CHUNK = IDS_PER_QUERY


class LibraryMapUnavailable(Exception):
    """There is nothing to draw; the message says why and what to do."""


def cluster_color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class ClusterLabel:
    """A cluster's name on the map and its most frequent tags ``[(name, posts), ...]``."""

    text: str
    top_tags: tuple[tuple[str, int], ...]


def cluster_labels(cluster_set: ClusterSet, top: int = 3) -> dict[int, ClusterLabel]:
    """A label for every cluster of the set, by Cluster id.

    The label is the tag with the highest *share of the cluster's posts × log(1 / share of all
    the set's posts)* — tf-idf over clusters — among tags on at least two posts and a tenth of
    the cluster, so one odd post cannot name a cluster. A cluster without such a tag is named
    by its most frequent tag; one without tags by ``"cluster <index>"``.
    """
    clusters = {
        pk: (index, posts)
        for pk, index, posts in Cluster.objects.filter(cluster_set=cluster_set).values_list(
            "pk", "index", "post_count"
        )
    }
    frequencies = TagFrequency.objects.filter(cluster__cluster_set=cluster_set)
    # Post-cluster pairs, summed over the set on both sides, so the shares are comparable.
    pairs = sum(posts for _index, posts in clusters.values()) or 1
    library_share = {
        name: total / pairs
        for name, total in frequencies.order_by()
        .values("tag__name")
        .annotate(total=Sum("post_count"))
        .values_list("tag__name", "total")
    }
    per_cluster: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for cluster_id, name, count in frequencies.order_by(
        "cluster_id", "-post_count", "tag__name"
    ).values_list("cluster_id", "tag__name", "post_count"):
        per_cluster[cluster_id].append((name, count))

    labels = {}
    for pk, (index, posts) in clusters.items():
        ranked = per_cluster.get(pk, [])
        text = f"cluster {index}"
        if ranked:
            text = ranked[0][0]
            floor = max(2, 0.1 * posts)
            candidates = [(name, count) for name, count in ranked if count >= floor]
            if candidates:
                text = max(
                    candidates,
                    key=lambda item: (
                        item[1] / max(posts, 1) * math.log(1 / min(library_share[item[0]], 1.0)),
                        item[1],
                    ),
                )[0]
        labels[pk] = ClusterLabel(text=text, top_tags=tuple(ranked[:top]))
    return labels


def nearest_clusters(cluster: Cluster, n: int = 5) -> list[tuple[Cluster, float]]:
    """The ``n`` other clusters of the same set whose centres are most similar (cosine)."""
    centers, cluster_ids, _indexes = serving_cache().centers(cluster.cluster_set)
    position = cluster_ids.index(cluster.pk)
    similarities = centers @ centers[position]
    order = [int(i) for i in np.argsort(-similarities) if int(i) != position][:n]
    by_id = Cluster.objects.in_bulk([cluster_ids[i] for i in order])
    return [(by_id[cluster_ids[i]], float(similarities[i])) for i in order]


@dataclass(eq=False)
class MapCluster:
    """One cluster on the map: its dots and where its label goes, in SVG user units."""

    cluster_id: int
    index: int
    size: int
    post_count: int
    label: ClusterLabel
    color: str
    points: np.ndarray  # (m, 2) float, the sampled members' positions
    label_x: float = 0.0
    label_y: float = 0.0
    radius: float = 3.0

    @property
    def circles(self) -> SafeString:
        """The ``<circle>`` elements of the cluster's dots.

        Built as one string because a template loop over 20,000 dots takes seconds; only
        numbers go into it, so marking it safe cannot let text through unescaped.
        """
        r = f"{self.radius:g}"
        return mark_safe(  # noqa: S308 - numbers only, see above
            "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}"/>' for x, y in self.points.tolist())
        )

    @property
    def label_text(self) -> str:
        text = self.label.text
        return text if len(text) <= LABEL_MAX_CHARS else text[: LABEL_MAX_CHARS - 1] + "…"

    @property
    def label_half_width(self) -> float:
        """Half the estimated width of the label: a colour dot, a gap, then the text."""
        return (_LABEL_DOT_PX + len(self.label_text) * _LABEL_CHAR_PX) / 2 + 3

    @property
    def dot_x(self) -> float:
        """Centre of the colour dot that starts the label (ties it to the cluster's dots)."""
        return self.label_x - self.label_half_width + _LABEL_DOT_PX / 2

    @property
    def dot_y(self) -> float:
        return self.label_y - 4  # level with the middle of the text, whose y is its baseline

    @property
    def text_x(self) -> float:
        """Start of the label's text (anchored at its start, so it never runs into the dot)."""
        return self.dot_x + _LABEL_DOT_PX / 2 + 3


@dataclass(eq=False)
class LibraryMap:
    """A laid-out map of one cluster set, ready for a template to draw."""

    cluster_set: ClusterSet
    width: int
    height: int
    clusters: list[MapCluster]  # biggest first: drawn first, so small clusters stay on top
    members: int  # images in the set
    drawn: int  # dots on the map (a sample when members > max_points)
    skipped: int  # sampled members whose vector is no longer current (recomputed since)
    explained_variance: tuple[float, float] = (0.0, 0.0)
    notes: list[str] = field(default_factory=list)

    @property
    def explained_percent(self) -> tuple[int, int]:
        return tuple(round(100 * share) for share in self.explained_variance)

    @property
    def sampled(self) -> bool:
        return self.drawn + self.skipped < self.members


def _sample_memberships(
    cluster_set: ClusterSet, max_points: int, seed: int, chunk_size: int
) -> tuple[int, np.ndarray, np.ndarray]:
    """(members, image ids, cluster ids) of a uniform sample of at most ``max_points`` members.

    Streams (id, id) pairs only; no vectors are read here.
    """
    memberships = ClusterMembership.objects.filter(cluster_set=cluster_set).order_by("image_id")
    members = memberships.count()
    keep = np.ones(members, dtype=bool)
    if members > max_points:
        keep[:] = False
        keep[np.random.default_rng(seed).choice(members, size=max_points, replace=False)] = True
    image_ids: list[int] = []
    cluster_ids: list[int] = []
    rows = memberships.values_list("image_id", "cluster_id").iterator(chunk_size=chunk_size)
    for position, (image_id, cluster_id) in enumerate(rows):
        if position >= members:  # rows added since count(): not part of the sample
            break
        if keep[position]:
            image_ids.append(image_id)
            cluster_ids.append(cluster_id)
    return members, np.array(image_ids, dtype=np.int64), np.array(cluster_ids, dtype=np.int64)


def _read_vectors(
    image_ids: np.ndarray, extractor_key: str, dim: int
) -> Iterator[tuple[int, np.ndarray]]:
    ids = image_ids.tolist()
    for start in range(0, len(ids), _ID_CHUNK):
        # Only vectors still made by the set's extractor: a recomputed image is left out.
        rows = StockImage.objects.filter(
            pk__in=ids[start : start + _ID_CHUNK],
            feature_status=FeatureStatus.READY,
            extractor_key=extractor_key,
        ).values_list("pk", "vector")
        for pk, data in rows:
            vector = vectors.from_bytes(data)
            if vector.shape[0] == dim:
                yield pk, vector


@dataclass(frozen=True)
class Projection:
    """Rows on their first two principal components, and how to project further vectors."""

    coords: np.ndarray  # (n, 2)
    mean: np.ndarray  # (d,)
    components: np.ndarray  # (2, d)
    explained_variance: tuple[float, float]  # share of the variance on each axis

    def project(self, matrix: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(matrix) - self.mean) @ self.components.T


def project_2d(matrix: np.ndarray, seed: int = 0) -> Projection:
    """Principal-component projection of the rows to 2-D. Fewer than three rows, or rows that
    do not vary, all land on the origin."""
    n, dim = matrix.shape
    mean = matrix.mean(axis=0) if n else np.zeros(dim)
    if n < 3 or dim < 2 or float(matrix.var(axis=0).sum()) == 0.0:
        return Projection(np.zeros((n, 2)), mean, np.zeros((2, dim)), (0.0, 0.0))
    from sklearn.decomposition import PCA

    # Randomized SVD: O(n·d) per pass instead of the O(n·d²) of a full decomposition, which
    # matters for 20,000 × 1,280 vectors in a web request; three power iterations instead of
    # sklearn's seven halve its time (1.4 s here) and are plenty for a picture's two axes.
    pca = PCA(n_components=2, svd_solver="randomized", iterated_power=3, random_state=seed)
    coords = pca.fit_transform(matrix).astype(np.float64)
    ratio = pca.explained_variance_ratio_
    return Projection(
        coords, pca.mean_, pca.components_.astype(np.float64), (float(ratio[0]), float(ratio[1]))
    )


def _fit_to_canvas(
    coords: np.ndarray, width: int, height: int, margin: int
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Scale both axes alike (distances stay honest) into the canvas; y grows upwards."""
    low = coords.min(axis=0) if len(coords) else np.zeros(2)
    high = coords.max(axis=0) if len(coords) else np.ones(2)
    span = np.maximum(high - low, 1e-9)
    scale = min((width - 2 * margin) / span[0], (height - 2 * margin) / span[1])
    middle = (low + high) / 2

    def place(points: np.ndarray) -> np.ndarray:
        out = np.empty_like(points, dtype=np.float64)
        out[:, 0] = width / 2 + (points[:, 0] - middle[0]) * scale
        out[:, 1] = height / 2 - (points[:, 1] - middle[1]) * scale
        return out

    return place(coords), place


def _place_labels(clusters: list[MapCluster], width: int, height: int) -> None:
    """Put each label at its cluster's middle, nudged up or down until it overlaps no label
    placed before it (bigger clusters are placed first and keep their spot)."""
    placed: list[tuple[float, float, float, float]] = []
    line = _LABEL_FONT_PX + 4
    for cluster in clusters:
        half_width = cluster.label_half_width
        x = min(max(cluster.label_x, half_width + 2), width - half_width - 2)
        y0 = cluster.label_y
        for step in range(0, 40):
            offset = (step + 1) // 2 * line * (1 if step % 2 else -1)
            y = min(max(y0 + offset, line), height - 4)
            box = (x - half_width, y - _LABEL_FONT_PX, x + half_width, y + 3)
            if not any(
                box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]
                for other in placed
            ):
                break
        placed.append(box)
        cluster.label_x, cluster.label_y = x, y


def build_library_map(
    cluster_set: ClusterSet | None = None,
    *,
    max_points: int = MAX_POINTS,
    width: int = 960,
    height: int = 600,
    margin: int = 28,
    seed: int = 0,
    chunk_size: int | None = None,
) -> LibraryMap:
    """Lay out a 2-D PCA map of a cluster set (default: the active one).

    At most ``max_points`` members are drawn, a uniform sample chosen with ``seed`` (so the
    picture is the same on every load); vectors are read in chunks. The PCA is fitted on the
    drawn vectors, which for a uniform sample of thousands gives the same axes as the whole.
    Raises :class:`LibraryMapUnavailable` when there is no active set or it has no members.
    """
    if cluster_set is None:
        cluster_set = ClusterSet.objects.active()
        if cluster_set is None:
            raise LibraryMapUnavailable(
                "There is no active cluster set yet: rebuild the clusters first."
            )
    chunk_size = chunk_size or imagetags_settings.CHUNK_SIZE
    members, image_ids, member_clusters = _sample_memberships(
        cluster_set, max_points, seed, chunk_size
    )
    if members == 0:
        raise LibraryMapUnavailable(f"{cluster_set} has no member images to draw.")
    cluster_of = dict(zip(image_ids.tolist(), member_clusters.tolist(), strict=True))
    found_ids: list[int] = []
    matrix = np.empty((len(image_ids), cluster_set.dim), dtype=np.float32)
    for row, (pk, vector) in enumerate(
        _read_vectors(image_ids, cluster_set.extractor_key, cluster_set.dim)
    ):
        matrix[row] = vector
        found_ids.append(pk)
    matrix = matrix[: len(found_ids)]
    notes = []
    skipped = len(image_ids) - len(found_ids)
    if skipped:
        notes.append(
            f"{skipped} images were left out: their vectors were recomputed with another "
            "extractor since this set was built."
        )

    projection = project_2d(matrix, seed=seed)
    canvas, place = _fit_to_canvas(projection.coords, width, height, margin)
    # Shuffle so that within a cluster no part of the library is systematically drawn on top.
    order = np.random.default_rng(seed).permutation(len(found_ids))
    by_cluster: dict[int, list[int]] = defaultdict(list)
    for row in order.tolist():
        by_cluster[cluster_of[found_ids[row]]].append(row)

    drawn = len(found_ids)
    # Smaller dots as the map fills up, so dense regions do not turn into solid blots.
    radius = 4.0 if drawn <= 300 else 3.0 if drawn <= 3_000 else 2.0 if drawn <= 10_000 else 1.5
    labels = cluster_labels(cluster_set)
    centers, center_ids, _indexes = serving_cache().centers(cluster_set)
    clusters = []
    for cluster in Cluster.objects.filter(cluster_set=cluster_set).order_by("-size", "index"):
        rows = by_cluster.get(cluster.pk, [])
        points = canvas[rows] if rows else np.empty((0, 2))
        if rows:
            # The middle of the cluster's dots: by linearity, the projection of its mean vector.
            label_x, label_y = points.mean(axis=0)
        else:
            # No dot drawn (an empty cluster, or none of it sampled): label the projected centre.
            center = centers[center_ids.index(cluster.pk)]
            label_x, label_y = place(projection.project(center))[0]
        clusters.append(
            MapCluster(
                cluster_id=cluster.pk,
                index=cluster.index,
                size=cluster.size,
                post_count=cluster.post_count,
                label=labels[cluster.pk],
                color=cluster_color(cluster.index),
                points=points,
                label_x=float(label_x),
                label_y=float(label_y),
                radius=radius,
            )
        )
    _place_labels(clusters, width, height)
    return LibraryMap(
        cluster_set=cluster_set,
        width=width,
        height=height,
        clusters=clusters,
        members=members,
        drawn=drawn,
        skipped=skipped,
        explained_variance=projection.explained_variance,
        notes=notes,
    )
