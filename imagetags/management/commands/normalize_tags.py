"""manage.py normalize_tags: list (or fix) tags stored before the current tag-name rules."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from imagetags.services.vocabulary import normalise_tag_names, unnormalised_tags


class Command(BaseCommand):
    help = (
        "List tags whose stored name the current rules would change (NFKC, invisible characters "
        "stripped) or refuse (control, format, private-use characters). With --apply, merge each "
        "into the tag with its normalised name, or rename it when there is none."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--apply",
            action="store_true",
            help="Merge or rename the listed tags (default: only list them).",
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="Exit with an error when any tag needs attention (for CI or deploy scripts).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["apply"]:
            done = normalise_tag_names()
            for item, outcome in done:
                self.stdout.write(f"{item.name!r} (tag {item.pk}): {outcome}")
            left = sum(1 for item, _outcome in done if item.error)
            self.stdout.write(
                self.style.SUCCESS(f"{len(done) - left} tags normalised")
                + (f", {left} left to rename by hand in the admin." if left else ".")
            )
            return
        found = unnormalised_tags()
        for item in found:
            target = (
                f"{item.normalised!r}" + (f" (tag {item.existing})" if item.existing else "")
                if not item.error
                else item.error
            )
            self.stdout.write(f"{item.name!r} (tag {item.pk}): {item.action} -> {target}")
        if not found:
            self.stdout.write(self.style.SUCCESS("Every tag name is in normalised form."))
            return
        message = f"{len(found)} tags need attention; run `manage.py normalize_tags --apply`."
        if options["check"]:
            raise CommandError(message)
        self.stdout.write(self.style.WARNING(message))
