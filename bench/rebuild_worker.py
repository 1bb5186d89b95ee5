"""One rebuild-benchmark step in its own process, so that its peak RSS is its own.

    python -m bench.rebuild_worker populate --name lib100k --n 100000 --dim 512
    python -m bench.rebuild_worker rebuild --name lib100k --k 150 [--memory-mb 1024]
    python -m bench.rebuild_worker suggest --name lib100k

``populate`` writes a synthetic library into ``<workdir>/<name>.sqlite3``: unit vectors drawn
around hidden topics (300 of equal size by default; ``--topics 3000 --zipf 1 --cosine 0.5,0.7``
gives the vector-search benchmark's thousands of topics of Zipf-distributed sizes, each with its
own spread), posts of one to three images sharing a topic, and tags — generic ones ("food" on
~80 % of posts), four specific to each topic, and noise words — so that clusters, neighbours and
tag counts behave like a real library's. The same seed gives the same library. ``rebuild`` runs ``rebuild_clusters`` on it, the real
path (chunked reads, mini-batch k-means or its streamed form, tag frequencies once per post,
memberships, activation) and prints one JSON line: seconds per stage and the peak RSS.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_WORKDIR, setup_django

TOPICS = 300
NOISE_WORDS = 1000


def extractor_config(dim: int) -> dict:
    pooling = "flatten" if dim == 100_352 else "avg"
    return {"CLASS": "vgg16", "OPTIONS": {"weights": None, "pooling": pooling, "seed": 0}}


def topic_weights(topics: int, zipf: float) -> np.ndarray | None:
    """How likely a post is to be of each topic: ``1 / rank**zipf`` (a few big topics, a long
    tail of small ones, as dishes in a food library), or None for equal sizes (``zipf`` 0)."""
    if not zipf:
        return None
    weights = 1.0 / np.arange(1, topics + 1) ** zipf
    return weights / weights.sum()


@dataclass(frozen=True)
class TopicModel:
    """The hidden topics a synthetic library's vectors are drawn around, and how to draw one.

    An image of topic ``t`` is ``centre[t] + noise``, normalised, with ``|noise|²`` set so that
    its cosine to the centre is ``cosine[t]``. With ``rank`` 0 the noise is isotropic in all
    ``dim`` dimensions: a topic's images are then nearly equidistant from each other (intrinsic
    dimension ~85 at 300 images a topic), which no CNN feature set looks like. With ``rank`` r,
    ``1 - isotropic`` of the noise variance lies in an r-dimensional subspace of the topic (its
    own basis) and the rest is isotropic, so images have near and far neighbours inside a topic,
    as photos of one dish do (some close-ups, some plates on a table). ``bench/structure.py``
    measures both against feedme-dev's MobileNetV2 features; rank 40 with 0.3 isotropic matches
    their local intrinsic dimension (~32) and their gap between the 1st and 50th neighbour.
    The same ``seed`` and parameters give the same topics, so queries can be new images of the
    library's topics (``draw``) without storing the topics.
    """

    centres: np.ndarray  # (topics, dim) unit vectors
    cosine: np.ndarray  # (topics,) an image's cosine to its centre
    bases: np.ndarray | None  # (topics, dim, rank) or None when the noise is isotropic
    isotropic: float

    @classmethod
    def make(
        cls,
        topics: int,
        dim: int,
        seed: int,
        cosine: tuple[float, float] = (0.6, 0.6),
        rank: int = 0,
        isotropic: float = 0.3,
    ) -> TopicModel:
        rng = np.random.default_rng(seed)
        centres = _unit(rng.normal(size=(topics, dim)).astype(np.float32))
        if cosine[0] == cosine[1]:
            per_topic = np.full(topics, cosine[0], dtype=np.float64)
        else:
            per_topic = rng.uniform(cosine[0], cosine[1], topics)
        bases = None
        if rank:
            # Its own generator, so the isotropic libraries (rank 0) stay what they were.
            basis_rng = np.random.default_rng([seed, rank])
            # Gaussian columns scaled by 1/sqrt(dim) are nearly orthonormal at dim ≫ rank.
            bases = basis_rng.standard_normal((topics, dim, rank), dtype=np.float32)
            bases /= np.float32(np.sqrt(dim))
        return cls(centres, per_topic, bases, isotropic if rank else 1.0)

    @property
    def rank(self) -> int:
        return 0 if self.bases is None else self.bases.shape[2]

    def draw(self, topic_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unit vectors of new images of these topics (float32, one row each)."""
        dim = self.centres.shape[1]
        variance = (1 / self.cosine[topic_ids] ** 2 - 1).astype(np.float32)[:, None]
        spread = np.sqrt(variance * self.isotropic / dim)
        matrix = self.centres[topic_ids] + spread * rng.standard_normal(
            (len(topic_ids), dim), dtype=np.float32
        )
        if self.bases is not None:
            rank = self.rank
            # The basis columns have about unit length, so a z of variance v·(1-isotropic)/rank
            # per coordinate adds v·(1-isotropic) to |noise|².
            scale = np.sqrt(variance * (1 - self.isotropic) / rank)
            z = scale * rng.standard_normal((len(topic_ids), rank), dtype=np.float32)
            for topic in np.unique(topic_ids):
                rows = topic_ids == topic
                matrix[rows] += z[rows] @ self.bases[topic].T
        return _unit(matrix)


def _unit(matrix: np.ndarray) -> np.ndarray:
    # Plain NumPy, as services.vectors.l2_normalize, so bench.structure needs no Django.
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def populate(
    workdir: Path,
    name: str,
    n: int,
    dim: int,
    dtype: str,
    seed: int,
    topics: int = TOPICS,
    zipf: float = 0.0,
    cosine: tuple[float, float] = (0.6, 0.6),
    rank: int = 0,
    isotropic: float = 0.3,
) -> dict:
    setup_django(workdir, name, {"EXTRACTOR": extractor_config(dim), "AUTO_FEATURES": False})
    from django.db import connection, transaction
    from django.utils import timezone

    from imagetags.models import FeatureStatus, Post, PostTag, StockImage, Tag
    from imagetags.services import vectors
    from imagetags.services.extractors import get_extractor

    started = time.perf_counter()
    key = get_extractor().key
    assert get_extractor().dim == dim, (get_extractor().dim, dim)
    rng = np.random.default_rng(seed)
    n_topics = topics
    # An image's cosine to its topic is about 0.6 (or drawn per topic from the ``cosine``
    # range), as CNN features of one kind of dish are to their mean.
    model = TopicModel.make(n_topics, dim, seed, cosine, rank, isotropic)
    rng.normal(size=(n_topics, dim))  # the draws TopicModel made: the posts' stream as before
    if cosine[0] != cosine[1]:
        rng.uniform(cosine[0], cosine[1], n_topics)
    weights = topic_weights(n_topics, zipf)
    names = ["food", "tasty"] + [f"topic{t}-{j}" for t in range(n_topics) for j in range(4)]
    names += [f"word{w}" for w in range(NOISE_WORDS)]
    Tag.objects.bulk_create([Tag(name=tag, slug=tag) for tag in names], batch_size=2000)
    tag_ids = dict(Tag.objects.values_list("name", "pk"))
    with connection.cursor() as cursor:  # bulk loading only: the benchmark owns this database
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=OFF")
    now = timezone.now()
    made = 0
    chunk = max(1, min(5000, (256 * 2**20) // (dim * 4)))
    while made < n:
        with transaction.atomic():
            sizes = []
            total = 0
            while total < min(chunk, n - made):
                size = int(rng.choice([1, 1, 1, 1, 1, 1, 1, 2, 2, 3]))
                size = min(size, min(chunk, n - made) - total)
                sizes.append(size)
                total += size
            posts = Post.objects.bulk_create([Post(title="") for _ in sizes], batch_size=2000)
            if any(post.pk is None for post in posts):
                raise RuntimeError("bulk_create returned no primary keys")
            if weights is None:
                post_topics = rng.integers(0, n_topics, len(sizes))
            else:
                post_topics = rng.choice(n_topics, len(sizes), p=weights)
            post_tags = []
            for post, topic in zip(posts, post_topics, strict=True):
                chosen = {f"topic{topic}-{j}" for j in rng.choice(4, rng.integers(2, 5), False)}
                if rng.random() < 0.8:
                    chosen.add("food")
                if rng.random() < 0.4:
                    chosen.add("tasty")
                if rng.random() < 0.5:
                    chosen.add(f"word{rng.integers(NOISE_WORDS)}")
                post_tags += [
                    PostTag(post=post, tag_id=tag_ids[tag], source="imported") for tag in chosen
                ]
            PostTag.objects.bulk_create(post_tags, batch_size=2000)
            image_topics = np.repeat(post_topics, sizes)
            image_posts = np.repeat([post.pk for post in posts], sizes)
            matrix = model.draw(image_topics, rng)
            StockImage.objects.bulk_create(
                [
                    StockImage(
                        post_id=int(post_id),
                        image=f"bench/{made + i}.jpg",
                        width=224,  # filled in, so Django does not open the (absent) file
                        height=224,
                        sha256=f"{made + i:064x}",
                        feature_status=FeatureStatus.READY,
                        extractor_key=key,
                        vector=vectors.to_bytes(matrix[i], dtype),
                        features_updated=now,
                    )
                    for i, post_id in enumerate(image_posts)
                ],
                batch_size=1000,
            )
            made += total
            del matrix
    return {
        "populated": n,
        "dim": dim,
        "dtype": dtype,
        "topics": n_topics,
        "zipf": zipf,
        "cosine": list(cosine),
        "rank": rank,
        "isotropic": model.isotropic,
        "seed": seed,
        "seconds": time.perf_counter() - started,
    }


def rebuild(workdir: Path, name: str, dim: int, k: int, memory_mb: float | None) -> dict:
    settings = {"EXTRACTOR": extractor_config(dim), "AUTO_FEATURES": False}
    if memory_mb is not None:
        settings["REBUILD_MEMORY_MB"] = memory_mb
    setup_django(workdir, name, settings, fresh_db=False)
    from django.db.models import Avg

    from imagetags.models import ClusterMembership, ClusterSet
    from imagetags.services.rebuild import rebuild_clusters

    # Earlier runs' sets (and their memberships) go first, untimed: every run starts alike.
    ClusterSet.objects.all().delete()
    stamps: list[tuple[float, str]] = []
    real_report = ClusterSet.report_progress

    def report(self: ClusterSet, fraction: float, message: str) -> None:
        stamps.append((time.perf_counter(), message))
        real_report(self, fraction, message)

    ClusterSet.report_progress = report  # the streamed fit reports each epoch here
    baseline_mb = peak_rss_mb()
    started = time.perf_counter()
    cluster_set = rebuild_clusters(
        k=k, algorithm="minibatch", progress=lambda m: stamps.append((time.perf_counter(), m))
    )
    total = time.perf_counter() - started
    peak_mb = peak_rss_mb()
    clustering = next(t for t, m in stamps if m.startswith("Clustering"))
    converged = next(t for t, m in stamps if m.startswith("Converged"))
    mean_similarity = ClusterMembership.objects.filter(cluster_set=cluster_set).aggregate(
        Avg("similarity")
    )["similarity__avg"]
    return {
        "n": cluster_set.n_images,
        "dim": cluster_set.dim,
        "k": cluster_set.k,
        "streamed": bool(cluster_set.params.get("streamed")),
        "iterations": cluster_set.iterations,
        "seconds": total,
        "read_seconds": clustering - started,
        "fit_seconds": converged - clustering,
        "write_seconds": started + total - converged,
        "peak_rss_mb": peak_mb,
        "baseline_rss_mb": baseline_mb,
        "mean_similarity": mean_similarity,
        "stages": [[round(t - started, 2), message] for t, message in stamps],
    }


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from
    the parent across fork and exec, so a child of a big process would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def suggest_latency(
    workdir: Path,
    name: str,
    dim: int,
    method: str | None = None,
    queries: int = 50,
    profile: Path | None = None,
    warm_up: bool = False,
) -> dict:
    """``suggest(vector)`` on the active clustering: what one suggestion costs besides the
    forward pass, at this library size (the stored vectors of random images are the queries).

    With ``profile``, the queries after the first run under cProfile and the statistics are
    written there (``python -m pstats FILE``): where a warm suggestion's time goes. With
    ``warm_up``, ``suggest.warm_up()`` (what ``IMAGETAGS["WARM_UP"]`` runs at start-up) runs
    first, and "first" is the first suggestion after it."""
    setup_django(workdir, name, {"EXTRACTOR": extractor_config(dim)}, fresh_db=False)
    from imagetags.models import StockImage
    from imagetags.services import vectors
    from imagetags.services.suggest import suggest

    ids = list(StockImage.objects.values_list("pk", flat=True))
    rng = np.random.default_rng(0)
    chosen = [int(pk) for pk in rng.choice(ids, min(queries, len(ids)), replace=False)]
    rows = dict(StockImage.objects.filter(pk__in=chosen).values_list("pk", "vector"))
    query_vectors = [vectors.from_bytes(rows[pk]) for pk in chosen]
    warm_up_seconds = None
    if warm_up:
        from imagetags.services.suggest import warm_up as warm_up_serving

        started = time.perf_counter()
        warm_up_serving()
        warm_up_seconds = time.perf_counter() - started
    started = time.perf_counter()
    options = {"method": method} if method else {}
    suggest(query_vectors[0], **options)  # loads the centres (and any index) into this process
    first = time.perf_counter() - started
    times = []
    profiler = cProfile.Profile() if profile else None
    for vector in query_vectors[1:]:
        if profiler:
            profiler.enable()
        started = time.perf_counter()
        suggest(vector, **options)
        times.append(time.perf_counter() - started)
        if profiler:
            profiler.disable()
    if profiler:
        profiler.dump_stats(str(profile))
    # The same queries again: what they cost once the clusters they touch are in memory (the
    # first round also loads, lazily, each cluster the first time a query probes it).
    warm = []
    for vector in query_vectors[1:]:
        started = time.perf_counter()
        suggest(vector, **options)
        warm.append(time.perf_counter() - started)
    return {
        "n": len(ids),
        "method": method or "default",
        "first_ms": first * 1000,
        "warm_up_seconds": warm_up_seconds,
        "index_mb": _index_mb(),
        "median_ms": float(np.median(times)) * 1000,
        "warm_median_ms": float(np.median(warm)) * 1000,
        "peak_rss_mb": peak_rss_mb(),
    }


def _index_mb() -> float:
    """Memory held by this process's voting index (vectors and ids), if it has one."""
    from imagetags.services.serving import serving_cache

    index = serving_cache().loaded_index
    return index.nbytes / 2**20 if index is not None else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["populate", "rebuild", "suggest"])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--name", required=True)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--k", type=int, default=150)
    parser.add_argument("--memory-mb", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--topics", type=int, default=TOPICS, help="populate: %(default)s")
    parser.add_argument(
        "--zipf", type=float, default=0.0, help="populate: topic sizes ~ 1/rank**zipf (0: equal)"
    )
    parser.add_argument(
        "--cosine",
        default="0.6,0.6",
        help="populate: range of an image's cosine to its topic, drawn per topic (%(default)s)",
    )
    parser.add_argument(
        "--rank",
        type=int,
        default=0,
        help="populate: dimensions of a topic's own subspace (0: isotropic noise, %(default)s)",
    )
    parser.add_argument(
        "--isotropic",
        type=float,
        default=0.3,
        help="populate, with --rank: share of the noise variance outside it (%(default)s)",
    )
    parser.add_argument("--method", default=None, help="suggest step: a suggest() method")
    parser.add_argument("--queries", type=int, default=50, help="suggest step: %(default)s")
    parser.add_argument(
        "--profile", type=Path, default=None, help="suggest step: write cProfile stats here"
    )
    parser.add_argument(
        "--warm-up", action="store_true", help="suggest step: run suggest.warm_up() first"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.step == "populate":
        low, high = (float(part) for part in args.cosine.split(","))
        result = populate(
            args.workdir,
            args.name,
            args.n,
            args.dim,
            args.dtype,
            args.seed,
            topics=args.topics,
            zipf=args.zipf,
            cosine=(low, high),
            rank=args.rank,
            isotropic=args.isotropic,
        )
    elif args.step == "rebuild":
        result = rebuild(args.workdir, args.name, args.dim, args.k, args.memory_mb)
    else:
        result = suggest_latency(
            args.workdir,
            args.name,
            args.dim,
            args.method,
            args.queries,
            args.profile,
            args.warm_up,
        )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
