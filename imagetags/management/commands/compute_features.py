"""``manage.py compute_features``: embed library images in bulk, with a progress bar."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from imagetags.conf import imagetags_settings
from imagetags.models import FeatureStatus, StockImage
from imagetags.services import features
from imagetags.services.extractors import get_extractor
from imagetags.tasks import run_feature_pipeline

# How many failed images the summary lists; the rest are in each image's feature_error.
SHOWN_ERRORS = 5


class Command(BaseCommand):
    help = (
        "Compute the feature vectors of library images with the configured extractor. "
        "Vectors of another extractor are left alone (and used again if the setting is switched "
        "back) until --stale recomputes them. Usually a background task does "
        "this on upload; use this command after an import, an extractor change or failures."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        modes = parser.add_mutually_exclusive_group()
        modes.add_argument(
            "--missing",
            dest="mode",
            action="store_const",
            const="missing",
            help="Images without a vector, and failed ones tried fewer than "
            "MAX_FEATURE_ATTEMPTS times (the default).",
        )
        modes.add_argument(
            "--stale",
            dest="mode",
            action="store_const",
            const="stale",
            help="Images whose vector was made by another extractor.",
        )
        modes.add_argument(
            "--all",
            dest="mode",
            action="store_const",
            const="all",
            help="Every image; those with a current vector are skipped unless --force is given.",
        )
        parser.set_defaults(mode="missing")
        parser.add_argument(
            "--batch-size",
            type=int,
            # Read when the command runs, not at import, so the setting can change.
            default=imagetags_settings.BATCH_SIZE,
            help="Images per forward pass of the model (default: %(default)s, the BATCH_SIZE "
            "setting). Lower it if the machine runs out of memory.",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="Recompute vectors that are already current (default: %(default)s).",
        )

    def handle(self, *args: Any, mode: str, batch_size: int, force: bool, **options: Any) -> None:
        if batch_size < 1:
            raise CommandError(f"--batch-size must be 1 or more, not {batch_size}.")
        verbosity = options["verbosity"]
        try:
            extractor = get_extractor()
            key = extractor.key
            extractor.load()
        except Exception as exc:  # any failure here means a configuration the site must fix
            raise CommandError(
                f"The feature extractor could not be loaded ({exc}). Check IMAGETAGS['EXTRACTOR'] in your settings (backend name, weights file or "
                "model path), then run this command again."
            ) from exc

        selected = features.select_images(mode, key)
        total = selected.count()
        # Stale is derived from the key: ready vectors that another extractor made.
        stale = (
            selected.filter(feature_status=FeatureStatus.READY).exclude(extractor_key=key).count()
        )
        failed_before = selected.filter(feature_status=FeatureStatus.FAILED).count()
        if verbosity:
            self._describe_left_out(mode, key)
        if total == 0:
            if verbosity:
                self.stdout.write(self.style.SUCCESS(f"Nothing to compute ({mode}) for {key}."))
            return
        if verbosity:
            self.stdout.write(
                f"Computing features for {total} images with extractor {key}; "
                f"{stale} stale, {failed_before} failed earlier."
            )

        summary = self._run(selected, extractor, total, batch_size, force, verbosity)

        style = self.style.WARNING if summary.failed else self.style.SUCCESS
        self.stdout.write(
            style(
                f"Done in {summary.seconds:.1f} s: {summary.ready} ready, {summary.failed} failed, "
                f"{summary.skipped} skipped ({summary.images_per_second:.1f} images/s)."
            )
        )
        for image_id, message in summary.errors[:SHOWN_ERRORS]:
            self.stdout.write(f"  image {image_id}: {message}")
        if len(summary.errors) > SHOWN_ERRORS:
            self.stdout.write(
                f"  ... and {len(summary.errors) - SHOWN_ERRORS} more; each image's reason is in "
                "its feature error (admin, StockImage list)."
            )

    def _run(
        self,
        selected: Any,
        extractor: Any,
        total: int,
        batch_size: int,
        force: bool,
        verbosity: int,
    ) -> features.FeatureRunSummary:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # tqdm needs the raw stream: OutputWrapper appends a newline to every write, which would
        # break the bar's carriage returns. disable=None hides the bar when it is not a terminal.
        stream = getattr(self.stderr, "_out", sys.stderr)
        with (
            tqdm(
                total=total,
                unit="img",
                desc="Features",
                file=stream,
                disable=None if verbosity else True,
            ) as bar,
            # Log lines (a failed image is a warning) are printed above the bar, not through it.
            contextlib.nullcontext() if bar.disable else logging_redirect_tqdm(),
        ):

            def advance(done: int) -> None:
                bar.update(done - bar.n)

            return run_feature_pipeline(
                selected,
                extractor=extractor,
                batch_size=batch_size,
                progress=advance,
                force=force,
            )

    def _describe_left_out(self, mode: str, key: str) -> None:
        """Say which images this mode does not touch, and which mode would."""
        if mode != "missing":
            return
        stale = features.other_key_images(key).count()
        exhausted = StockImage.objects.filter(
            feature_status=FeatureStatus.FAILED,
            feature_attempts__gte=imagetags_settings.MAX_FEATURE_ATTEMPTS,
        ).count()
        if stale:
            self.stdout.write(
                f"{stale} images with vectors of another extractor (stale for {key}) are left "
                "out: use --stale."
            )
        if exhausted:
            self.stdout.write(
                f"{exhausted} images failed {imagetags_settings.MAX_FEATURE_ATTEMPTS} times and "
                "are not retried: fix their files, then use --all."
            )
