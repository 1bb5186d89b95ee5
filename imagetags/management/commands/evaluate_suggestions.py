"""manage.py evaluate_suggestions: measure suggestion quality on a throwaway in-memory library,
or report how often people accepted the suggestions they were shown."""

from __future__ import annotations

import argparse
import json
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from imagetags.conf import imagetags_settings
from imagetags.core.kmeans import parse_k
from imagetags.core.voting import VoteParams
from imagetags.search import search_aliases
from imagetags.services.evaluation import (
    METHOD_HELP,
    RECALL_DEPTH,
    EvaluationError,
    run_evaluation,
    search_builders,
)
from imagetags.services.feedback import feedback_report
from imagetags.services.library import ManifestError

VOTING_KEYS = ("NEIGHBOURS", "TEMPERATURE", "VOTE_BY", "PRIOR_WEIGHT", "PROBES")


def _k_list(value: str) -> list[int | str]:
    return [parse_k(part.strip()) for part in value.split(",") if part.strip()]


def _names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _voting(value: str) -> dict[str, Any]:
    """``NEIGHBOURS=10,TEMPERATURE=none,...`` as a partial VOTING dict (argparse ``type=``)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        key, sep, raw = part.partition("=")
        key = key.strip().upper()
        if not sep or key not in VOTING_KEYS:
            raise argparse.ArgumentTypeError(
                f"{part!r}: write KEY=VALUE with KEY one of {', '.join(VOTING_KEYS)}."
            )
        raw = raw.strip()
        if raw.lower() in ("none", "null"):
            out[key] = None
        elif key == "VOTE_BY":
            out[key] = raw
        else:
            try:
                out[key] = float(raw) if key in ("TEMPERATURE", "PRIOR_WEIGHT") else int(raw)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r}: {raw!r} is not a number.") from None
    return out


class Command(BaseCommand):
    help = (
        "Score tag suggestions on held-out images: build a throwaway library in memory from a "
        "manifest (the site's database and media are not touched), then compare the popularity "
        "baseline, the patent's nearest-cluster method, k-NN voting and the voting methods by "
        "P@1, P@3, P@k, R@k, distinct correct tags and query time. Queries come from --queries, "
        "--holdout or --folds (split by post). With --from-feedback, report instead the "
        "acceptance of the suggestions people were shown on this site."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--library", help="Manifest (.jsonl) of the library images.")
        parser.add_argument("--queries", help="Manifest (.jsonl) of separate query images.")
        parser.add_argument(
            "--holdout",
            type=float,
            help="Hold out this share of the library's posts as queries, e.g. 0.3.",
        )
        parser.add_argument(
            "--folds",
            type=int,
            help="F-fold cross-validation by post: every post is a query once; scores are "
            "means over the folds, with their standard deviations. E.g. 5.",
        )
        parser.add_argument(
            "--tune",
            action="store_true",
            help="With --folds: choose the methods' parameters by 5-fold cross-validation inside "
            "each fold's library and score the choices on the fold's queries (nested CV).",
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
            help="Also score the methods that depend on K for each of these K, e.g. 10,20,30,40.",
        )
        parser.add_argument(
            "--voting",
            type=_voting,
            default={},
            metavar="KEY=VALUE,...",
            help="Score the vote and ivf methods with these VOTING values instead of "
            "IMAGETAGS['VOTING'], e.g. PRIOR_WEIGHT=1 (TagVote's full prior), VOTE_BY=owner, "
            "TEMPERATURE=none (equal votes), NEIGHBOURS=10, PROBES=2.",
        )
        parser.add_argument(
            "--cache",
            metavar="DIR",
            help="Keep vectors by extractor and image SHA-256 in DIR, so repeated runs skip "
            "extraction.",
        )
        parser.add_argument(
            "--full-decode",
            action="store_true",
            help="Decode JPEGs in full, not at the model's scale as the site does: measures "
            "what that decoding changes (docs/quality.md).",
        )
        parser.add_argument(
            "--search",
            type=_names,
            action="append",
            default=[],
            metavar="BACKEND[,BACKEND]",
            help="Also measure these vector-search backends against exact k-NN (one of "
            f"{', '.join(search_aliases())}; repeatable): ivf's voting over the neighbours each "
            f"finds in the whole library, scored like the methods, with the recall@{RECALL_DEPTH} "
            "of those neighbours and the share of queries whose top k tags are exact's.",
        )
        parser.add_argument(
            "--search-database",
            default=None,
            metavar="ALIAS",
            help="The DATABASES alias --search pgvector loads the library into (a PostgreSQL "
            "database with the pgvector extension; a throwaway table, dropped afterwards; "
            "default: IMAGETAGS['SEARCH']['OPTIONS']['DATABASE'], else 'default').",
        )
        parser.add_argument(
            "--from-feedback",
            action="store_true",
            help="Report the acceptance of shown suggestions (SuggestionFeedback) overall, per "
            "channel, per method and per tag, from this site's database; no manifest needed.",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print the report as one JSON object."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["from_feedback"]:
            self._feedback(options)
            return
        if not options["library"]:
            raise CommandError(
                "Give --library MANIFEST.jsonl (with --queries, --holdout or --folds), or "
                "--from-feedback to report acceptance of real suggestions."
            )
        from tqdm import tqdm

        from imagetags.services.extractors import extractor_config_from_spec, get_extractor

        try:
            config = (
                extractor_config_from_spec(options["extractor"]) if options["extractor"] else None
            )
            extractor = get_extractor(config)
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc

        from imagetags.conf import imagetags_settings

        try:
            voting = VoteParams.from_setting({**imagetags_settings.VOTING, **options["voting"]})
        except ValueError as exc:
            raise CommandError(f"--voting: {exc}") from exc
        backends = [alias for group in options["search"] for alias in group]
        try:
            # Before any extraction: a backend that cannot run here is refused at once.
            search = (
                search_builders(backends, database=search_database(options["search_database"]))
                if backends
                else None
            )
        except EvaluationError as exc:
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
                folds=options["folds"],
                k=options["k"],
                clusters=options["clusters"],
                algorithm=options["algorithm"],
                seed=options["seed"],
                k_sweep=options["k_sweep"],
                tune=options["tune"],
                voting=voting,
                cache_dir=options["cache"],
                progress=progress,
                full_decode=options["full_decode"],
                search=search,
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

    # --- text output -----------------------------------------------------------------------

    def _table(self, report: dict[str, Any]) -> None:
        k = report["k"]
        split = report["split"]
        folds = split.get("folds")
        if folds:
            source = f"{folds}-fold by post, seed {split['seed']}; library = mean per fold"
        elif "holdout" in split:
            source = f"hold-out {split['holdout']:g} of the posts, seed {split['seed']}"
        else:
            source = f"queries from {split['queries']}"
        self.stdout.write(
            f"Library: {report['library']} images in {report['library_posts']} posts; "
            f"queries: {report['queries']} scored images in {report['query_posts']} posts "
            f"({report['unscored_queries']} untagged, not scored); {source}."
        )
        voting = report["voting"]
        self.stdout.write(
            f"Extractor: {report['extractor']}. K={report['clusters']} ({report['algorithm']}, "
            f"seed {report['seed']}). {report['seconds']['total']:.1f} s "
            f"({report['seconds']['extract']:.1f} s extraction, "
            f"{report['vectors_from_cache']} vectors from the cache)."
        )
        self.stdout.write(
            f"Voting (vote, ivf): {voting['neighbours']} neighbours, temperature "
            f"{voting['temperature']}, one vote per {voting['vote_by']}, prior weight "
            f"{voting['prior_weight']:g}, ivf probes {voting['probes']}; knn: "
            f"{report['knn']['neighbours']} neighbours, equal votes."
        )
        if report["duplicates_dropped"] or report["rejected"]:
            self.stdout.write(
                f"Dropped {report['duplicates_dropped']} duplicate images and "
                f"{len(report['rejected'])} rejected lines."
            )
        self.stdout.write("")
        self._methods(report["methods"], k, default=report["default"], spread=bool(folds))
        self.stdout.write("* the method suggest() uses (IMAGETAGS['SUGGEST_METHOD'])")
        for name in report["methods"]:
            self.stdout.write(f"  {name}: {METHOD_HELP.get(name, '')}")
        if folds:
            self.stdout.write(
                "± standard deviation over folds; distinct = mean per fold "
                "(pooled over all folds' queries in brackets)."
            )
        if "search" in report:
            self._search(report["search"], k, spread=bool(folds))
        sweep = report.get("k_sweep")
        if sweep:
            self.stdout.write("")
            self.stdout.write("by K (methods that depend on it):")
            names = [name for name in sweep[0] if isinstance(sweep[0][name], dict)]
            self.stdout.write(
                f"{'K':>5} {'used':>5}  "
                + "  ".join(f"{name + f' P@{k}':>13} {name + ' dist':>12}" for name in names)
            )
            for row in sweep:
                self.stdout.write(
                    f"{row['clusters_requested']:>5d} {row['clusters']:>5d}  "
                    + "  ".join(
                        f"{row[name]['p_at_k']:>13.3f} {row[name]['distinct_correct']:>12.1f}"
                        for name in names
                    )
                )
        if "tune" in report:
            self._tune(report["tune"], k)

    def _methods(
        self,
        methods: dict[str, Any],
        k: int,
        *,
        default: str,
        spread: bool,
        title: str = "method",
    ) -> None:
        width = 13 if spread else 6
        self.stdout.write(
            f"{title:<12} {'P@1':>6} {'P@3':>6} {f'P@{k}':>{width}} {f'R@{k}':>6} "
            f"{'distinct':>{width + 2 if spread else 8}} {'ms/query':>9}"
        )
        for name, scores in methods.items():
            label = f"{name} *" if name == default else name
            if spread:
                sd = scores["sd"]
                p_at_k = f"{scores['p_at_k']:.3f}±{sd['p_at_k']:.3f}"
                distinct = (
                    f"{scores['distinct_correct']:.1f}±{sd['distinct_correct']:.1f}"
                    f" ({scores['distinct_correct_pooled']})"
                )
            else:
                p_at_k = f"{scores['p_at_k']:.3f}"
                distinct = f"{scores['distinct_correct']:d}"
            self.stdout.write(
                f"{label:<12} {scores['p_at_1']:>6.3f} {scores['p_at_3']:>6.3f} "
                f"{p_at_k:>{width}} {scores['r_at_k']:>6.3f} "
                f"{distinct:>{width + 2 if spread else 8}} {scores['query_ms']:>9.3f}"
            )

    def _search(self, search: dict[str, Any], k: int, *, spread: bool) -> None:
        depth = search["recall_depth"]
        self.stdout.write("")
        self.stdout.write(
            f"Vector search: ivf's voting over the neighbours each backend finds in the whole "
            f"library, against {search['reference']} k-NN."
        )
        backends = search["backends"]
        self._methods(backends, k, default="", spread=spread, title="backend")
        self.stdout.write("")
        self.stdout.write(
            f"{'backend':<12} {f'recall@{depth}':>10} {f'same top-{k} set':>16} "
            f"{f'same top-{k} order':>18} {'build s':>8}"
        )
        for name, row in backends.items():
            self.stdout.write(
                f"{name:<12} {row[f'recall_at_{depth}']:>10.4f} {row['same_top_k_set']:>16.4f} "
                f"{row['same_top_k_order']:>18.4f} {row['build_seconds']:>8.2f}"
            )
        self.stdout.write(
            f"Shares of all queries (pooled over folds). recall@{depth}: exact's {depth} nearest "
            f"library images that the backend found too. same top-{k} set: the same {k} tags as "
            f"exact's, in any order (what the target, >= 0.97, is read on); order: also in the "
            "same order."
        )

    def _tune(self, tune: dict[str, Any], k: int) -> None:
        self.stdout.write("")
        self.stdout.write(f"Tuning (nested cross-validation): {tune['rule']}.")
        self.stdout.write(
            f"{'fold':>4}  {'knn k':>5}  {'vote: neighbours, T, by, prior':<34} {'probes':>6}"
        )
        for fold in tune["folds"]:
            chosen = fold["chosen"]
            vote = chosen["vote"]
            described = (
                f"{vote['neighbours']}, {vote['temperature']}, {vote['vote_by']}, "
                f"{vote['prior_weight']:g}"
            )
            self.stdout.write(
                f"{fold['fold']:>4}  {chosen['knn']['neighbours']:>5}  {described:<34} "
                f"{chosen['probes']['probes']:>6}"
            )
        self.stdout.write("")
        self.stdout.write("Outer scores of the tuned methods (each fold's own choices):")
        self._methods(tune["outer"], k, default="", spread=True)

    def _feedback(self, options: dict[str, Any]) -> None:
        report = feedback_report()
        if options["json"]:
            self.stdout.write(json.dumps(report))
            return
        overall = report["overall"]
        if not overall["shown"]:
            self.stdout.write(
                "No suggestion feedback yet: it is recorded when people accept or reject "
                "suggestions in the upload widget, the form or the API."
            )
            return
        self.stdout.write(
            f"Accepted {overall['accepted']} of {overall['shown']} suggestions shown "
            f"({overall['rate']:.1%}) over {report['tags']} tags."
        )
        for title, rows in (("channel", report["per_channel"]), ("method", report["per_method"])):
            self.stdout.write("")
            self.stdout.write(f"{title:<24} {'accepted':>8} {'shown':>7} {'rate':>7}")
            for name, row in rows.items():
                self.stdout.write(_acceptance_line(name, row))
        self.stdout.write("")
        self.stdout.write(
            f"{'tag (most shown first)':<24} {'accepted':>8} {'shown':>7} {'rate':>7}"
        )
        for name, row in list(report["per_tag"].items())[:30]:
            self.stdout.write(_acceptance_line(name, row))
        if report["tags"] > 30:
            self.stdout.write(f"… and {report['tags'] - 30} more tags (--json lists them all).")


def _acceptance_line(name: str, row: dict[str, Any]) -> str:
    rate = "—" if row["rate"] is None else f"{row['rate']:.1%}"
    return f"{name[:24]:<24} {row['accepted']:>8} {row['shown']:>7} {rate:>7}"


def search_database(given: str | None) -> str:
    """The alias ``--search pgvector`` uses: the option, else the one the site serves from."""
    if given:
        return given
    options = (imagetags_settings.SEARCH or {}).get("OPTIONS") or {}
    return options.get("DATABASE") or "default"
