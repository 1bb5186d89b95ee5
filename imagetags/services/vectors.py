"""Feature vectors as the site stores them: the codec of ``core.vectors`` with the site's
``VECTOR_DTYPE`` setting applied when writing.

The codec itself (both stored formats, decoding many rows at once, normalisation) is in
:mod:`imagetags.core.vectors`, free of Django, so the offline evaluation and the benchmarks use the
same code; this module only adds what needs the settings.
"""

from __future__ import annotations

import numpy as np

from imagetags.core import vectors as codec
from imagetags.core.vectors import (
    FLOAT16_DTYPE,
    FLOAT16_MARKER,
    STORAGE_DTYPES,
    VECTOR_DTYPE,
    from_bytes,
    is_float16,
    l2_normalize,
    stack,
    stored_dim,
)

__all__ = [
    "FLOAT16_DTYPE",
    "FLOAT16_MARKER",
    "STORAGE_DTYPES",
    "VECTOR_DTYPE",
    "from_bytes",
    "is_float16",
    "l2_normalize",
    "stack",
    "storage_dtype",
    "stored_dim",
    "to_bytes",
]


def storage_dtype() -> str:
    """The ``VECTOR_DTYPE`` setting, checked: ``"float32"`` or ``"float16"``."""
    from django.core.exceptions import ImproperlyConfigured

    from imagetags.conf import imagetags_settings

    value = imagetags_settings.VECTOR_DTYPE
    if value not in STORAGE_DTYPES:
        raise ImproperlyConfigured(
            f"IMAGETAGS['VECTOR_DTYPE'] = {value!r} is not supported; use "
            f"{' or '.join(repr(d) for d in STORAGE_DTYPES)}."
        )
    return value


def to_bytes(vector: np.ndarray, dtype: str | None = None) -> bytes:
    """The stored form of one vector, in ``dtype`` (default: the ``VECTOR_DTYPE`` setting)."""
    return codec.to_bytes(vector, dtype or storage_dtype())
