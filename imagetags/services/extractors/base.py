"""The feature-extractor interface every backend implements."""

from __future__ import annotations

import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# (path, mtime_ns, size) -> sha256 hex. Model files are tens of MB and keys are read often (every
# stored vector names one), so each version of a file is hashed once per process.
_digests: dict[tuple[str, int, int], str] = {}
_digests_lock = threading.Lock()


def cached_file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a model or weights file, recomputed only when its mtime or size changes."""
    path = os.path.abspath(os.fspath(path))
    stat = os.stat(path)
    cache_key = (path, stat.st_mtime_ns, stat.st_size)
    with _digests_lock:
        digest = _digests.get(cache_key)
    if digest is None:
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
        with _digests_lock:
            _digests[cache_key] = digest
    return digest


class FeatureExtractor(ABC):
    """Turns RGB images into fixed-length vectors.

    Subclasses load their model lazily (on the first ``embed_batch`` or an explicit ``load()``) and
    keep it for the life of the process; the registry hands out one instance per configuration.
    """

    #: Short backend name used at the front of the key ("vgg16", "tflite").
    backend: str = ""
    #: Side of the square model input, in pixels.
    input_size: int = 224

    @property
    @abstractmethod
    def key(self) -> str:
        """A string naming everything that changes the vectors (backbone, weights, layer,
        pooling, input size). Vectors with different keys are never compared."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of the vectors ``embed_batch`` returns."""

    @abstractmethod
    def load(self) -> None:
        """Load the model now (idempotent). Called by warm-up hooks and by ``embed_batch``."""

    @abstractmethod
    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Embed a (n, size, size, 3) uint8 RGB batch already resized by ``prepare``.

        Returns raw (not normalised) float32 features of shape (n, dim).
        """

    @property
    def decode_size(self) -> int:
        """The side a decoded image must keep for ``prepare`` (the model input's longer side)."""
        return self.input_size

    def open_image(self, source: Any) -> Image.Image:
        """Open and check an image file for this model: ``images.open_image``, with JPEGs
        decoded at the smallest DCT scale that keeps both sides at least ``decode_size``.

        Every path that embeds a file (features, suggestions, evaluation, the int8 export) opens
        it here, so a photo gets the same vector whichever path embeds it.
        """
        from imagetags.images import open_image

        image, _info = open_image(source, draft_size=self.decode_size)
        return image

    def prepare(self, image: Image.Image) -> np.ndarray:
        """Resize an RGB image to the model input: (size, size, 3) uint8.

        The whole image is squashed to a square, as the patent feeds 224×224×3 images; cropping
        would drop content that carries tags.
        """
        from imagetags.images import to_model_input

        return to_model_input(image, self.input_size)

    def embed_batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB PIL images; returns L2-normalised float32 vectors, shape (n, dim)."""
        from imagetags.services.vectors import l2_normalize

        if not images:
            return np.empty((0, self.dim), dtype=np.float32)
        batch = np.stack([self.prepare(image) for image in images])
        return l2_normalize(self.embed_arrays(batch))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key}>"
