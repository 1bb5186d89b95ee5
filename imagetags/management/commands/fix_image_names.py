"""``manage.py fix_image_names``: give stored image files the extension of their format."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from imagetags.services import stored_files

# How many renames, skips and failures the summary lists by name (all of them with -v 2).
SHOWN = 10


class Command(BaseCommand):
    help = (
        "Rename stored image files whose extension does not name the format read from their "
        "bytes (files kept under a client's name before names were checked, e.g. a PNG saved "
        "as evil.html). Each row is pointed at the renamed copy in its own transaction; the "
        "old file is deleted only after that commits. Safe to run again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="List what would be renamed; change nothing (default: %(default)s).",
        )

    def handle(self, *args: Any, dry_run: bool, **options: Any) -> None:
        from tqdm import tqdm

        verbosity = options["verbosity"]
        # tqdm needs the raw stream: OutputWrapper appends a newline to every write, which would
        # break the bar's carriage returns. disable=None hides the bar when it is not a terminal.
        stream = getattr(self.stderr, "_out", sys.stderr)
        with tqdm(
            total=stored_files.total_images(),
            unit="img",
            desc="Checking names",
            file=stream,
            disable=None if verbosity else True,
        ) as bar:
            summary = stored_files.fix_image_names(
                dry_run=dry_run, progress=lambda done: bar.update(done - bar.n)
            )

        shown = None if verbosity >= 2 else SHOWN
        verb = "would rename" if dry_run else "renamed"
        style = self.style.WARNING if summary.failed else self.style.SUCCESS
        self.stdout.write(
            style(
                f"Checked {summary.checked} images: {len(summary.renamed)} {verb}, "
                f"{summary.unchanged} already named right, {len(summary.skipped)} left alone, "
                f"{len(summary.failed)} failed."
            )
        )
        self._list(summary.renamed[:shown], lambda pk, old, new: f"  image {pk}: {old} -> {new}")
        self._list(
            summary.skipped[:shown], lambda pk, name, why: f"  left alone {pk}: {name}: {why}"
        )
        self._list(summary.failed[:shown], lambda pk, name, why: f"  failed {pk}: {name}: {why}")
        hidden = sum(
            max(0, len(items) - SHOWN)
            for items in (summary.renamed, summary.skipped, summary.failed)
        )
        if shown is not None and hidden:
            self.stdout.write(f"  ... and {hidden} more lines; use -v 2 to list them all.")
        if dry_run and summary.renamed:
            self.stdout.write("Dry run: nothing was changed. Run without --dry-run to rename.")
        if summary.failed:
            raise CommandError(
                f"{len(summary.failed)} files could not be renamed; their rows still point at "
                "their old files. Fix the reason given above, then run this command again."
            )

    def _list(self, rows: list[tuple[int, str, str]], line: Any) -> None:
        for row in rows:
            self.stdout.write(line(*row))
