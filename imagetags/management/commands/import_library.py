"""manage.py import_library: add tagged images from a JSON Lines manifest to the library."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from imagetags.services.library import ImportSummary, ManifestError, import_manifest
from imagetags.tasks import run_feature_pipeline


class Command(BaseCommand):
    help = (
        "Import images and their tags from a JSON Lines manifest, one "
        '{"path": "relative/to/manifest.jpg", "tags": [...], "post": key|null, "owner": key|null} '
        "object per line. Lines with the same post key become one post (tags: the union). "
        "Safe to re-run: images already in the library (same SHA-256) are skipped, and keyed "
        "posts are found again by their import key '<namespace>:<post>'."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("manifest", help="Path of the manifest (.jsonl).")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Check every line and image and report what would happen; write nothing.",
        )
        parser.add_argument(
            "--limit",
            type=int,
            default=None,
            metavar="N",
            help="Read only the first N manifest entries (default: all).",
        )
        parser.add_argument(
            "--compute-features",
            action="store_true",
            help="Compute the new images' features here, in batches, after the import (instead "
            "of one background task per image).",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=None,
            help="Images per forward pass with --compute-features (default: IMAGETAGS['BATCH_SIZE']).",
        )
        parser.add_argument(
            "--namespace",
            default=None,
            help="Prefix of the posts' import keys (default: '<manifest folder>/<manifest file>'). "
            "Pass the same value when importing a moved copy of a manifest.",
        )
        parser.add_argument(
            "--show-rejected",
            type=int,
            default=20,
            metavar="N",
            help="Rejected lines listed in the summary (default: %(default)s).",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print the summary as one JSON object."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["limit"] is not None and options["limit"] < 1:
            raise CommandError("--limit must be at least 1.")
        from tqdm import tqdm

        show_bars = options["verbosity"] > 0 and not options["json"]
        bars: dict[str, tqdm] = {}

        def bar_progress(name: str, unit: str) -> Any:
            def update(done: int, total: int) -> None:
                bar = bars.get(name)
                if bar is None:
                    bar = bars[name] = tqdm(
                        desc=name, total=total, unit=unit, disable=not show_bars
                    )
                bar.update(done - bar.n)
                if done >= total:
                    bar.close()  # before the next bar starts, so the two do not interleave

            return update

        try:
            summary = import_manifest(
                options["manifest"],
                dry_run=options["dry_run"],
                limit=options["limit"],
                feature_pipeline=run_feature_pipeline if options["compute_features"] else None,
                namespace=options["namespace"],
                batch_size=options["batch_size"],
                progress=bar_progress("Importing", "line"),
                feature_progress=bar_progress("Features", "image"),
            )
        except ManifestError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            for bar in bars.values():
                bar.close()
        if options["json"]:
            self.stdout.write(json.dumps(summary.as_dict()))
        else:
            self._report(summary, options["show_rejected"])

    def _report(self, summary: ImportSummary, show: int) -> None:
        verb = "Would import" if summary.dry_run else "Imported"
        self.stdout.write(
            self.style.SUCCESS(
                f"{verb} {summary.imported} images ({summary.posts_created} new posts, "
                f"{summary.posts_updated} updated); skipped {summary.skipped} already present; "
                f"rejected {len(summary.rejected)}."
            )
        )
        if summary.rejected:
            self.stdout.write(self.style.WARNING("Rejected lines:"))
            for rejection in summary.rejected[:show]:
                self.stdout.write(f"  {rejection}")
            hidden = len(summary.rejected) - show
            if hidden > 0:
                self.stdout.write(f"  ... and {hidden} more (--show-rejected or --json lists all).")
        if summary.features is not None:
            features = summary.features
            self.stdout.write(
                f"Features: {features['ready']} ready, {features['failed']} failed, "
                f"{features['skipped']} skipped in {features['seconds']:.1f} s "
                f"({features['extractor_key']})."
            )
        if summary.dry_run:
            self.stdout.write("Dry run: nothing was written.")
