"""Shared pieces of the benchmarks: Django set-up on a throwaway database, timing, the table.

Every figure is a *ratio* of variants measured in one run, interleaved round by round (A, B, A,
B, ...), each variant's median taken: these machines are shared, and absolute times move by 2×
from one minute to the next while ratios of interleaved runs hold.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = PROJECT_ROOT.parent / "shared"
MOBILENET = SHARED / "models" / "mobilenet_v2_1.0_224_quant.tflite"
FEEDME = SHARED / "data" / "feedme-dev" / "manifest.jsonl"
#: Scratch space for databases, media copies, exported models and cached vectors. Outside the
#: repository on purpose: nothing a benchmark writes may end up committed.
DEFAULT_WORKDIR = Path(os.environ.get("IMAGETAGS_BENCH_DIR", "/tmp/imagetags-bench"))

VGG16_FP32 = {"CLASS": "vgg16", "OPTIONS": {"weights": None, "pooling": "avg", "seed": 0}}


@dataclass
class Row:
    """One line of the results table."""

    target: str  # e.g. "1", "4", "-" for information only
    name: str
    value: float | None
    goal: str = ""  # ">= 0.90", "<= 1.00", "" (information)
    note: str = ""
    unit: str = ""

    @property
    def ok(self) -> bool | None:
        if not self.goal:
            return None
        if self.value is None:
            return False
        op, _, number = self.goal.partition(" ")
        limit = float(number)
        return {">=": self.value >= limit, "<=": self.value <= limit, "==": self.value == limit}[op]

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "name": self.name,
            "value": self.value,
            "goal": self.goal,
            "ok": self.ok,
            "note": self.note,
        }


@dataclass
class Context:
    """What the benchmark modules share within one run."""

    workdir: Path
    quick: bool = False
    fresh: bool = False
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # extra figures for docs/performance.md
    int8_model: Path | None = None
    int8_tensor: str | None = None
    backends: list[str] | None = None  # labels to measure (None: all)

    def say(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- timing ----------------------------------------------------------------------------------


def run_step(command: list[str], *, one_blas_thread: bool) -> dict[str, Any]:
    """Run one benchmark step in a fresh process and return the JSON line it prints last.
    ``one_blas_thread``: as a web worker should run (README, Deployment) — with OpenBLAS's
    threads on two busy cores, warm suggestions swung by up to 5×."""
    env = dict(os.environ)
    if one_blas_thread:
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(name, "1")
    done = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleave(
    variants: dict[str, Callable[[], float | None]], rounds: int
) -> dict[str, list[float]]:
    """Run every variant once per round, in turn; a variant returns its own measure (e.g.
    seconds per image) or None to have its wall time taken."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _round in range(rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            measured = run()
            samples[name].append(
                time.perf_counter() - started if measured is None else float(measured)
            )
    return samples


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of the per-round ratios: each pair ran back to back, so a machine that gets busier
    or quieter during the run moves both sides of a pair alike."""
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])


# --- Django ----------------------------------------------------------------------------------


def setup_django(
    workdir: Path,
    name: str,
    imagetags: dict[str, Any],
    *,
    fresh_db: bool = True,
    database: dict[str, Any] | None = None,
) -> None:
    """Configure Django on ``<workdir>/<name>.sqlite3`` and ``<workdir>/<name>-media``, migrate.

    ``database``: another ``DATABASES["default"]`` instead (the search benchmark's PostgreSQL);
    ``fresh_db`` then only empties the media directory.

    Only IMAGETAGS keys the installed app knows are passed on (the settings dict grows while
    others work on the app, and the benchmark should not break over a key it does not need).
    """
    import django
    from django.conf import settings

    db = workdir / f"{name}.sqlite3"
    media = workdir / f"{name}-media"
    if fresh_db:
        for path in () if database else (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            path.unlink(missing_ok=True)
        shutil.rmtree(media, ignore_errors=True)
    media.mkdir(parents=True, exist_ok=True)
    from imagetags.conf import DEFAULTS

    settings.configure(
        SECRET_KEY="imagetags-bench-not-secret",
        DEBUG=False,
        USE_TZ=True,
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=[
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "django.contrib.staticfiles",
            "django_q",
            "imagetags",
        ],
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.common.CommonMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {"context_processors": []},
            }
        ],
        ROOT_URLCONF="bench.urls",
        STATIC_URL="/static/",
        MEDIA_ROOT=str(media),
        MEDIA_URL="/media/",
        DATABASES={
            "default": database
            or {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(db),
                "OPTIONS": {"timeout": 60},
            }
        },
        Q_CLUSTER={"name": "imagetags-bench", "orm": "default", "sync": True},
        IMAGETAGS={key: value for key, value in imagetags.items() if key in DEFAULTS},
        LOGGING={"version": 1, "disable_existing_loggers": False},
    )
    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


# --- data ------------------------------------------------------------------------------------


@dataclass
class Photo:
    path: Path
    tags: frozenset[str]
    sha256: str


def feedme_split(holdout: float = 0.3, seed: int = 0) -> tuple[list[Photo], list[Photo]]:
    """feedme-dev as (library, queries), split as docs/quality.md does it.

    Every feedme-dev image is its own post, so the split by post is a split by image: a seeded
    random 30 % are queries. Byte-identical images are dropped after their first occurrence.
    """
    photos: list[Photo] = []
    seen: set[str] = set()
    root = FEEDME.parent
    for line in FEEDME.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        path = root / entry["path"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        tags = frozenset(str(t).strip().lower() for t in entry.get("tags") or ())
        photos.append(Photo(path=path, tags=tags, sha256=digest))
    n_queries = round(holdout * len(photos))
    order = np.random.default_rng(seed).permutation(len(photos))
    query_set = set(order[:n_queries].tolist())
    library = [p for i, p in enumerate(photos) if i not in query_set]
    queries = [p for i, p in enumerate(photos) if i in query_set]
    return library, queries


class VectorCache:
    """Vectors by image SHA-256 for one extractor key, kept between benchmark runs."""

    def __init__(self, directory: Path, key: str) -> None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-")[:60]
        self.path = directory / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path) as data:
                self.vectors = dict(zip(data["sha256"].tolist(), data["vectors"], strict=True))

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sums = sorted(self.vectors)
        np.savez(
            self.path, sha256=np.array(sums), vectors=np.stack([self.vectors[s] for s in sums])
        )


def embed_photos(
    extractor: Any, photos: Sequence[Photo], cache: VectorCache | None, batch_size: int = 16
) -> np.ndarray:
    """Unit vectors of ``photos`` (opened like uploads), from ``cache`` where present."""

    todo = [p for p in photos if cache is None or p.sha256 not in cache.vectors]
    found: dict[str, np.ndarray] = {} if cache is None else cache.vectors
    for start in range(0, len(todo), batch_size):
        part = todo[start : start + batch_size]
        matrix = extractor.embed_batch([extractor.open_image(p.path) for p in part])
        for photo, vector in zip(part, matrix, strict=True):
            found[photo.sha256] = vector
    if cache is not None and todo:
        cache.save()
    return np.stack([found[p.sha256] for p in photos]).astype(np.float32)


# --- the machine -----------------------------------------------------------------------------


def machine_summary() -> dict[str, str]:
    """The lscpu lines that matter for these figures, the load, the library versions."""
    info: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    wanted = ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache")
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            info[key.strip()] = value.strip()
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    info["SIMD"] = " ".join(
        f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags
    )
    with contextlib.suppress(OSError):
        info["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["python"] = platform.python_version()
    for module in ("numpy", "tensorflow", "keras", "sklearn", "ai_edge_litert", "django"):
        try:
            imported = __import__(module)
            info[module] = getattr(imported, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            info[module] = "missing"
    return info


# --- output ----------------------------------------------------------------------------------


def format_table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table (readable on a terminal, pasteable into the docs)."""
    lines = ["| # | measure | value | target | met | note |", "|---|---|---|---|---|---|"]
    for row in rows:
        value = "n/a" if row.value is None else _number(row.value) + row.unit
        met = {True: "yes", False: "**NO**", None: "-"}[row.ok]
        lines.append(
            f"| {row.target} | {row.name} | {value} | {row.goal or 'info'} | {met} | {row.note} |"
        )
    return "\n".join(lines)


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
