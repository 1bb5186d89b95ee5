"""VGG16 backbone (the patent's choice): the ``block5_conv3`` layer, pooled in the graph.

TensorFlow and Keras are imported inside methods only, so importing this module (for settings,
checks or the registry) costs nothing; the model is built on first use, once per instance, and the
registry keeps one instance per configuration, so once per process.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any

import numpy as np
from django.core.exceptions import ImproperlyConfigured

from imagetags.services.extractors.base import FeatureExtractor, cached_file_sha256

logger = logging.getLogger(__name__)

POOLINGS = ("avg", "max", "flatten")
MIN_INPUT_SIZE = 32  # five 2×2 poolings: anything smaller leaves block5 with no pixels

# Channels and downsampling factor of every VGG16 feature layer, so that ``dim`` is known without
# building the model (callers size arrays and database checks from it before any image arrives).
_LAYERS: dict[str, tuple[int, int]] = {}
for _block, (_channels, _convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
    for _conv in range(1, _convs + 1):
        _LAYERS[f"block{_block + 1}_conv{_conv}"] = (_channels, 2**_block)
    _LAYERS[f"block{_block + 1}_pool"] = (_channels, 2 ** (_block + 1))


class RandomWeightsWarning(UserWarning):
    """A VGG16 extractor runs with random weights: its suggestions carry no meaning."""


class VGG16Extractor(FeatureExtractor):
    """Keras VGG16 without its classifier, read at ``layer`` and pooled to a vector.

    ``weights``: ``"imagenet"`` (Keras downloads the file once to its cache), the path of a local
    weights file (``.weights.h5``, or a Keras 2 ``.h5`` such as
    ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``) for machines without internet, or
    ``None`` for seeded random weights, which only tests should use.
    ``pooling``: ``avg`` (512-d), ``max`` (512-d) or ``flatten`` (every position: 100,352-d at
    224, the patent's literal choice).
    ``max_batch``: images per forward pass; larger batches are run in chunks so that bulk work
    does not hold gigabytes of activations (default: 16 at 224, more for smaller inputs).
    """

    backend = "vgg16"
    #: Models built by any instance in this process; tests read it to prove caching works.
    loads: int = 0

    def __init__(
        self,
        weights: str | os.PathLike | None = "imagenet",
        pooling: str = "avg",
        input_size: int = 224,
        seed: int = 0,
        layer: str = "block5_conv3",
        max_batch: int | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ImproperlyConfigured(
                f"VGG16 extractor option pooling={pooling!r} is not supported; "
                f"use one of {', '.join(POOLINGS)}."
            )
        if isinstance(input_size, bool) or not isinstance(input_size, int):
            raise ImproperlyConfigured(
                f"VGG16 extractor option input_size={input_size!r} must be an integer (e.g. 224)."
            )
        if input_size < MIN_INPUT_SIZE:
            raise ImproperlyConfigured(
                f"VGG16 extractor option input_size={input_size} is too small: VGG16 halves the "
                f"image five times, so it needs at least {MIN_INPUT_SIZE} pixels (224 is standard)."
            )
        if layer not in _LAYERS:
            raise ImproperlyConfigured(
                f"VGG16 extractor option layer={layer!r} is not a VGG16 feature layer; "
                f"use one of {', '.join(_LAYERS)}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ImproperlyConfigured(f"VGG16 extractor option seed={seed!r} must be an integer.")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise ImproperlyConfigured(
                f"VGG16 extractor option max_batch={max_batch!r} must be a positive integer."
            )
        if weights is not None and weights != "imagenet":
            if not isinstance(weights, str | os.PathLike):
                raise ImproperlyConfigured(
                    f"VGG16 extractor option weights={weights!r} is not supported; use "
                    "'imagenet', the path of a weights file, or None (random, tests only)."
                )
            weights = os.fspath(weights)
            if not os.path.isfile(weights):
                raise ImproperlyConfigured(
                    f"VGG16 extractor option weights={weights!r} is neither 'imagenet' nor an "
                    "existing weights file (None gives random weights, for tests only)."
                )
        self.weights: str | None = weights
        self.pooling = pooling
        self.input_size = input_size
        self.seed = seed
        self.layer = layer
        self.max_batch = max_batch or max(1, min(256, 16 * 224 * 224 // (input_size**2)))
        self._model: Any = None
        self._backbone: Any = None
        self._loaded_digest: str | None = None
        self._lock = threading.Lock()

    # -- identity --------------------------------------------------------------------------

    @property
    def weights_tag(self) -> str:
        """``imagenet``, ``random-seed<N>`` or ``file-<first 12 hex of the file's sha256>``."""
        if self.weights is None:
            return f"random-seed{self.seed}"
        if self.weights == "imagenet":
            return "imagenet"
        # Once loaded, the key names the bytes actually in memory, even if the file is replaced.
        digest = self._loaded_digest or cached_file_sha256(self.weights)
        return f"file-{digest[:12]}"

    @property
    def key(self) -> str:
        return f"vgg16/{self.weights_tag}/{self.layer}/{self.pooling}/{self.input_size}"

    @property
    def dim(self) -> int:
        channels, factor = _LAYERS[self.layer]
        if self.pooling == "flatten":
            side = self.input_size // factor
            return side * side * channels
        return channels

    # -- model -----------------------------------------------------------------------------

    def load(self) -> None:
        if self._model is not None:
            return
        with self._lock:
            if self._model is None:  # another thread may have built it while we waited
                self._build()

    def _build(self) -> None:
        import keras

        size = self.input_size
        digest = None
        if self.weights is None:
            message = (
                f"VGG16 feature extractor uses random weights (seed {self.seed}): tag suggestions "
                "will be meaningless. Use weights='imagenet' or a weights file outside tests."
            )
            warnings.warn(message, RandomWeightsWarning, stacklevel=3)
            logger.warning(message)
            backbone = keras.applications.VGG16(
                include_top=False, weights=None, input_shape=(size, size, 3)
            )
            backbone.set_weights(_seeded_weights(backbone, self.seed))
        else:
            if self.weights != "imagenet":
                digest = cached_file_sha256(self.weights)
            try:
                backbone = keras.applications.VGG16(
                    include_top=False, weights=self.weights, input_shape=(size, size, 3)
                )
            except Exception as exc:  # download or file errors: say what to do instead
                hint = (
                    "Keras could not download the ImageNet weights; on a machine without "
                    "internet, set weights to the path of a local VGG16 weights file."
                    if self.weights == "imagenet"
                    else "Is it a VGG16 weights file saved by Keras (.weights.h5 or .h5)?"
                )
                raise ImproperlyConfigured(
                    f"VGG16 extractor could not load weights={self.weights!r}: {exc}. {hint}"
                ) from exc
        features = backbone.get_layer(self.layer).output
        pool_layer = {
            "avg": keras.layers.GlobalAveragePooling2D,
            "max": keras.layers.GlobalMaxPooling2D,
            "flatten": keras.layers.Flatten,
        }[self.pooling](name=f"imagetags_{self.pooling}")
        model = keras.Model(backbone.input, pool_layer(features), name="imagetags_vgg16")
        # One forward pass now: the first call traces the graph (~0.1–1 s), and a warmed-up
        # process (WARM_UP, warm_up()) must not leave that to the first suggestion request.
        model.predict_on_batch(np.zeros((1, size, size, 3), dtype=np.float32))
        self._backbone = backbone
        self._loaded_digest = digest
        self._model = model
        type(self).loads += 1
        logger.info("Loaded feature extractor %s", self.key)

    def save_weights(self, path: str | os.PathLike) -> None:
        """Write the backbone's weights to ``path`` (``.weights.h5``).

        Run once where Keras can download the ImageNet weights, then point ``weights`` at the
        file on machines without internet: the vectors are identical.
        """
        self.load()
        self._backbone.save_weights(os.fspath(path))

    # -- inference -------------------------------------------------------------------------

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        from keras.applications.vgg16 import preprocess_input

        size = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (size, size, 3):
            raise ValueError(
                f"Expected a (n, {size}, {size}, 3) batch for {self.key}, got {batch.shape}."
            )
        self.load()
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        for start in range(0, len(batch), self.max_batch):
            chunk = batch[start : start + self.max_batch]
            # A fresh float32 copy: preprocess_input flips RGB→BGR and subtracts ImageNet means
            # in place, and the caller's uint8 batch must stay untouched.
            inputs = preprocess_input(chunk.astype(np.float32))
            out[start : start + len(chunk)] = np.asarray(self._model.predict_on_batch(inputs))
        return out


def _seeded_weights(model: Any, seed: int) -> list[np.ndarray]:
    """Glorot-uniform kernels and zero biases (Keras' defaults) drawn from NumPy's PCG64.

    Drawn here rather than through ``keras.utils.set_random_seed`` so that the same seed gives
    the same vectors whatever the Keras/TensorFlow version (the key promises that), and so that
    building a test model does not reseed the process-wide ``random``/NumPy/TF generators.
    """
    rng = np.random.default_rng(seed)
    weights = []
    for variable in model.weights:
        shape = tuple(variable.shape)
        if len(shape) == 4:  # conv kernel (h, w, in, out)
            receptive = shape[0] * shape[1]
            limit = float(np.sqrt(6.0 / (receptive * shape[2] + receptive * shape[3])))
            weights.append((rng.random(shape, dtype=np.float32) * 2 - 1) * limit)
        else:
            weights.append(np.zeros(shape, dtype=np.float32))
    return weights
