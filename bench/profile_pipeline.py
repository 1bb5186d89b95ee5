"""Where the time goes: cProfile of ``compute_features`` and of ``suggest()``, per backend.

    python -m bench.profile_pipeline [--backend vgg16|int8|mobilenet] [--images 64] [--top 15]

Runs on the library ``python -m bench --only extraction`` leaves in the work directory (run that
first; it also exports the int8 model). cProfile sees the calling thread only, so the decoding
threads' own time is measured separately (wall time spent inside ``features._decode``), and time
the main thread spends waiting for them shows up as ``Future.result``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
SORT = os.environ.get("PROFILE_SORT", "tottime")

from bench.common import DEFAULT_WORKDIR, MOBILENET, VGG16_FP32, feedme_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["vgg16", "int8", "mobilenet"], default="vgg16")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args()

    from bench.common import setup_django
    from bench.extraction import base_settings, import_photos

    model = args.workdir / "models" / "vgg16-random-seed0-224-int8.tflite"
    configs = {
        "vgg16": VGG16_FP32,
        "int8": {"CLASS": "tflite", "OPTIONS": {"model_path": str(model)}},
        "mobilenet": {"CLASS": "tflite", "OPTIONS": {"model_path": str(MOBILENET)}},
    }
    config = configs[args.backend]
    if args.backend == "int8":
        from imagetags.services.extractors.quantize import _output_tensor

        config["OPTIONS"]["tensor"] = _output_tensor(str(model))[0]
    setup_django(args.workdir, "profile", {**base_settings(args.batch_size), "EXTRACTOR": config})
    from django.db import transaction

    from imagetags.services import features
    from imagetags.services.extractors import warm_up
    from imagetags.services.rebuild import rebuild_clusters
    from imagetags.services.suggest import suggest
    from imagetags.tasks import run_feature_pipeline

    library, queries = feedme_split()
    ids = import_photos(library[: args.images])
    warm_up()
    features.compute_features(ids, batch_size=args.batch_size, force=True)  # warm, vectors
    rebuild_clusters(k=8)

    decode_seconds = [0.0]
    lock = threading.Lock()
    real_decode = features._decode

    def timed_decode(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        started = time.perf_counter()
        try:
            return real_decode(*a, **kw)
        finally:
            with lock:
                decode_seconds[0] += time.perf_counter() - started

    features._decode = timed_decode
    # 1. Every stage in one thread (inside a transaction the model runs in the calling thread),
    #    so that cProfile sees the model, the database writes and the waits for decoding.
    profiler = cProfile.Profile()
    started = time.perf_counter()
    with transaction.atomic():
        profiler.enable()
        summary = run_feature_pipeline(ids, batch_size=args.batch_size, force=True)
        profiler.disable()
    sequential = time.perf_counter() - started
    print(f"compute_features, {args.backend}, {summary.ready} images, batch {args.batch_size}")
    print(f"  stages run one after the other: wall {sequential:.2f} s")
    stats = pstats.Stats(profiler)
    for label, function in STAGES:
        seconds = sum(
            value[3] for key, value in stats.stats.items() if key[2] == function
        )  # cumulative time
        print(f"    {label:<46} {seconds:6.2f} s  {seconds / sequential:6.1%}")
    print(f"    {'decoding threads (busy, in parallel)':<46} {decode_seconds[0]:6.2f} s")
    _print(profiler, args.top)

    # 2. The pipeline as it runs outside a transaction: the model in its own thread.
    decode_seconds[0] = 0.0
    started = time.perf_counter()
    summary = run_feature_pipeline(ids, batch_size=args.batch_size, force=True)
    wall = time.perf_counter() - started
    print(
        f"  pipelined (model thread, decoding threads, this thread storing): wall {wall:.2f} s "
        f"({summary.ready / wall:.1f} img/s), {sequential / wall:.2f}× the one-thread run\n"
    )

    paths = [str(photo.path) for photo in queries[:20]]
    _profile_calls(f"suggest(path), {args.backend}", suggest, paths, args.top)

    from bench.extraction import _api_client

    client = _api_client()
    if client is None:
        return

    def post(path: str) -> None:
        with open(path, "rb") as fh:
            response = client.post("/api/imagetags/suggestions/", {"image": fh})
        assert response.status_code == 200, response.content

    _profile_calls(f"API POST /suggestions/ (test client), {args.backend}", post, paths, args.top)


def _profile_calls(label: str, call: Callable[[str], object], paths: list[str], top: int) -> None:
    """cProfile of ``call(path)`` for every path, after one untimed call."""
    call(paths[0])
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for path in paths:
        call(path)
    profiler.disable()
    wall = time.perf_counter() - started
    print(f"{label}, {len(paths)} calls: {wall / len(paths) * 1000:.1f} ms each")
    _print(profiler, top)


# (label, function name) of the pipeline's stages, for the cumulative-time breakdown.
STAGES = [
    ("model forward (FeatureExtractor.embed_arrays)", "embed_arrays"),
    ("waiting for decoded images (Future.result)", "result"),
    ("storing a batch (features._process_batch)", "_process_batch"),
    ("  of which the batch UPDATE (_write_rows)", "_write_rows"),
    ("the next steps (tasks.after_vectors_stored)", "after_vectors_stored"),
    ("  of which joining the active clustering", "assign_to_active_set"),
    ("reading the next batch's rows (start_batch)", "start_batch"),
]


def _print(profiler: cProfile.Profile, top: int) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(SORT)
    stats.print_stats(top)
    lines = out.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("ncalls"))
    print("\n".join(lines[start - 1 : start + top + 1]))
    print()


if __name__ == "__main__":
    main()
