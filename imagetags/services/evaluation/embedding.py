"""Embedding an image set with a real extractor, with an optional on-disk vector cache."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imagetags.images import InvalidImage, open_image
from imagetags.services.evaluation.data import ImageSet, Progress
from imagetags.services.extractors import FeatureExtractor
from imagetags.services.library import (
    Rejection,
)


class VectorCache:
    """Vectors by image SHA-256 for one extractor key, in ``<dir>/<key slug>-<hash>.npz``.

    Vectors depend only on the file's bytes and the extractor, so repeated runs (seeds, K sweeps)
    skip extraction. The key is stored in the file and checked, so a changed extractor never
    reads another one's vectors.
    """

    def __init__(self, directory: str | os.PathLike, extractor_key: str) -> None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", extractor_key).strip("-")[:60]
        digest = hashlib.sha256(extractor_key.encode()).hexdigest()[:16]
        self.path = Path(directory) / f"{slug}-{digest}.npz"
        self.key = extractor_key
        self.vectors: dict[str, np.ndarray] = {}
        self.dirty = False

    def load(self) -> None:
        if not self.path.exists():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["key"]) != self.key:
                    return
                self.vectors = dict(zip(data["sha256"].tolist(), data["vectors"], strict=True))
        except (OSError, ValueError, KeyError):
            self.vectors = {}  # unreadable or old format: rebuild it

    def save(self) -> None:
        if not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        sums = sorted(self.vectors)
        # Per-process temporary name: two sweeps sharing a cache must not write one file.
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            key=np.array(self.key),
            sha256=np.array(sums),
            vectors=np.stack([self.vectors[s] for s in sums]).astype(np.float32),
        )
        os.replace(tmp, self.path)  # readers never see half a file
        self.dirty = False


@dataclass
class EmbedResult:
    images: ImageSet  # the images that could be embedded, with ``vectors`` set
    rejected: list[Rejection]  # files ``open_image`` refused
    cache_hits: int


def embed_image_set(
    image_set: ImageSet,
    extractor: FeatureExtractor,
    *,
    cache: VectorCache | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
    full_decode: bool = False,
) -> EmbedResult:
    """Embed every image in batches; images found in ``cache`` are not even decoded.
    ``full_decode``: see :func:`evaluate`."""
    found: dict[int, np.ndarray] = {}
    if cache is not None:
        for index, sha256 in enumerate(image_set.sha256):
            if sha256 in cache.vectors:
                found[index] = cache.vectors[sha256]
    hits = len(found)
    todo = [index for index in range(len(image_set)) if index not in found]
    rejected: list[Rejection] = []
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch: list[int] = []
        images: list[Image.Image] = []
        for index in chunk:
            entry = image_set.entries[index]
            try:
                if full_decode:
                    image, _info = open_image(entry.file)
                else:
                    image = extractor.open_image(entry.file)
            except (InvalidImage, OSError) as exc:
                rejected.append(Rejection(entry.line, entry.path, str(exc)))
                continue
            batch.append(index)
            images.append(_shrunk(image, extractor))
        if batch:
            matrix = extractor.embed_batch(images)
            for index, vector in zip(batch, matrix, strict=True):
                found[index] = vector
                if cache is not None:
                    cache.vectors[image_set.sha256[index]] = vector
                    cache.dirty = True
        if progress is not None:
            progress(start + len(chunk), len(todo))
    keep = sorted(found)
    embedded = image_set.take(keep)
    embedded.vectors = (
        np.stack([found[index] for index in keep]).astype(np.float32)
        if keep
        else np.empty((0, extractor.dim), dtype=np.float32)
    )
    return EmbedResult(images=embedded, rejected=rejected, cache_hits=hits)


def _shrunk(image: Image.Image, extractor: FeatureExtractor) -> Image.Image:
    """The image at model input size, so a batch of large photos is not held at full size.

    ``embed_batch`` prepares it again, a no-op at that size, so the vector is the same
    (``features._decode`` does the same for stored images).
    """
    prepared = extractor.prepare(image)
    if isinstance(prepared, np.ndarray) and prepared.dtype == np.uint8 and prepared.ndim == 3:
        return Image.fromarray(prepared, "RGB")
    return image
