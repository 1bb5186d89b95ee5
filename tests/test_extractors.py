"""Feature extractors, run for real: VGG16 with seeded random weights, TFLite on the shared
MobileNetV2 file and on tiny models converted here. Nothing about the models is mocked."""

from __future__ import annotations

import hashlib
import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from django.core.exceptions import ImproperlyConfigured
from PIL import Image

from imagetags.services.extractors import (
    clear_extractor_cache,
    extractor_config_from_spec,
    get_extractor,
)
from imagetags.services.extractors.tflite import TFLiteExtractor
from imagetags.services.extractors.vgg16 import RandomWeightsWarning, VGG16Extractor
from tests.conftest import (
    FEEDME_MANIFEST,
    SHARED,
    TFLITE_MODEL,
    image_bytes,
    requires_feedme,
    requires_tflite_model,
)

FEEDME_IMAGES = SHARED / "data" / "feedme-dev" / "images"

# Every model built here has random weights on purpose; the warning is asserted once, below.
pytestmark = pytest.mark.filterwarnings(
    "ignore::imagetags.services.extractors.vgg16.RandomWeightsWarning"
)


def _images() -> list[Image.Image]:
    specs = [
        {"color": (200, 30, 30), "pattern": "noise", "seed": 1},
        {"color": (30, 30, 200), "pattern": "stripes", "size": (40, 56)},
        {"color": (20, 160, 60), "pattern": "noise", "seed": 2, "size": (64, 64)},
    ]
    return [Image.open(io.BytesIO(image_bytes(**spec))).convert("RGB") for spec in specs]


def _unit_norm(vectors: np.ndarray) -> bool:
    return bool(np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return _images()


@pytest.fixture(scope="module")
def vgg64() -> VGG16Extractor:
    return VGG16Extractor(weights=None, input_size=64)


@pytest.fixture(scope="module")
def vgg64_vectors(vgg64: VGG16Extractor, images: list[Image.Image]) -> np.ndarray:
    return vgg64.embed_batch(images)


# -- VGG16 -------------------------------------------------------------------------------------


def test_vgg16_random_vectors_are_unit_and_deterministic(images, vgg64, vgg64_vectors):
    assert vgg64_vectors.shape == (3, 512)
    assert vgg64_vectors.dtype == np.float32
    assert _unit_norm(vgg64_vectors)
    # A second instance with the same seed builds the same weights: same vectors.
    again = VGG16Extractor(weights=None, input_size=64, seed=0).embed_batch(images)
    np.testing.assert_allclose(again, vgg64_vectors, atol=1e-6)
    # Different images give different vectors.
    assert not np.allclose(vgg64_vectors[0], vgg64_vectors[1], atol=1e-4)


def test_vgg16_other_seed_changes_key_and_vectors(images, vgg64, vgg64_vectors):
    other = VGG16Extractor(weights=None, input_size=64, seed=1)
    assert other.key != vgg64.key
    assert "random-seed1" in other.key
    assert not np.allclose(other.embed_batch(images), vgg64_vectors, atol=1e-3)


def test_vgg16_at_224(images):
    extractor = VGG16Extractor(weights=None, input_size=224)
    vectors = extractor.embed_batch(images)
    assert vectors.shape == (3, 512)
    assert _unit_norm(vectors)
    assert extractor.key == "vgg16/random-seed0/block5_conv3/avg/224"


def test_vgg16_dim_is_known_without_loading():
    before = VGG16Extractor.loads
    flat = VGG16Extractor(weights=None, pooling="flatten", input_size=224)
    assert flat.dim == 14 * 14 * 512 == 100_352
    assert VGG16Extractor(weights=None, pooling="flatten", input_size=100).dim == 6 * 6 * 512
    assert VGG16Extractor(weights=None, pooling="max").dim == 512
    assert VGG16Extractor(weights=None, layer="block4_pool", pooling="flatten").dim == 14 * 14 * 512
    # imagenet never downloads here: key and dim come from the options alone.
    imagenet = VGG16Extractor()
    assert imagenet.key == "vgg16/imagenet/block5_conv3/avg/224"
    assert imagenet.dim == 512
    assert VGG16Extractor.loads == before


def test_vgg16_poolings_read_the_same_layer(vgg64, images):
    """max ≥ avg channel by channel, and the flattened map averages to the avg vector."""
    batch = np.stack([vgg64.prepare(image) for image in images])
    avg = vgg64.embed_arrays(batch)
    max_extractor = VGG16Extractor(weights=None, input_size=64, pooling="max")
    flat_extractor = VGG16Extractor(weights=None, input_size=64, pooling="flatten")
    assert flat_extractor.dim == (64 // 16) ** 2 * 512 == 8192
    maxed = max_extractor.embed_arrays(batch)
    flat = flat_extractor.embed_arrays(batch)
    assert maxed.shape == (3, 512) and flat.shape == (3, 8192)
    assert np.all(maxed >= avg - 1e-6)
    assert not np.allclose(maxed, avg, rtol=1e-2)
    np.testing.assert_allclose(flat.reshape(3, 16, 512).mean(axis=1), avg, rtol=1e-4, atol=1e-6)
    assert flat_extractor.embed_batch(images).shape == (3, 8192)
    assert "/flatten/64" in flat_extractor.key and "/max/64" in max_extractor.key


def test_vgg16_embed_arrays_runs_in_chunks(vgg64, images):
    batch = np.stack([vgg64.prepare(image) for image in images] * 3)
    whole = vgg64.embed_arrays(batch)
    chunked = VGG16Extractor(weights=None, input_size=64, max_batch=2)
    np.testing.assert_allclose(chunked.embed_arrays(batch), whole, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(n, 64, 64, 3\)"):
        vgg64.embed_arrays(batch[:, :32])


def test_vgg16_embed_batch_empty(vgg64):
    assert vgg64.embed_batch([]).shape == (0, 512)


def test_vgg16_random_weights_warning():
    with pytest.warns(RandomWeightsWarning, match="meaningless"):
        VGG16Extractor(weights=None, input_size=32, seed=3).load()


def test_registry_builds_one_instance_and_one_model_across_threads(images):
    config = {"CLASS": "vgg16", "OPTIONS": {"weights": None, "input_size": 32, "seed": 11}}
    clear_extractor_cache()
    try:
        first = get_extractor(config)
        assert get_extractor(dict(config)) is first
        before = VGG16Extractor.loads
        barrier = threading.Barrier(2)
        results: list[np.ndarray] = []
        errors: list[BaseException] = []

        def embed() -> None:
            try:
                barrier.wait()
                results.append(get_extractor(config).embed_batch(images))
            except BaseException as exc:  # surfaced below; a thread cannot fail the test
                errors.append(exc)

        threads = [threading.Thread(target=embed) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert VGG16Extractor.loads == before + 1
        np.testing.assert_allclose(results[0], results[1], atol=1e-6)
        first.embed_batch(images[:1])
        assert VGG16Extractor.loads == before + 1
    finally:
        clear_extractor_cache()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"pooling": "sum"}, ["pooling", "'sum'", "avg", "flatten"]),
        ({"input_size": 16}, ["input_size", "16", "32"]),
        ({"input_size": "224"}, ["input_size", "integer"]),
        ({"weights": "imagenett"}, ["weights", "'imagenett'", "file"]),
        ({"weights": 3}, ["weights", "None"]),
        ({"layer": "block6_conv1"}, ["layer", "block6_conv1", "block5_conv3"]),
        ({"seed": "zero"}, ["seed", "integer"]),
        ({"max_batch": 0}, ["max_batch", "positive"]),
    ],
)
def test_vgg16_bad_options(options, words):
    with pytest.raises(ImproperlyConfigured) as info:
        VGG16Extractor(**options)
    for word in words:
        assert word in str(info.value)


def test_vgg16_bad_options_through_registry():
    clear_extractor_cache()
    with pytest.raises(ImproperlyConfigured, match="pooling"):
        get_extractor({"CLASS": "vgg16", "OPTIONS": {"pooling": "mean"}})
    with pytest.raises(ImproperlyConfigured, match="colour"):
        get_extractor({"CLASS": "vgg16", "OPTIONS": {"colour": "red"}})


def test_vgg16_weights_file(tmp_path: Path, vgg64, vgg64_vectors, images):
    path = tmp_path / "vgg16-random.weights.h5"
    vgg64.save_weights(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    from_file = VGG16Extractor(weights=str(path), input_size=64)
    assert from_file.key == f"vgg16/file-{digest[:12]}/block5_conv3/avg/64"
    np.testing.assert_allclose(from_file.embed_batch(images), vgg64_vectors, atol=1e-6)
    # The key names the weights in memory: replacing the file does not change a loaded model's
    # key, while a new instance reading the new file gets a new one.
    path.write_bytes(b"not weights any more")
    assert from_file.key == f"vgg16/file-{digest[:12]}/block5_conv3/avg/64"
    replaced = VGG16Extractor(weights=path, input_size=64)
    assert replaced.key.startswith("vgg16/file-") and replaced.key != from_file.key
    with pytest.raises(ImproperlyConfigured, match="could not load weights"):
        replaced.load()


def test_vgg16_spec_round_trip(tmp_path: Path):
    assert extractor_config_from_spec("vgg16:random:max") == {
        "CLASS": "vgg16",
        "OPTIONS": {"weights": None, "pooling": "max"},
    }
    clear_extractor_cache()
    try:
        extractor = get_extractor(extractor_config_from_spec("vgg16:random:flatten"))
        assert isinstance(extractor, VGG16Extractor)
        assert extractor.key == "vgg16/random-seed0/block5_conv3/flatten/224"
    finally:
        clear_extractor_cache()


# -- TFLite: the shared MobileNetV2 --------------------------------------------------------------


@pytest.fixture(scope="module")
def mobilenet() -> TFLiteExtractor:
    return TFLiteExtractor(str(TFLITE_MODEL))


@requires_tflite_model
def test_tflite_finds_the_embedding(mobilenet):
    assert mobilenet.tensor_name == "MobilenetV2/Logits/AvgPool"
    assert mobilenet.dim == 1280
    assert mobilenet.input_size == 224


@requires_tflite_model
def test_tflite_key(mobilenet):
    digest = hashlib.sha256(TFLITE_MODEL.read_bytes()).hexdigest()
    assert mobilenet.key == f"tflite/{digest[:12]}/MobilenetV2/Logits/AvgPool/224"
    assert re.fullmatch(r"tflite/[0-9a-f]{12}/MobilenetV2/Logits/AvgPool/224", mobilenet.key)


@requires_tflite_model
@requires_feedme
def test_a_big_jpeg_decoded_in_draft_gives_the_full_decode_vector(mobilenet):
    """Phone-size JPEGs are decoded at 1/2-1/8 scale for the model (``open_image``'s
    ``draft_size``): the vector must stay the full decode's. Real photos, enlarged 4×."""
    photos = sorted((FEEDME_MANIFEST.parent / "images").glob("*.jpg"))[:8]
    drafted, full = [], []
    for path in photos:
        with Image.open(path) as photo:
            big = photo.convert("RGB").resize((photo.width * 4, photo.height * 4))
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=92)
        image = mobilenet.open_image(io.BytesIO(buffer.getvalue()))
        assert max(image.size) < max(big.size) // 2  # it was drafted
        drafted.append(image)
        full.append(big)
    cosines = np.sum(mobilenet.embed_batch(drafted) * mobilenet.embed_batch(full), axis=1)
    assert cosines.min() > 0.99, cosines


@requires_tflite_model
def test_tflite_batch_equals_single_calls(mobilenet, images):
    batch = mobilenet.embed_batch(images)
    assert batch.shape == (3, 1280)
    assert _unit_norm(batch)
    singles = np.concatenate([mobilenet.embed_batch([image]) for image in images])
    np.testing.assert_allclose(batch, singles, atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-2)


@requires_tflite_model
def test_tflite_explicit_tensor(mobilenet, images):
    explicit = TFLiteExtractor(TFLITE_MODEL, tensor="MobilenetV2/Logits/AvgPool")
    np.testing.assert_allclose(
        explicit.embed_batch(images), mobilenet.embed_batch(images), atol=1e-6
    )
    # The 7×7 feature map before the pool, averaged by the extractor: the same vector up to
    # the pool op's uint8 requantisation.
    feature_map = (
        "MobilenetV2/Conv_1/Relu6;MobilenetV2/Conv_1/add_fold;MobilenetV2/Conv_1/Conv2D_Fold;"
        "MobilenetV2/Conv_1/BatchNorm_Fold/bias"
    )
    pooled = TFLiteExtractor(TFLITE_MODEL, tensor=feature_map)
    assert pooled.dim == 1280
    assert pooled.key != mobilenet.key
    similarity = np.sum(pooled.embed_batch(images) * mobilenet.embed_batch(images), axis=1)
    assert np.all(similarity > 0.999)
    maxed = TFLiteExtractor(TFLITE_MODEL, tensor=feature_map, pooling="max")
    assert not np.allclose(maxed.embed_batch(images), pooled.embed_batch(images), atol=1e-3)


@requires_tflite_model
def test_tflite_unknown_tensor():
    extractor = TFLiteExtractor(TFLITE_MODEL, tensor="MobilenetV2/Logits/AvgPoll")
    with pytest.raises(ImproperlyConfigured) as info:
        extractor.load()
    message = str(info.value)
    assert "no tensor named 'MobilenetV2/Logits/AvgPoll'" in message
    assert "MobilenetV2/Logits/AvgPool" in message.split("Close names:")[1]


@requires_tflite_model
def test_tflite_through_registry_spec(mobilenet):
    clear_extractor_cache()
    try:
        spec = f"tflite:{TFLITE_MODEL}#MobilenetV2/Logits/AvgPool"
        extractor = get_extractor(extractor_config_from_spec(spec))
        assert isinstance(extractor, TFLiteExtractor)
        assert extractor is get_extractor(extractor_config_from_spec(spec))
        assert extractor.key == mobilenet.key
    finally:
        clear_extractor_cache()


@requires_tflite_model
@pytest.mark.shared_data
def test_tflite_same_photo_is_nearer_than_another_photo(mobilenet):
    photos = sorted(FEEDME_IMAGES.glob("*.jpg"))[:4] if FEEDME_IMAGES.is_dir() else []
    if len(photos) < 4:
        pytest.skip(f"needs four feedme-dev photos in {FEEDME_IMAGES}")
    with Image.open(photos[0]) as opened:
        photo = opened.convert("RGB")
    width, height = photo.size
    crop = photo.crop((width // 10, height // 10, width - width // 10, height - height // 10))
    small = photo.resize((width // 2, height // 2), Image.Resampling.LANCZOS)
    others = []
    for path in photos[1:]:
        with Image.open(path) as opened:
            others.append(opened.convert("RGB"))
    vectors = mobilenet.embed_batch([crop, small, *others])
    same = float(vectors[0] @ vectors[1])
    different = vectors[2:] @ vectors[:2].T
    assert same > float(different.max()) + 0.05, (same, different)


def test_tflite_missing_model_file(tmp_path: Path):
    missing = tmp_path / "nowhere" / "model.tflite"
    with pytest.raises(ImproperlyConfigured) as info:
        TFLiteExtractor(missing)
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_tflite_bad_options(tmp_path: Path):
    model = tmp_path / "model.tflite"
    model.write_bytes(b"\x00" * 64)
    with pytest.raises(ImproperlyConfigured, match="pooling='flatten'"):
        TFLiteExtractor(model, pooling="flatten")
    with pytest.raises(ImproperlyConfigured, match="num_threads"):
        TFLiteExtractor(model, num_threads=0)
    # Not a TFLite flatbuffer: refused when loaded, naming the file.
    with pytest.raises(ImproperlyConfigured, match="could not be loaded"):
        TFLiteExtractor(model).load()


# -- TFLite: tiny float models converted here ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    """A float classifier with a free batch dimension, and the same net without a classifier."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    feature_map = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="features")(inputs)
    embedding = keras.layers.GlobalAveragePooling2D(name="embedding")(feature_map)
    scores = keras.layers.Dense(5, activation="softmax", name="classifier")(embedding)
    folder = tmp_path_factory.mktemp("tflite")
    result = {"keras": keras.Model(inputs, embedding)}
    for name, outputs in (("classifier", scores), ("headless", embedding)):
        model = keras.Model(inputs, outputs)
        function = tf.function(
            model.call, input_signature=[tf.TensorSpec((None, 32, 32, 3), tf.float32)]
        )
        frozen = convert_variables_to_constants_v2(function.get_concrete_function())
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
        path = folder / f"{name}.tflite"
        path.write_bytes(converter.convert())
        result[name] = path
    return result


def test_tflite_float_model_matches_keras(tiny_models):
    extractor = TFLiteExtractor(tiny_models["classifier"], max_batch=4)
    assert "embedding" in extractor.tensor_name
    assert extractor.dim == 8 and extractor.input_size == 32
    pixels = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    raw = extractor.embed_arrays(pixels)
    # Float models get (x - 127.5) / 127.5; the Keras model on the same input is the reference.
    expected = tiny_models["keras"].predict_on_batch((pixels.astype(np.float32) - 127.5) / 127.5)
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-5)
    # This model takes real batches (10 = 4 + 4 + 2), and they agree with one-by-one calls.
    assert extractor.supports_batching is True
    singles = np.concatenate([extractor.embed_arrays(pixels[i : i + 1]) for i in range(10)])
    np.testing.assert_allclose(singles, raw, rtol=1e-5, atol=1e-6)
    other_scale = TFLiteExtractor(tiny_models["classifier"], mean=0.0, std=255.0)
    assert not np.allclose(other_scale.embed_arrays(pixels), raw, atol=1e-3)


def test_tflite_pools_a_feature_map(tiny_models):
    from ai_edge_litert.interpreter import Interpreter

    auto = TFLiteExtractor(tiny_models["classifier"])
    pixels = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    tensors = Interpreter(model_path=str(tiny_models["classifier"])).get_tensor_details()
    relu_name = next(t["name"] for t in tensors if "Relu" in t["name"] and len(t["shape"]) == 4)
    pooled = TFLiteExtractor(tiny_models["classifier"], tensor=relu_name)
    assert pooled.dim == 8
    np.testing.assert_allclose(pooled.embed_arrays(pixels), auto.embed_arrays(pixels), atol=1e-5)


def test_tflite_model_without_classifier_asks_for_a_tensor(tiny_models):
    from ai_edge_litert.interpreter import Interpreter

    with pytest.raises(ImproperlyConfigured) as info:
        TFLiteExtractor(tiny_models["headless"]).load()
    message = str(info.value)
    assert "tensor=" in message
    assert "FULLY_CONNECTED" in message
    # The candidates start with the model's own output, the pooled (1, 8) vector.
    output = Interpreter(model_path=str(tiny_models["headless"])).get_output_details()[0]
    candidates = message.split("tensors near the output:")[1]
    assert candidates.strip().startswith(f"{output['name']} (1, 8)")
