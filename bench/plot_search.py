"""The curve of issue 12: ``suggest(vector)`` p50 (warm) and the memory a web process adds for
search, from 10,000 to 1,000,000 images, per vector-search backend.

    python -m bench.plot_search RESULTS.json [MORE.json ...] --out docs/search-curve.png
    python -m bench.plot_search RESULTS.json [MORE.json ...] --table   # the rows, as Markdown

Reads the JSON that ``bench/run --only search --json FILE`` writes (several runs may be given,
e.g. the 10k-100k run of every backend and the 1,000,000 run of some; a later file's figure
wins for the same backend and size) and draws two panels on logarithmic axes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TARGET_P50_MS = 5.0
TARGET_MEMORY_MB = 100.0
#: The unit of a row, by how its name starts (the JSON keeps the value, not the unit).
UNITS = {"suggest": " ms", "first": " ms", "memory": " MB", "rebuild": " s"}


def figures(paths: list[Path]) -> dict[str, dict[int, dict[str, float]]]:
    """backend -> size -> {"p50": ms, "memory": MB} from the runs' facts."""
    found: dict[str, dict[int, dict[str, float]]] = {}
    for path in paths:
        facts: dict[str, Any] = json.loads(path.read_text())["facts"]
        for entry in facts.get("search", []):
            serve = entry["serve"]
            found.setdefault(entry["backend"], {})[int(entry["n"])] = {
                "p50": float(serve["warm_p50_ms"]),
                "memory": float(serve["memory"]["private_mb"]),
            }
    return found


def plot(found: dict[str, dict[int, dict[str, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for backend, sizes in sorted(found.items()):
        xs = sorted(sizes)
        left.plot(xs, [sizes[x]["p50"] for x in xs], marker="o", label=backend)
        right.plot(xs, [sizes[x]["memory"] for x in xs], marker="o", label=backend)
    for axis, target, title, unit in (
        (left, TARGET_P50_MS, "suggest(vector) p50, warm", "ms"),
        (right, TARGET_MEMORY_MB, "memory a web process adds (private)", "MB"),
    ):
        axis.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ScalarFormatter())  # 10, 100, not 10^1, 10^2
        axis.set_xlabel("library images")
        axis.set_ylabel(unit)
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", linewidth=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def table(paths: list[Path]) -> str:
    """Every run's issue-12 rows in one Markdown table (as ``bench/run`` prints them), each run's
    load average before and after in a line above."""
    from bench.common import Row, format_table

    rows: list[Row] = []
    loads = []
    for path in paths:
        results = json.loads(path.read_text())
        facts = results["facts"]
        loads.append(
            f"{path.name}: load average {facts['machine_before'].get('load average')} before, "
            f"{facts['machine_after'].get('load average')} after, {facts.get('seconds')} s"
        )
        for row in results["rows"]:
            if row["target"] == "12":
                unit = next(
                    (u for prefix, u in UNITS.items() if row["name"].startswith(prefix)), ""
                )
                rows.append(Row("12", row["name"], row["value"], row["goal"], row["note"], unit))
    return "\n".join(loads) + "\n\n" + format_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("docs/search-curve.png"))
    parser.add_argument("--table", action="store_true", help="print the rows instead")
    args = parser.parse_args()
    if args.table:
        print(table(args.results))
        return
    plot(figures(args.results), args.out)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
