"""``python -m bench`` (or ``bench/run``): measure issue 5's targets and print the table.

``--only search`` measures issue 12's instead (vector-search backends, ``bench/search.py``); it
is not part of the default run, because its targets are about engines (pgvector, usearch) that
count as missed until they are installed.

Exits 1 when a measured figure misses its target. Scratch files (SQLite libraries, media copies,
the exported int8 model, cached vectors) go to ``--workdir`` (default /tmp/imagetags-bench),
never into the repository. A full run takes 15–30 minutes on two shared cores, most of it
VGG16 fp32 embedding feedme-dev once (cached afterwards) and populating the 100,000-image library
(kept afterwards); ``--quick`` checks the plumbing in a few minutes with smaller sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# TensorFlow's C++ start-up chatter would bury the table.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import DEFAULT_WORKDIR, Context, format_table, machine_summary  # noqa: E402

PARTS = ("storage", "extraction", "agreement", "rebuild", "search")
DEFAULT_PARTS = ("storage", "extraction", "agreement", "rebuild")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_PARTS),
        help="comma-separated: " + ", ".join(PARTS) + " (default: all but search)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a plumbing check")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="re-export the int8 model and re-populate the rebuild libraries",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="rebuild library sizes (default 1000,10000,100000; add 1000000 if you have ~15 "
        "minutes and 3 GB of disk); search library sizes (default 10000,100000,1000000)",
    )
    parser.add_argument(
        "--flatten",
        type=int,
        default=None,
        help="images in the flatten-mode rebuild (default 5000; 0 skips)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="extraction backends to measure, by words of their label "
        "(e.g. 'MobileNetV2'; default: all)",
    )
    parser.add_argument(
        "--search-backends",
        default=None,
        help="vector-search backends to measure, by alias (e.g. 'exact,usearch'; default: all; "
        "the reference exact-knn always runs)",
    )
    parser.add_argument(
        "--search-library",
        default="cnn",
        choices=["cnn", "isotropic"],
        help="how the search benchmark's synthetic images vary inside a topic: 'cnn' "
        "(calibrated on feedme-dev's MobileNetV2 features, bench/structure.py) or 'isotropic' "
        "(no near neighbours inside a topic: a stress case); default %(default)s",
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the rows and facts here"
    )
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        workdir=args.workdir,
        quick=args.quick,
        fresh=args.fresh,
        backends=[b.strip() for b in args.backends.split(",")] if args.backends else None,
    )
    started = time.perf_counter()
    ctx.facts["machine_before"] = machine_summary()

    if "storage" in parts:
        from bench import storage

        storage.run(ctx)
    if "extraction" in parts or "agreement" in parts:
        from bench import extraction

        ids = extraction.prepare(ctx)
        if "extraction" in parts:
            extraction.run(ctx, ids)
    if "agreement" in parts:
        from bench import agreement
        from bench.common import feedme_split

        agreement.run(ctx, *feedme_split())
    if "rebuild" in parts:
        from bench import rebuild

        default_sizes = "1000,10000" if args.quick else "1000,10000,100000"
        sizes = [int(s) for s in (args.sizes or default_sizes).split(",") if s]
        flatten = args.flatten if args.flatten is not None else (500 if args.quick else 5000)
        rebuild.run(ctx, sizes, flatten)
    if "search" in parts:
        from bench import search

        default_sizes = "1000,10000" if args.quick else "10000,100000,1000000"
        sizes = [int(s) for s in (args.sizes or default_sizes).split(",") if s]
        only = args.search_backends.split(",") if args.search_backends else None
        search.run(
            ctx,
            sizes,
            [alias.strip() for alias in only] if only else None,
            structure=args.search_library,
        )

    ctx.facts["machine_after"] = machine_summary()
    ctx.facts["seconds"] = round(time.perf_counter() - started, 1)
    order = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5}
    rows = sorted(ctx.rows, key=lambda row: order.get(row.target, 9))
    machine = ctx.facts["machine_before"]
    print()
    print(
        f"Machine: {machine.get('Model name', '?')}, {machine.get('CPU(s)', '?')} CPUs, "
        f"{machine.get('SIMD', '')}; load average {machine.get('load average', '?')} before, "
        f"{ctx.facts['machine_after'].get('load average', '?')} after; {ctx.facts['seconds']:.0f} s."
    )
    print(format_table(rows))
    results = {"rows": [row.as_dict() for row in rows], "facts": ctx.facts}
    (args.workdir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    missed = [row for row in rows if row.ok is False]
    if missed:
        print(f"\n{len(missed)} target(s) missed: " + "; ".join(row.name for row in missed))
        return 1
    print("\nEvery target met.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
