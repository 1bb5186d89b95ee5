"""manage.py evaluate_suggestions: measure suggestion quality on a throwaway in-memory library."""

from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from imagetags.services.evaluation import EvaluationError, run_evaluation
from imagetags.services.library import ManifestError
from imagetags.services.ranking import parse_k


def _k_list(value: str) -> list[int | str]:
    return [parse_k(part.strip()) for part in value.split(",") if part.strip()]


class Command(BaseCommand):
    help = (
        "Score tag suggestions on held-out images: build a throwaway library in memory from a "
        "manifest (the site's database and media are not touched), then compare the popularity "
        "baseline with the patent's nearest-cluster method by P@1, P@3, P@k, R@k and distinct "
        "correct tags. Queries come from --queries or from --holdout (split by post)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--library", required=True, help="Manifest (.jsonl) of the library images."
        )
        parser.add_argument("--queries", help="Manifest (.jsonl) of separate query images.")
        parser.add_argument(
            "--holdout",
            type=float,
            help="Hold out this share of the library's posts as queries, e.g. 0.3.",
        )
        parser.add_argument(
            "--k", type=int, default=5, help="Tags suggested per query (default: %(default)s)."
        )
        parser.add_argument(
            "--seed",
            type=int,
            default=0,
            help="Seed of the split and of the clustering (default: %(default)s).",
        )
        parser.add_argument(
            "--extractor",
            help="Extractor spec, e.g. tflite:/path/model.tflite or vgg16:imagenet "
            "(default: IMAGETAGS['EXTRACTOR']).",
        )
        parser.add_argument(
            "--clusters",
            type=parse_k,
            default=None,
            help="K, or 'auto' (about one cluster per 16 library images; "
            "default: IMAGETAGS['CLUSTERING']['K']).",
        )
        parser.add_argument(
            "--algorithm",
            choices=["kmeans", "minibatch"],
            default=None,
            help="Clustering algorithm (default: IMAGETAGS['CLUSTERING']['ALGORITHM']).",
        )
        parser.add_argument(
            "--k-sweep",
            type=_k_list,
            default=[],
            metavar="K1,K2,...",
            help="Also score the cluster method for each of these K, e.g. 10,20,30,40,60.",
        )
        parser.add_argument(
            "--cache",
            metavar="DIR",
            help="Keep vectors by extractor and image SHA-256 in DIR, so repeated runs skip "
            "extraction.",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print the report as one JSON object."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        from tqdm import tqdm

        from imagetags.services.extractors import extractor_config_from_spec, get_extractor

        try:
            config = (
                extractor_config_from_spec(options["extractor"]) if options["extractor"] else None
            )
            extractor = get_extractor(config)
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc

        bar: tqdm | None = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(
                    total=total, desc="Embedding", unit="image", disable=not options["verbosity"]
                )
            bar.update(done - bar.n)

        try:
            report = run_evaluation(
                options["library"],
                extractor=extractor,
                queries_manifest=options["queries"],
                holdout=options["holdout"],
                k=options["k"],
                clusters=options["clusters"],
                algorithm=options["algorithm"],
                seed=options["seed"],
                k_sweep=options["k_sweep"],
                cache_dir=options["cache"],
                progress=progress,
            )
        except (EvaluationError, ManifestError, ImproperlyConfigured) as exc:
            # ImproperlyConfigured: an extractor that only fails when its model is loaded.
            raise CommandError(str(exc)) from exc
        finally:
            if bar is not None:
                bar.close()
        if options["json"]:
            self.stdout.write(json.dumps(report))
        else:
            self._table(report)

    def _table(self, report: dict[str, Any]) -> None:
        k = report["k"]
        split = report["split"]
        source = (
            f"hold-out {split['holdout']:g} of the posts, seed {split['seed']}"
            if "holdout" in split
            else f"queries from {split['queries']}"
        )
        self.stdout.write(
            f"Library: {report['library']} images in {report['library_posts']} posts; "
            f"queries: {report['queries']} scored images in {report['query_posts']} posts "
            f"({report['unscored_queries']} untagged, not scored); {source}."
        )
        self.stdout.write(
            f"Extractor: {report['extractor']}. K={report['clusters']} ({report['algorithm']}, "
            f"seed {report['seed']}). {report['seconds']['total']:.1f} s "
            f"({report['seconds']['extract']:.1f} s extraction, "
            f"{report['vectors_from_cache']} vectors from the cache)."
        )
        if report["duplicates_dropped"] or report["rejected"]:
            self.stdout.write(
                f"Dropped {report['duplicates_dropped']} duplicate images and "
                f"{len(report['rejected'])} rejected lines."
            )
        header = (
            f"{'method':<12} {'P@1':>6} {'P@3':>6} {f'P@{k}':>6} {f'R@{k}':>6} "
            f"{'distinct':>8} {'ms/query':>9}"
        )
        self.stdout.write("")
        self.stdout.write(header)
        for name, scores in report["methods"].items():
            label = f"{name} *" if name == report["default"] else name
            self.stdout.write(
                f"{label:<12} {scores['p_at_1']:>6.3f} {scores['p_at_3']:>6.3f} "
                f"{scores['p_at_k']:>6.3f} {scores['r_at_k']:>6.3f} "
                f"{scores['distinct_correct']:>8d} {scores['query_ms']:>9.3f}"
            )
        self.stdout.write("* the method suggest() uses")
        sweep = report.get("k_sweep")
        if sweep:
            self.stdout.write("")
            self.stdout.write("cluster method by K:")
            self.stdout.write(
                f"{'K':>5} {'used':>5} {'P@1':>6} {'P@3':>6} {f'P@{k}':>6} {f'R@{k}':>6} "
                f"{'distinct':>8}"
            )
            for row in sweep:
                self.stdout.write(
                    f"{row['clusters_requested']:>5d} {row['clusters']:>5d} "
                    f"{row['p_at_1']:>6.3f} {row['p_at_3']:>6.3f} {row['p_at_k']:>6.3f} "
                    f"{row['r_at_k']:>6.3f} {row['distinct_correct']:>8d}"
                )
