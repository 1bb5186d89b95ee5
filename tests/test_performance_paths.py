"""The fast paths of issue 5 give the same answers as the plain ones.

float16 storage (and old float32 rows next to it), contiguous and chunked reads, rebuilds that
stream the library from the database instead of loading it, and the int8 export of VGG16.
Nothing here is timed: bench/ measures speed; these tests pin correctness.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from imagetags.core import kmeans
from imagetags.core import vectors as core_vectors
from imagetags.images import open_image
from imagetags.models import ClusterMembership, ClusterSetStatus, StockImage, TagFrequency
from imagetags.services import rebuild, vectors
from imagetags.services.errors import ClusteringError
from imagetags.services.extractors import FeatureExtractor, get_extractor
from imagetags.services.rebuild import rebuild_clusters
from imagetags.services.store import read_library_vectors, rows_per_read

from .conftest import DIM, unit

# --- float16 storage ---------------------------------------------------------------------------


def _units(n: int, dim: int = 512, seed: int = 0) -> np.ndarray:
    return vectors.l2_normalize(np.random.default_rng(seed).normal(size=(n, dim)))


def test_float16_rows_are_half_the_size_marked_and_unit_length():
    vec = _units(1)[0]
    data = vectors.to_bytes(vec, "float16")

    assert data.startswith(vectors.FLOAT16_MARKER)
    assert len(data) == 4 + 2 * 512  # vs 4 * 512 for float32
    back = vectors.from_bytes(data)
    assert back.dtype == np.float32 and back.shape == (512,)
    assert abs(float(np.linalg.norm(back)) - 1.0) < 1e-6  # re-normalised after widening
    assert float(back @ vec) > 0.99999  # cosine to the original
    assert np.abs(back - vec).max() < 1e-3
    assert vectors.stored_dim(data) == 512


def test_old_float32_rows_still_decode_exactly():
    vec = _units(1, seed=1)[0]
    legacy = np.ascontiguousarray(vec, dtype="<f4").tobytes()  # what every old row holds

    assert vectors.to_bytes(vec, "float32") == legacy
    assert np.array_equal(vectors.from_bytes(legacy), vec)
    assert np.array_equal(vectors.from_bytes(memoryview(legacy)), vec)  # PostgreSQL's type
    assert vectors.stored_dim(legacy) == 512


def test_the_marker_is_a_nan_so_no_float32_vector_starts_with_it():
    assert np.isnan(np.frombuffer(vectors.FLOAT16_MARKER, dtype="<f4")[0])
    # A 2-d float32 row and a 2-d float16 row are both 8 bytes long: the marker tells them apart.
    tiny = vectors.l2_normalize(np.array([0.6, 0.8], dtype=np.float32))
    assert np.allclose(vectors.from_bytes(vectors.to_bytes(tiny, "float32")), tiny)
    assert np.allclose(vectors.from_bytes(vectors.to_bytes(tiny, "float16")), tiny, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stack_decodes_a_whole_chunk_into_one_contiguous_array(dtype):
    matrix = _units(50, dim=64, seed=2)
    rows = [vectors.to_bytes(row, dtype) for row in matrix]

    stacked = vectors.stack(rows, 64, count=50)

    assert stacked.shape == (50, 64) and stacked.dtype == np.float32
    assert stacked.flags.c_contiguous
    np.testing.assert_allclose(stacked, matrix, atol=0 if dtype == "float32" else 1e-3)
    # Into a slice of a larger preallocated array, as read_library_vectors does.
    library = np.zeros((60, 64), dtype=np.float32)
    vectors.stack(rows, 64, out=library[5:55])
    np.testing.assert_array_equal(library[5:55], stacked)
    assert not library[:5].any() and not library[55:].any()


def test_stack_reads_a_library_of_mixed_formats_and_rejects_bad_rows():
    matrix = _units(6, dim=16, seed=3)
    rows = [
        vectors.to_bytes(row, "float16" if i % 2 else "float32") for i, row in enumerate(matrix)
    ]

    np.testing.assert_allclose(vectors.stack(rows, 16), matrix, atol=1e-3)
    with pytest.raises(ValueError, match="stored vector has 8 dimensions, expected 16"):
        vectors.stack([*rows, vectors.to_bytes(matrix[0, :8], "float16")], 16)
    with pytest.raises(ValueError, match="expected 7 vectors, read 6"):
        vectors.stack(rows, 16, count=7)
    assert vectors.stack([], 16).shape == (0, 16)


def test_stack_decodes_block_by_block_across_formats(monkeypatch):
    # Blocks of 4 rows: the first two blocks are uniform (one NumPy step each), the third mixes
    # both formats and is decoded row by row.
    monkeypatch.setattr(core_vectors, "_STACK_BLOCK_BYTES", 4 * 4 * 16)
    matrix = _units(11, dim=16, seed=4)
    dtypes = ["float32"] * 4 + ["float16"] * 4 + ["float32", "float16", "float32"]
    rows = [vectors.to_bytes(row, dtype) for row, dtype in zip(matrix, dtypes, strict=True)]

    stacked = vectors.stack(rows, 16, count=11)

    np.testing.assert_array_equal(stacked[:4], matrix[:4])  # float32 blocks stay exact
    np.testing.assert_allclose(stacked, matrix, atol=1e-3)


def test_vector_dtype_setting_chooses_what_is_written(settings):
    vec = unit(2, 0.1)
    assert len(vectors.to_bytes(vec)) == 4 * DIM  # default: float32, the original format
    settings.IMAGETAGS = {**settings.IMAGETAGS, "VECTOR_DTYPE": "float16"}
    assert vectors.to_bytes(vec) == vectors.FLOAT16_MARKER + vec.astype("<f2").tobytes()
    settings.IMAGETAGS = {**settings.IMAGETAGS, "VECTOR_DTYPE": "bfloat16"}
    with pytest.raises(ImproperlyConfigured, match="VECTOR_DTYPE.*'float32' or 'float16'"):
        vectors.to_bytes(vec)


def test_switching_to_float16_rebuilds_over_old_and_new_rows(add_post, settings):
    # Old rows in float32, then the setting changes and new rows arrive in float16: one library.
    for _ in range(3):
        add_post(["red"], [0])
    settings.IMAGETAGS = {**settings.IMAGETAGS, "VECTOR_DTYPE": "float16"}
    for _ in range(3):
        add_post(["sea"], [1])
    stored = [bytes(v) for v in StockImage.objects.order_by("pk").values_list("vector", flat=True)]
    assert [vectors.is_float16(data) for data in stored] == [False] * 3 + [True] * 3

    library = read_library_vectors(rebuild.current_extractor_key())
    cluster_set = rebuild_clusters(k=2, algorithm="kmeans")

    assert library.vectors.shape == (6, DIM)
    np.testing.assert_allclose(np.linalg.norm(library.vectors, axis=1), 1.0, atol=1e-6)
    tops = sorted(
        cluster.tag_frequencies.values_list("tag__name", flat=True).get()
        for cluster in cluster_set.clusters.all()
    )
    assert tops == ["red", "sea"]


# --- chunked reads -----------------------------------------------------------------------------


def test_reading_in_small_chunks_gives_the_same_library(add_post):
    for axis in (0, 1, 2, 0, 1, 2, 3):
        add_post(["t"], [axis, axis])
    key = rebuild.current_extractor_key()

    whole = read_library_vectors(key)
    seen: list[int] = []
    chunked = read_library_vectors(key, chunk_size=3, progress=seen.append)

    assert len(whole.image_ids) == 14
    np.testing.assert_array_equal(chunked.image_ids, whole.image_ids)
    np.testing.assert_array_equal(chunked.post_ids, whole.post_ids)
    np.testing.assert_array_equal(chunked.vectors, whole.vectors)
    assert seen == [3, 6, 9, 12, 14]


def test_a_vector_of_another_dimension_is_named(add_post):
    add_post(["t"], [0, 1])
    odd = add_post(["t"], [2]).images.get()
    StockImage.objects.filter(pk=odd.pk).update(vector=vectors.to_bytes(np.ones(3) / np.sqrt(3)))

    with pytest.raises(ClusteringError, match=f"Image {odd.pk} has a 3-d vector but others have 8"):
        read_library_vectors(rebuild.current_extractor_key())


def test_wide_vectors_are_read_in_fewer_rows_per_query():
    assert rows_per_read(512) == 5000  # CHUNK_SIZE
    assert rows_per_read(100_352) == 167  # flatten: ~64 MB of float32 per read, not 2 GB
    assert rows_per_read(100_352, chunk_size=10) == 10


# --- streamed rebuilds -------------------------------------------------------------------------


@pytest.fixture
def streamed(settings):
    """Force the streamed rebuild: a memory budget of 1 KB (32 vectors of 8-d), so these small
    libraries do not fit, and database reads of 4 rows."""
    settings.IMAGETAGS = {**settings.IMAGETAGS, "REBUILD_MEMORY_MB": 0.001, "CHUNK_SIZE": 4}


def test_streamed_rebuild_counts_tags_once_per_post(add_post, streamed, monkeypatch):
    def no_whole_library(*args, **kwargs):
        raise AssertionError("a streamed rebuild must not load the whole library")

    monkeypatch.setattr(rebuild, "read_library_vectors", no_whole_library)
    for _ in range(4):
        add_post(["burger", "food"], [0] * 9)
        for _ in range(3):
            add_post(["pizza", "food"], [0])
        for _ in range(4):
            add_post(["sea", "food"], [1])

    cluster_set = rebuild_clusters(k=2)

    assert cluster_set.status == ClusterSetStatus.ACTIVE
    assert cluster_set.params["streamed"] is True
    assert (cluster_set.k, cluster_set.n_images, cluster_set.n_posts) == (2, 64, 32)
    by_size = {c.size: c for c in cluster_set.clusters.all()}
    red, sea = by_size[48], by_size[16]
    assert (red.post_count, sea.post_count) == (16, 16)
    assert dict(red.tag_frequencies.values_list("tag__name", "post_count")) == {
        "food": 16,
        "pizza": 12,
        "burger": 4,
    }
    assert dict(sea.tag_frequencies.values_list("tag__name", "post_count")) == {
        "food": 16,
        "sea": 16,
    }
    assert ClusterMembership.objects.filter(cluster_set=cluster_set).count() == 64


def test_streamed_rebuild_never_holds_the_library_at_once(add_post, streamed, monkeypatch):
    for index in range(200):
        add_post([f"t{index % 4}"], [index % 4])
    largest = {"read": 0, "fit": 0}
    real_read = rebuild.read_vectors_by_id

    def spying_read(*args, **kwargs):
        ids, matrix = real_read(*args, **kwargs)
        largest["read"] = max(largest["read"], len(matrix))
        return ids, matrix

    real_step = kmeans.SphericalKMeans._step

    def spying_step(self, chunk):
        largest["fit"] = max(largest["fit"], len(chunk))
        return real_step(self, chunk)

    monkeypatch.setattr(rebuild, "read_vectors_by_id", spying_read)
    monkeypatch.setattr(kmeans.SphericalKMeans, "_step", spying_step)

    cluster_set = rebuild_clusters(k=4)

    # The sample (half the 32-vector budget) and the mini-batches (a quarter), never all 200.
    assert largest == {"read": 16, "fit": 8}
    assert cluster_set.params["epochs"] >= 1
    # Four well-separated groups: every cluster holds exactly one of them.
    for cluster in cluster_set.clusters.all():
        assert cluster.size == 50
        assert cluster.tag_frequencies.count() == 1


def test_a_rebuild_writes_its_memberships_as_plain_rows(add_post, settings, monkeypatch):
    """A model instance per membership cost two minutes of a 1,000,000-image rebuild: the
    rebuild builds none (store.insert_rows), and the rows hold what the clustering found."""
    for index in range(30):
        add_post([f"g{index % 3}"], [index % 3], jitter=0.1)
    settings.IMAGETAGS = {**settings.IMAGETAGS, "CHUNK_SIZE": 7}  # several chunks
    for model in (ClusterMembership, TagFrequency):

        def no_instance(self, *args, real_init=model.__init__, name=model.__name__, **kwargs):
            if args or kwargs:  # rows read back from the database still become instances
                raise AssertionError(f"a rebuild must not build a {name} per row")
            real_init(self, *args, **kwargs)

        monkeypatch.setattr(model, "__init__", no_instance)
    cluster_set = rebuild_clusters(k=3)
    monkeypatch.undo()

    rows = list(
        ClusterMembership.objects.filter(cluster_set=cluster_set).values_list(
            "image_id", "cluster__index", "cluster__centroid", "similarity"
        )
    )
    assert sorted(r[0] for r in rows) == sorted(StockImage.objects.values_list("pk", flat=True))
    vectors_by_id = dict(StockImage.objects.values_list("pk", "vector"))
    for image_id, _index, centroid, similarity in rows:
        vector = vectors.from_bytes(vectors_by_id[image_id])
        assert similarity == pytest.approx(float(vector @ vectors.from_bytes(centroid)), abs=1e-5)
    sizes = dict(cluster_set.clusters.values_list("index", "size"))
    assert sorted(sizes.values()) == [10, 10, 10]
    assert {i: sum(1 for r in rows if r[1] == i) for i in sizes} == sizes
    # Three groups of ten one-image posts, each group with its own tag.
    assert sorted(cluster_set.clusters.values_list("tag_frequencies__post_count", flat=True)) == [
        10,
        10,
        10,
    ]


def test_streamed_and_in_memory_rebuilds_agree_on_separated_groups(add_post, settings):
    for index in range(60):
        add_post([f"g{index % 3}"], [index % 3], jitter=0.2)

    def groups(cluster_set) -> set[frozenset[int]]:
        members: dict[int, set[int]] = {}
        for image_id, cluster_id in ClusterMembership.objects.filter(
            cluster_set=cluster_set
        ).values_list("image_id", "cluster_id"):
            members.setdefault(cluster_id, set()).add(image_id)
        return {frozenset(ids) for ids in members.values()}

    in_memory = rebuild_clusters(k=3)
    settings.IMAGETAGS = {**settings.IMAGETAGS, "REBUILD_MEMORY_MB": 0.001, "CHUNK_SIZE": 7}
    streamed = rebuild_clusters(k=3)

    assert "streamed" not in in_memory.params and streamed.params["streamed"] is True
    assert groups(streamed) == groups(in_memory)
    assert len(groups(streamed)) == 3


def test_streamed_warm_start_keeps_the_active_centres(add_post, settings):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "REBUILD_MEMORY_MB": 0, "CHUNK_SIZE": 4}
    for axis in (0, 1) * 5:
        add_post(["t"], [axis])
    first = rebuild_clusters(k=2)
    add_post(["t"], [0])

    second = rebuild_clusters(warm_start=True)

    assert first.params["streamed"] is True and second.params["warm_start"] is True
    assert second.warm_started_from_id == first.pk
    assert second.k == 2 and second.n_images == 11
    assert sorted(second.clusters.values_list("size", flat=True)) == [5, 6]


# --- the extraction pipeline -------------------------------------------------------------------


class _ThreadRecordingExtractor(FeatureExtractor):
    """The configured extractor, noting which thread runs the model."""

    def __init__(self, real: FeatureExtractor) -> None:
        self.real = real
        self.threads: list[str] = []

    key = property(lambda self: self.real.key)
    dim = property(lambda self: self.real.dim)
    input_size = property(lambda self: self.real.input_size)

    def load(self) -> None:
        self.real.load()

    def prepare(self, image):  # noqa: ANN001, ANN201 - same signature as the base class
        return self.real.prepare(image)

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return self.real.embed_arrays(batch)


def _stored(ids: list[int]) -> dict[int, np.ndarray]:
    rows = StockImage.objects.filter(pk__in=ids).values_list("pk", "vector", "feature_status")
    return {pk: vectors.from_bytes(data) for pk, data, status in rows if status == "ready"}


@pytest.fixture
def no_auto_features(settings):
    # With real commits, saving an image would run its feature task at once (sync queue).
    settings.IMAGETAGS = {**settings.IMAGETAGS, "AUTO_FEATURES": False}


def test_outside_a_transaction_the_model_runs_in_its_own_thread(
    transactional_db, no_auto_features, make_post
):
    from imagetags.services.features import compute_features

    images = [make_post(["t"], pattern="noise", seed=i).images.get() for i in range(7)]
    broken = images[3]
    with open(broken.image.path, "wb") as fh:
        fh.write(b"not an image")
    ids = [image.pk for image in images]
    recording = _ThreadRecordingExtractor(get_extractor())
    done: list[int] = []

    summary = compute_features(ids, extractor=recording, batch_size=3, progress=done.append)

    assert set(recording.threads) == {"imagetags-embed_0"}  # three batches, one model thread
    assert len(recording.threads) == 3
    assert done == [3, 6, 7]  # progress after each stored batch, in order
    assert (summary.ready, summary.failed) == (6, 1)
    assert summary.errors[0][0] == broken.pk
    stored = _stored(ids)
    assert sorted(stored) == sorted(set(ids) - {broken.pk})
    # The same vectors as embedding each image alone in this thread.
    for image in images[:3]:
        with image.image.open("rb") as fh:
            alone = get_extractor().embed_batch([open_image(fh)[0]])[0]
        np.testing.assert_allclose(stored[image.pk], alone, atol=1e-5)


def test_inside_a_transaction_the_model_runs_in_the_calling_thread(make_post):
    from imagetags.services.features import compute_features

    ids = [make_post(["t"], pattern="noise", seed=i).images.get().pk for i in range(4)]
    recording = _ThreadRecordingExtractor(get_extractor())

    summary = compute_features(ids, extractor=recording, batch_size=2)

    assert recording.threads == [threading.current_thread().name] * 2
    assert summary.ready == 4


def test_the_batch_write_stores_every_column_like_a_save(
    transactional_db, no_auto_features, make_post
):
    from imagetags.services.features import compute_features

    image = make_post(["t"], pattern="noise").images.get()
    assert image.feature_status == "pending"
    compute_features([image.pk])

    image = StockImage.objects.get(pk=image.pk)
    assert image.feature_status == "ready" and image.feature_error == ""
    assert image.feature_attempts == 1 and image.features_updated is not None
    assert image.extractor_key == get_extractor().key
    assert vectors.from_bytes(image.vector).shape == (get_extractor().dim,)


# --- int8 export ---------------------------------------------------------------------------------

VGG64 = {"CLASS": "vgg16", "OPTIONS": {"weights": None, "pooling": "avg", "input_size": 64}}


def test_uint8_input_graph_applies_vgg16_preprocessing_exactly():
    from imagetags.services.extractors.quantize import build_uint8_input_model
    from imagetags.services.extractors.vgg16 import VGG16Extractor

    extractor = VGG16Extractor(weights=None, input_size=32, seed=3)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)

    in_graph = build_uint8_input_model(extractor).predict_on_batch(pixels.astype(np.float32))

    np.testing.assert_allclose(in_graph, extractor.embed_arrays(pixels), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_export_command_writes_a_model_that_agrees_with_fp32(make_post, settings, tmp_path):
    from imagetags.services.extractors import get_extractor
    from imagetags.services.extractors.tflite import TFLiteExtractor

    settings.IMAGETAGS = {**settings.IMAGETAGS, "EXTRACTOR": VGG64}
    colors = [(200, 30, 30), (30, 160, 40), (20, 40, 200), (230, 200, 40), (90, 90, 90)]
    for index in range(12):
        make_post(["t"], color=colors[index % 5], pattern="noise", seed=index, size=(80, 60))
    output = tmp_path / "models" / "vgg16_int8.tflite"

    from io import StringIO

    out = StringIO()
    call_command("export_int8_model", str(output), "--samples", "10", stdout=out, stderr=StringIO())

    text = out.getvalue()
    tensor = re.search(r"embedding tensor '([^']+)'", text).group(1)
    assert output.exists() and f'"tensor": "{tensor}"' in text
    fp32 = get_extractor()
    int8 = TFLiteExtractor(str(output), tensor=tensor)
    assert int8.dim == fp32.dim == 512 and int8.key != fp32.key
    images = []
    for image in StockImage.objects.order_by("pk")[:5]:
        from imagetags.images import open_image

        with image.image.open("rb") as fh:
            images.append(open_image(fh)[0])
    cosines = np.sum(fp32.embed_batch(images) * int8.embed_batch(images), axis=1)
    assert cosines.min() > 0.99, cosines
    # The vectors are not simply equal: this really is another (quantised) model.
    assert not np.allclose(fp32.embed_batch(images), int8.embed_batch(images), atol=1e-6)

    with pytest.raises(CommandError, match="exists; pass --force"):
        call_command("export_int8_model", str(output), stdout=StringIO())


def test_export_command_refuses_what_it_cannot_do(make_post, settings, tmp_path):
    settings.IMAGETAGS = {**settings.IMAGETAGS, "EXTRACTOR": VGG64}
    make_post(["t"], images=3)
    with pytest.raises(CommandError, match="The library has 3 images; at least 8"):
        call_command("export_int8_model", str(tmp_path / "m.tflite"))
    with pytest.raises(CommandError, match="--samples must be at least 8"):
        call_command("export_int8_model", str(tmp_path / "m.tflite"), "--samples", "2")
    with (
        override_settings(
            IMAGETAGS={"EXTRACTOR": {"CLASS": "tflite", "OPTIONS": {"model_path": __file__}}}
        ),
        pytest.raises(CommandError, match="Only VGG16 extractors can be exported"),
    ):
        call_command("export_int8_model", str(tmp_path / "m.tflite"))


def test_vgg16_load_traces_the_single_image_path():
    from imagetags.services.extractors.vgg16 import VGG16Extractor

    extractor = VGG16Extractor(weights=None, input_size=32, seed=5)
    extractor.load()
    # Traced at load, so a warmed-up process's first suggestion runs the compiled graph.
    assert extractor._model.predict_function is not None
