"""manage.py suggest_tags: suggested tags for image files, from the active cluster set."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from imagetags.conf import imagetags_settings
from imagetags.images import InvalidImage
from imagetags.services.suggest import SuggestionUnavailable, suggest
from imagetags.services.tagging import parse_tag_input


class Command(BaseCommand):
    help = "Suggest tags for one or more image files using the active clusters."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("paths", nargs="+", metavar="PATH", help="Image files.")
        parser.add_argument(
            "--limit",
            type=int,
            default=imagetags_settings.SUGGEST_LIMIT,
            help="Most tags per image (default: %(default)s).",
        )
        parser.add_argument(
            "--threshold",
            type=float,
            default=imagetags_settings.SUGGEST_THRESHOLD,
            help="Only tags on at least this share of the cluster's posts, 0-1 (default: %(default)s).",
        )
        parser.add_argument(
            "--exclude", default="", help='Tags to leave out, comma separated (e.g. "food, meal").'
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON object per line.")

    def handle(self, *args: Any, **options: Any) -> None:
        exclude = parse_tag_input(options["exclude"])
        failures = 0
        for path in options["paths"]:
            try:
                result = suggest(
                    path, limit=options["limit"], threshold=options["threshold"], exclude=exclude
                )
            except SuggestionUnavailable as exc:
                raise CommandError(str(exc)) from exc
            except (InvalidImage, OSError) as exc:
                failures += 1
                if options["json"]:
                    self.stdout.write(json.dumps({"path": path, "error": str(exc)}))
                else:
                    self.stderr.write(self.style.ERROR(f"{path}: {exc}"))
                continue
            if options["json"]:
                self.stdout.write(json.dumps({"path": path, **result.as_dict()}))
                continue
            self.stdout.write(
                self.style.MIGRATE_HEADING(
                    f"{path}  (cluster {result.cluster_index} of set {result.cluster_set}, "
                    f"similarity {result.similarity:.3f})"
                )
            )
            if not result.tags:
                self.stdout.write("  (no tags: this cluster's posts have none above the threshold)")
            for tag in result.tags:
                self.stdout.write(f"  {tag.name:<30} {tag.score:>5.0%}  {tag.evidence}")
        if failures:
            raise CommandError(f"{failures} of {len(options['paths'])} files could not be read.")
