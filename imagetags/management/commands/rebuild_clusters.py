"""manage.py rebuild_clusters: cluster the library and recount tag frequencies."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from imagetags.conf import imagetags_settings
from imagetags.core.kmeans import parse_k
from imagetags.models import Cluster, ClusterSet
from imagetags.services.errors import ClusteringError
from imagetags.services.rebuild import rebuild_clusters


class Command(BaseCommand):
    help = (
        "Cluster the feature vectors of the current extractor with k-means or mini-batch "
        "k-means, count each cluster's tags once per post, and make the new cluster set active "
        "(the old one is retired, not deleted). Defaults come from IMAGETAGS['CLUSTERING']."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        defaults = imagetags_settings.CLUSTERING
        parser.add_argument(
            "--algorithm",
            choices=["kmeans", "minibatch"],
            default=defaults["ALGORITHM"],
            help="Clustering algorithm (default: %(default)s).",
        )
        parser.add_argument(
            "--k",
            type=parse_k,
            default=defaults["K"],
            help="Number of clusters, or 'auto' (about one per 16 images; default: %(default)s).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=defaults["BATCH_SIZE"],
            help="Mini-batch size for minibatch (default: %(default)s).",
        )
        parser.add_argument(
            "--max-iter",
            type=int,
            default=defaults["MAX_ITER"],
            help="Most iterations (default: %(default)s).",
        )
        parser.add_argument(
            "--tol",
            type=float,
            default=defaults["TOL"],
            help="Convergence tolerance (default: %(default)s).",
        )
        parser.add_argument(
            "--seed", type=int, default=defaults["SEED"], help="Random seed (default: %(default)s)."
        )
        parser.add_argument(
            "--warm-start",
            action="store_true",
            help="Start from the active set's centres (the patent's incremental update).",
        )
        parser.add_argument(
            "--top",
            type=int,
            default=5,
            help="Clusters listed in the summary (default: %(default)s).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity = options["verbosity"]

        def progress(message: str) -> None:
            if verbosity:
                self.stdout.write(message)

        started = time.perf_counter()
        try:
            cluster_set = rebuild_clusters(
                algorithm=options["algorithm"],
                k=options["k"],
                batch_size=options["batch_size"],
                max_iter=options["max_iter"],
                tol=options["tol"],
                seed=options["seed"],
                warm_start=options["warm_start"],
                progress=progress,
            )
        except ClusteringError as exc:
            raise CommandError(str(exc)) from exc
        self._summary(cluster_set, time.perf_counter() - started, options["top"])

    def _summary(self, cluster_set: ClusterSet, seconds: float, top: int) -> None:
        self.stdout.write(
            self.style.SUCCESS(
                f"Cluster set {cluster_set.pk} is active: K={cluster_set.k}, "
                f"{cluster_set.n_images} images in {cluster_set.n_posts} posts, "
                f"{cluster_set.algorithm}, {cluster_set.iterations} iterations, "
                f"inertia {cluster_set.inertia:.4g}, {seconds:.1f} s."
            )
        )
        self.stdout.write(f"Extractor: {cluster_set.extractor_key}")
        if top <= 0:
            return
        self.stdout.write("Largest clusters (images, posts: top tags with post counts):")
        clusters = Cluster.objects.filter(cluster_set=cluster_set).order_by("-size", "index")[:top]
        for cluster in clusters:
            tags = cluster.tag_frequencies.select_related("tag").order_by(
                "-post_count", "tag__name"
            )[:6]
            listed = ", ".join(f"{f.tag.name} ({f.post_count})" for f in tags) or "(no tags)"
            self.stdout.write(
                f"  #{cluster.index:<3} {cluster.size:>6} images, {cluster.post_count:>6} posts: {listed}"
            )
