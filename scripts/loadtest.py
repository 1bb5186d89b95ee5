#!/usr/bin/env python
"""Load test: demo_site under gunicorn on 127.0.0.1, clients posting images for suggestions
while the clusters are rebuilt again and again.

    .venv/bin/python scripts/loadtest.py                 # 60 s, 4 clients, 2 gunicorn workers
    .venv/bin/python scripts/loadtest.py --short         # 10 s (what CI runs)
    .venv/bin/python scripts/loadtest.py --database-url postgresql://user:pw@127.0.0.1:5432/db
    .venv/bin/python scripts/loadtest.py --database-url postgresql://… --search pgvector \
        --library-size 100000                            # the pgvector engine, a large library

What it does, all in a temporary folder that is removed afterwards:

1. A settings module on top of ``demo_site.settings``: its own SQLite file (or the PostgreSQL
   database of ``--database-url``, whose tables it creates), media folder, ``DEBUG = False``, and a
   throttle rate high enough not to be what is measured.
2. ``migrate``; a user for the clients; the demo's drawn library (``make_demo_library``),
   imported with its features; with ``--library-size``, synthetic images added around the drawn
   ones' vectors (each a copy of a drawn image's tags and its vector plus noise, cosine ≈ 0.9) up
   to that many, so that search costs what it costs at that size; a first ``rebuild_clusters``.
   ``--search`` sets ``IMAGETAGS["SEARCH"]``: ``exact`` (the app's default, left unset),
   ``usearch`` (index files in the run's folder) or ``pgvector`` (in the ``--database-url``
   database, with ``imagetags.contrib.pgvector`` installed to create the extension).
3. gunicorn with ``--workers`` sync workers on a free port of 127.0.0.1; one warm-up request per
   worker (each loads the model once).
4. ``--clients`` threads post one image at a time to ``POST /api/imagetags/suggestions/`` (HTTP
   Basic auth) until ``--duration`` runs out, while another thread runs ``rebuild_clusters`` over
   and over from 10 % to 80 % of the run.
5. A report: requests, errors (anything but 200, or no answer), p50/p95/p99/max latency,
   requests answered while a rebuild was running, the cluster sets that answered. ``--json``
   writes it to a file too. Exits 1 if any request failed, none was made, or none overlapped a
   rebuild.

Bounded by design: traffic goes only to 127.0.0.1, at most ``--clients`` requests are in flight,
the run stops after ``--duration`` seconds (at most 600) or ``--max-requests`` requests.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from base64 import b64encode
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
SHARED_MODEL = PROJECT.parent / "shared" / "models" / "mobilenet_v2_1.0_224_quant.tflite"
HOST = "127.0.0.1"  # loopback only, always
API_PATH = "/api/imagetags/suggestions/"
USER, PASSWORD = "loadtest", "loadtest-" + uuid.uuid4().hex[:12]

SETTINGS = '''
"""Load-test settings: demo_site's, with this run's database, media and limits."""
import os

from demo_site.settings import *  # noqa: F401,F403
from demo_site.settings import IMAGETAGS

DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
MEDIA_ROOT = os.environ["IMAGETAGS_LOAD_MEDIA"]
_url = os.environ.get("IMAGETAGS_LOAD_DATABASE_URL")
if _url:
    from urllib.parse import unquote, urlsplit

    _u = urlsplit(_url)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": unquote(_u.path.strip("/")),
            "USER": unquote(_u.username or ""),
            "PASSWORD": unquote(_u.password or ""),
            "HOST": _u.hostname or "",
            "PORT": str(_u.port or ""),
        }
    }
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ["IMAGETAGS_LOAD_DB"],
            "OPTIONS": {"timeout": 30},
        }
    }
# The API's throttle (60/min per user by default) is not what this measures.
IMAGETAGS = {**IMAGETAGS, "API_THROTTLE_RATE": "1000000/min"}
# --search: the vector-search engine (exact, the default, is left to the app).
_search = os.environ.get("IMAGETAGS_LOAD_SEARCH", "exact")
if _search == "pgvector":
    from demo_site.settings import INSTALLED_APPS

    IMAGETAGS["SEARCH"] = {"BACKEND": "pgvector", "OPTIONS": {"DATABASE": "default"}}
    INSTALLED_APPS = [*INSTALLED_APPS, "imagetags.contrib.pgvector"]
elif _search == "usearch":
    IMAGETAGS["SEARCH"] = {
        "BACKEND": "usearch",
        "OPTIONS": {"PATH": os.environ["IMAGETAGS_LOAD_SEARCH_PATH"]},
    }
# The API is session-only by default; `--auth basic` opts into HTTP Basic as a site would.
if os.environ.get("IMAGETAGS_LOAD_AUTH") == "basic":
    IMAGETAGS["API_AUTHENTICATION_CLASSES"] = [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
'''


@dataclass
class Sample:
    started: float
    seconds: float
    status: int  # 0: no answer
    cluster_set: int | None = None
    error: str = ""


@dataclass
class Rebuild:
    started: float
    ended: float
    returncode: int
    output: str = ""


@dataclass
class Report:
    endpoint: str
    auth: str
    duration_s: float
    clients: int
    gunicorn_workers: int
    database: str
    extractor: str
    library_images: int
    search: str = "exact"
    requests: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    throughput_rps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    rebuilds: int = 0
    rebuild_seconds: list[float] = field(default_factory=list)
    requests_during_rebuilds: int = 0
    cluster_sets_answering: list[int] = field(default_factory=list)
    error_examples: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Site:
    """The demo site in a temporary folder: its settings, database, media and processes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="imagetags-load-"))
        (self.root / "loadtest_settings.py").write_text(SETTINGS)
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "loadtest_settings",
            "PYTHONPATH": os.pathsep.join([str(self.root), str(PROJECT)]),
            "IMAGETAGS_LOAD_MEDIA": str(self.root / "media"),
            "IMAGETAGS_LOAD_DB": str(self.root / "db.sqlite3"),
            "IMAGETAGS_EXTRACTOR": args.extractor,
            "IMAGETAGS_LOAD_AUTH": args.auth,
            "IMAGETAGS_LOAD_SEARCH": args.search,
            # usearch's index files: one folder that gunicorn's workers and the rebuilds share.
            "IMAGETAGS_LOAD_SEARCH_PATH": str(self.root / "search"),
            "PYTHONUNBUFFERED": "1",
        }
        (self.root / "search").mkdir()
        if args.database_url:
            self.env["IMAGETAGS_LOAD_DATABASE_URL"] = args.database_url
        self.gunicorn: subprocess.Popen | None = None
        self.port = free_port()

    def manage(self, *argv: str, timeout: float = 600) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", *argv],
            cwd=PROJECT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise SystemExit(
                f"manage.py {' '.join(argv)} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            )
        return result.stdout

    def prepare(self) -> int:
        say(f"Preparing the site in {self.root} ({self.database_label()})")
        if self.args.database_url:
            # A database of its own is expected; start from empty tables all the same.
            self.manage("flush", "--noinput")
        self.manage("migrate", "--noinput", "-v", "0")
        # A user, logged in once like a browser: a session cookie (and a CSRF token) that every
        # request reuses. (HTTP Basic auth would hash the password on every request: ~0.25 s of
        # CPU with Django's default hasher, which would be most of what this measured.)
        session_key = self.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model as g, "
            "SESSION_KEY, BACKEND_SESSION_KEY, HASH_SESSION_KEY; "
            "from django.contrib.sessions.backends.db import SessionStore; "
            f"g().objects.filter(username={USER!r}).delete(); "
            f"u = g().objects.create_user({USER!r}, password={PASSWORD!r}); "
            "s = SessionStore(); s[SESSION_KEY] = str(u.pk); "
            "s[BACKEND_SESSION_KEY] = 'django.contrib.auth.backends.ModelBackend'; "
            "s[HASH_SESSION_KEY] = u.get_session_auth_hash(); s.create(); print(s.session_key)",
        ).split()[-1]
        csrf = uuid.uuid4().hex  # 32 characters: a valid unmasked CSRF secret
        AUTH["session"] = {
            "Cookie": f"sessionid={session_key}; csrftoken={csrf}",
            "X-CSRFToken": csrf,
            "Referer": f"http://{HOST}:{self.port}/",
        }
        library = self.root / "library"
        self.manage("make_demo_library", str(library), "--per-dish", str(self.args.per_dish))
        out = self.manage("import_library", str(library / "manifest.jsonl"), "--compute-features")
        say(out.strip().splitlines()[-1] if out.strip() else "imported")
        drawn = sum(1 for _ in (library / "images").iterdir())
        if self.args.library_size > drawn:
            out = self.manage(
                "shell",
                "-c",
                f"from scripts.loadtest import pad_library; print(pad_library({self.args.library_size}))",
                timeout=3600,
            )
            say(f"library padded with synthetic images to {out.split()[-1]}")
        self.manage("rebuild_clusters", "--k", "auto", "--top", "0", timeout=3600)
        return max(drawn, self.args.library_size)

    def database_label(self) -> str:
        return "PostgreSQL" if self.args.database_url else "SQLite"

    def start_gunicorn(self) -> None:
        gunicorn = Path(sys.executable).with_name("gunicorn")
        log = (self.root / "gunicorn.log").open("wb")
        self.gunicorn = subprocess.Popen(
            [
                str(gunicorn),
                "--bind",
                f"{HOST}:{self.port}",
                "--workers",
                str(self.args.workers),
                "--timeout",
                "120",
                "--graceful-timeout",
                "10",
                "demo_site.wsgi:application",
            ],
            cwd=PROJECT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.gunicorn.poll() is not None:
                raise SystemExit(f"gunicorn exited:\n{self.gunicorn_log()}")
            with contextlib.suppress(OSError):
                status, _body = request(self.port, "GET", "/", timeout=5)
                if status:
                    say(
                        f"gunicorn is serving on http://{HOST}:{self.port}/ ({self.args.workers} workers)"
                    )
                    return
            time.sleep(0.3)
        raise SystemExit(f"gunicorn did not answer in 60 s:\n{self.gunicorn_log()}")

    def gunicorn_log(self) -> str:
        path = self.root / "gunicorn.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.gunicorn is not None and self.gunicorn.poll() is None:
            self.gunicorn.send_signal(signal.SIGTERM)
            try:
                self.gunicorn.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.gunicorn.pid, signal.SIGKILL)
                self.gunicorn.wait(timeout=20)
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            say(f"Kept {self.root}")


def pad_library(total: int, seed: int = 0, cosine: float = 0.9) -> int:
    """Add synthetic images until the library holds ``total``; returns how many it holds.

    Runs inside the site's Django (``manage.py shell -c``). Each new image is a one-image post
    with the counted tags of a drawn image chosen at random and that image's vector plus noise
    (cosine ``cosine`` to it), under the current extractor key: neighbours and clusters keep the
    drawn library's structure, as a larger library of the same dishes would. Written in bulk,
    without signals (nothing is enqueued; the next rebuild counts them). No files are stored:
    suggestions never open library images."""
    import numpy as np
    from django.db import transaction
    from django.utils import timezone

    from imagetags.core.vectors import from_bytes, l2_normalize
    from imagetags.models import FeatureStatus, Post, PostTag, StockImage
    from imagetags.services.rebuild import current_extractor_key
    from imagetags.services.vectors import to_bytes

    key = current_extractor_key()
    drawn = list(
        StockImage.objects.filter(feature_status=FeatureStatus.READY, extractor_key=key)
        .exclude(vector=None)
        .values_list("post_id", "vector")
    )
    have = StockImage.objects.count()
    if have >= total or not drawn:
        return have
    tags: dict[int, list[int]] = {}
    for post_id, tag_id in PostTag.objects.counted().values_list("post_id", "tag_id"):
        tags.setdefault(post_id, []).append(tag_id)
    sources = np.stack([from_bytes(vector) for _post, vector in drawn])
    dim = sources.shape[1]
    # |noise|² = sigma² · dim, so the cosine to the source is 1 / sqrt(1 + sigma² · dim).
    sigma = np.float32(np.sqrt((1 / cosine**2 - 1) / dim))
    rng = np.random.default_rng(seed)
    now = timezone.now()
    made = 0
    while have + made < total:
        count = min(5000, total - have - made)
        chosen = rng.integers(0, len(drawn), count)
        matrix = l2_normalize(
            sources[chosen] + sigma * rng.standard_normal((count, dim), dtype=np.float32)
        )
        with transaction.atomic():
            posts = Post.objects.bulk_create([Post(title="") for _ in range(count)])
            PostTag.objects.bulk_create(
                [
                    PostTag(post=post, tag_id=tag_id, source="imported")
                    for post, source in zip(posts, chosen, strict=True)
                    for tag_id in tags.get(drawn[source][0], [])
                ],
                batch_size=2000,
            )
            StockImage.objects.bulk_create(
                [
                    StockImage(
                        post=post,
                        image=f"loadtest/pad-{have + made + i}.jpg",
                        width=224,  # filled in, so Django does not open the (absent) file
                        height=224,
                        sha256=f"{have + made + i:064x}",
                        feature_status=FeatureStatus.READY,
                        extractor_key=key,
                        vector=to_bytes(matrix[i]),
                        features_updated=now,
                    )
                    for i, post in enumerate(posts)
                ],
                batch_size=1000,
            )
        made += count
    return have + made


def multipart(image: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


AUTH: dict[str, dict[str, str]] = {
    "basic": {"Authorization": "Basic " + b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
    "session": {},  # filled in by Site.prepare()
}
AUTH_MODE = {"mode": "session"}


def post_image(port: int, image: bytes, name: str) -> Sample:
    body, content_type = multipart(image, name)
    headers = {**AUTH[AUTH_MODE["mode"]], "Content-Type": content_type}
    started = time.monotonic()
    try:
        status, payload = request(port, "POST", API_PATH, body, headers)
    except (OSError, http.client.HTTPException) as exc:
        return Sample(started, time.monotonic() - started, 0, error=f"{type(exc).__name__}: {exc}")
    seconds = time.monotonic() - started
    if status != 200:
        return Sample(started, seconds, status, error=payload[:300].decode(errors="replace"))
    try:
        cluster_set = json.loads(payload).get("cluster_set")
    except ValueError:
        return Sample(started, seconds, status, error="the answer is not JSON")
    return Sample(started, seconds, status, cluster_set=cluster_set)


def run(args: argparse.Namespace) -> Report:
    site = Site(args)
    try:
        n_images = site.prepare()
        site.start_gunicorn()
        images = sorted((site.root / "library" / "images").iterdir())
        queries = [(path.read_bytes(), path.name) for path in images[:: max(1, len(images) // 24)]]

        probe = post_image(site.port, *queries[0])
        if probe.status == 404:
            raise SystemExit(
                f"POST {API_PATH} answers 404: demo_site does not serve the suggestion API "
                "(imagetags.api.urls under api/imagetags/)."
            )
        if probe.status != 200:
            raise SystemExit(f"POST {API_PATH} answers {probe.status}: {probe.error}")
        # One warm-up request per worker: each loads the model once.
        for _ in range(args.workers * 2):
            post_image(site.port, *random.choice(queries))

        report = Report(
            endpoint=f"POST {API_PATH}",
            auth=args.auth,
            duration_s=args.duration,
            clients=args.clients,
            gunicorn_workers=args.workers,
            database=site.database_label(),
            extractor=args.extractor,
            library_images=n_images,
            search=args.search,
        )
        samples, rebuilds = drive(site, args, queries)
        summarise(report, samples, rebuilds)
        return report
    finally:
        site.stop()


def drive(
    site: Site, args: argparse.Namespace, queries: list[tuple[bytes, str]]
) -> tuple[list[Sample], list[Rebuild]]:
    samples: list[Sample] = []
    rebuilds: list[Rebuild] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + args.duration
    say(f"Load: {args.clients} clients for {args.duration:.0f} s, rebuilding all along")

    def client(number: int) -> None:
        rng = random.Random(number)
        while time.monotonic() < deadline:
            with lock:
                if len(samples) >= args.max_requests:
                    return
            sample = post_image(site.port, *rng.choice(queries))
            with lock:
                samples.append(sample)

    def rebuilder() -> None:
        time.sleep(args.duration * 0.1)
        seed = 1
        while time.monotonic() < start + args.duration * 0.8:
            began = time.monotonic()
            result = subprocess.run(
                [
                    sys.executable,
                    "manage.py",
                    "rebuild_clusters",
                    "--k",
                    "auto",
                    "--seed",
                    str(seed),
                    "--top",
                    "0",
                ],
                cwd=PROJECT,
                env=site.env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            rebuilds.append(
                Rebuild(
                    began,
                    time.monotonic(),
                    result.returncode,
                    (result.stdout + result.stderr)[-500:],
                )
            )
            seed += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    threads.append(threading.Thread(target=rebuilder))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return samples, rebuilds


def summarise(report: Report, samples: list[Sample], rebuilds: list[Rebuild]) -> None:
    report.requests = len(samples)
    failed = [s for s in samples if s.status != 200]
    report.errors = len(failed)
    report.error_examples = [f"{s.status}: {s.error}" for s in failed[:5]]
    statuses: dict[str, int] = {}
    for sample in samples:
        statuses[str(sample.status)] = statuses.get(str(sample.status), 0) + 1
    report.statuses = statuses
    if samples:
        span = max(s.started + s.seconds for s in samples) - min(s.started for s in samples)
        report.throughput_rps = round(len(samples) / span, 2) if span > 0 else 0.0
    ok = sorted(s.seconds * 1000 for s in samples if s.status == 200)
    if len(ok) >= 2:
        cuts = statistics.quantiles(ok, n=100, method="inclusive")
        report.latency_ms = {
            "p50": round(cuts[49], 1),
            "p95": round(cuts[94], 1),
            "p99": round(cuts[98], 1),
            "max": round(ok[-1], 1),
            "mean": round(statistics.fmean(ok), 1),
        }
    report.rebuilds = len(rebuilds)
    report.rebuild_seconds = [round(r.ended - r.started, 2) for r in rebuilds]
    failed_rebuilds = [r for r in rebuilds if r.returncode != 0]
    if failed_rebuilds:
        report.error_examples.append(f"rebuild failed: {failed_rebuilds[0].output}")
    report.requests_during_rebuilds = sum(
        1 for s in samples if any(r.started <= s.started <= r.ended for r in rebuilds)
    )
    report.cluster_sets_answering = sorted({s.cluster_set for s in samples if s.cluster_set})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, default=60.0, help="Seconds of load (default: %(default)s)."
    )
    parser.add_argument(
        "--short", action="store_true", help="10 s of load and a smaller library (CI)."
    )
    parser.add_argument(
        "--clients", type=int, default=4, help="Concurrent clients (default: %(default)s)."
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="gunicorn workers (default: %(default)s)."
    )
    parser.add_argument(
        "--per-dish", type=int, default=24, help="Library pictures per dish (default: %(default)s)."
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=50_000,
        help="Stop after this many requests (default: %(default)s).",
    )
    parser.add_argument(
        "--database-url",
        default="",
        help="postgresql://… to run on PostgreSQL instead of SQLite; its tables are flushed.",
    )
    parser.add_argument(
        "--extractor",
        default=os.environ.get("IMAGETAGS_EXTRACTOR")
        or (f"tflite:{SHARED_MODEL}" if SHARED_MODEL.exists() else "vgg16:random"),
        help="Extractor spec (default: the shared TFLite MobileNetV2 if present, else vgg16:random).",
    )
    parser.add_argument(
        "--auth",
        choices=["session", "basic"],
        default="session",
        help="How clients authenticate: a logged-in session with its CSRF token, or HTTP Basic "
        "(a password hash per request) (default: %(default)s).",
    )
    parser.add_argument(
        "--search",
        choices=["exact", "usearch", "pgvector"],
        default="exact",
        help="IMAGETAGS['SEARCH'] backend: exact, usearch (index files in the run's folder) or "
        "pgvector (needs --database-url on a server with pgvector) (default: %(default)s).",
    )
    parser.add_argument(
        "--library-size",
        type=int,
        default=0,
        help="Add synthetic images around the drawn library's vectors up to this many images, "
        "e.g. 100000 (default: the drawn library alone).",
    )
    parser.add_argument("--json", type=Path, help="Also write the report to this file.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    args = parser.parse_args(argv)
    if args.short:
        args.duration = min(args.duration, 10.0)
        args.per_dish = min(args.per_dish, 12)
    if not 1 <= args.duration <= 600:
        parser.error("--duration must be between 1 and 600 seconds")
    if not 1 <= args.clients <= 16:
        parser.error("--clients must be between 1 and 16")
    if args.search == "pgvector" and not args.database_url:
        parser.error("--search pgvector needs --database-url: a PostgreSQL database with pgvector")
    if not 0 <= args.library_size <= 2_000_000:
        parser.error("--library-size must be between 0 and 2,000,000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    AUTH_MODE["mode"] = args.auth
    report = run(args)
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    latency = report.latency_ms
    say(
        f"{report.search} search, {report.library_images} images: "
        f"{report.requests} requests, {report.errors} errors, "
        f"p50 {latency.get('p50', '-')} ms, p95 {latency.get('p95', '-')} ms, "
        f"{report.throughput_rps} req/s; {report.rebuilds} rebuilds, "
        f"{report.requests_during_rebuilds} requests answered during them"
    )
    if report.errors or not report.requests:
        return 1
    if not report.requests_during_rebuilds:
        say("No request overlapped a rebuild: make --duration longer.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
