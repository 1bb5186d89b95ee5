"""``manage.py export_int8_model``: quantise the VGG16 extractor to an int8 TFLite model file."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from typing import Any

import numpy as np
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from imagetags.conf import imagetags_settings
from imagetags.images import InvalidImage
from imagetags.models import StockImage
from imagetags.services.extractors import (
    extractor_config_from_spec,
    get_extractor,
    load_extractor_class,
)
from imagetags.services.extractors.quantize import MIN_SAMPLES, QuantizationError, export_int8
from imagetags.services.extractors.vgg16 import VGG16Extractor


class Command(BaseCommand):
    help = (
        "Export the VGG16 feature extractor as an int8 TFLite model (post-training quantisation, "
        "calibrated on a random sample of this site's own library images). Several times faster "
        "than fp32 VGG16 on a CPU, with nearly identical vectors; serve it with the 'tflite' "
        "backend and the tensor name this command prints."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "output",
            help="Path of the .tflite file to write. Keep it outside your code checkout "
            "(e.g. /srv/models/); every web and worker machine must be able to read it.",
        )
        parser.add_argument(
            "--samples",
            type=int,
            default=100,
            help="Library images to calibrate activation ranges on (default: %(default)s; "
            f"at least {MIN_SAMPLES}). More is slower to export and rarely better beyond 300.",
        )
        parser.add_argument(
            "--seed",
            type=int,
            default=0,
            help="Seed of the random choice of calibration images (default: %(default)s).",
        )
        parser.add_argument(
            "--extractor",
            default=None,
            help="VGG16 to export, as a spec (vgg16:imagenet, vgg16:/path/weights.h5, "
            "vgg16:random:avg). Default: the EXTRACTOR setting, which must then be vgg16.",
        )
        parser.add_argument(
            "--force",
            action="store_true",
            help="Overwrite OUTPUT if it exists (default: %(default)s).",
        )

    def handle(
        self,
        *args: Any,
        output: str,
        samples: int,
        seed: int,
        extractor: str | None,
        force: bool,
        **options: Any,
    ) -> None:
        verbosity = options["verbosity"]
        if samples < MIN_SAMPLES:
            raise CommandError(f"--samples must be at least {MIN_SAMPLES}, not {samples}.")
        if os.path.exists(output) and not force:
            raise CommandError(f"{output} exists; pass --force to overwrite it.")
        vgg16 = self._extractor(extractor)
        pixels = self._calibration_images(vgg16, samples, seed)
        if verbosity:
            self.stdout.write(
                f"Quantising {vgg16.key} to int8 with {len(pixels)} library images "
                "(a few seconds per ten images)..."
            )
        try:
            # The converter prints its SavedModel signature to stdout: keep ours readable.
            with contextlib.redirect_stdout(io.StringIO()):
                result = export_int8(vgg16, pixels, output)
        except QuantizationError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"Wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.dim}-d, "
                f"embedding tensor {result.tensor!r}) in {result.seconds:.0f} s."
            )
        )
        self.stdout.write(
            "Serve it with\n    IMAGETAGS['EXTRACTOR'] = "
            + json.dumps(result.extractor_config())
            + "\n(num_threads: the cores of the machines that serve it; TFLite uses one unless "
            "told), then run `manage.py compute_features --stale` and `manage.py "
            "rebuild_clusters`: its vectors have a new extractor key."
        )

    def _extractor(self, spec: str | None) -> VGG16Extractor:
        try:
            config = extractor_config_from_spec(spec) if spec else imagetags_settings.EXTRACTOR
            if load_extractor_class(config["CLASS"]) is not VGG16Extractor:
                raise CommandError(
                    f"Only VGG16 extractors can be exported; the extractor is {config['CLASS']!r}. "
                    "Pass --extractor vgg16:imagenet (or a weights file)."
                )
            extractor = get_extractor(config)
            extractor.load()
        except ImproperlyConfigured as exc:
            raise CommandError(f"The VGG16 extractor could not be loaded: {exc}") from exc
        assert isinstance(extractor, VGG16Extractor)
        return extractor

    def _calibration_images(
        self, extractor: VGG16Extractor, samples: int, seed: int
    ) -> list[np.ndarray]:
        """``samples`` library images chosen at random, decoded and resized like for embedding."""
        from tqdm import tqdm

        ids = np.asarray(StockImage.objects.order_by("pk").values_list("pk", flat=True))
        if len(ids) < MIN_SAMPLES:
            raise CommandError(
                f"The library has {len(ids)} images; at least {MIN_SAMPLES} are needed to "
                "calibrate the model. Import some first (`manage.py import_library`)."
            )
        order = np.random.default_rng(seed).permutation(ids)
        pixels: list[np.ndarray] = []
        stream = getattr(self.stderr, "_out", sys.stderr)
        with tqdm(total=samples, unit="img", desc="Calibration images", file=stream) as bar:
            for start in range(0, len(order), 500):
                part = [int(pk) for pk in order[start : start + 500]]
                rows = StockImage.objects.filter(pk__in=part).only("pk", "image")
                by_id = {row.pk: row for row in rows}
                for pk in part:
                    row = by_id.get(pk)
                    if row is None or not row.image:
                        continue
                    try:
                        with row.image.open("rb") as fh:
                            image = extractor.open_image(fh)
                    except (InvalidImage, OSError):
                        continue  # unreadable files are compute_features' business, not ours
                    pixels.append(extractor.prepare(image))
                    bar.update(1)
                    if len(pixels) == samples:
                        return pixels
        if len(pixels) < MIN_SAMPLES:
            raise CommandError(
                f"Only {len(pixels)} library images could be read; at least {MIN_SAMPLES} are "
                "needed. Check MEDIA_ROOT / the storage, or import more images."
            )
        return pixels
