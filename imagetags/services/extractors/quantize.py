"""Post-training int8 quantisation of the VGG16 extractor into a TFLite model file.

The exported model takes uint8 RGB pixels (what the ``tflite`` backend feeds quantised models),
applies VGG16's own preprocessing inside the graph (RGB→BGR and the ImageNet channel means, as a
fixed 1×1 convolution, which quantises exactly), runs VGG16 up to the extractor's layer and pools
it the same way. Activations are calibrated on a *representative sample of the site's own
library*, so the int8 ranges fit the photos the site actually has.

Use it through the ``tflite`` backend with the tensor name :func:`export_int8` returns::

    IMAGETAGS = {"EXTRACTOR": {"CLASS": "tflite",
                               "OPTIONS": {"model_path": "/srv/models/vgg16_int8.tflite",
                                           "tensor": "<printed by export_int8_model>"}}}

The vectors are close to, not identical with, the fp32 ones (docs/performance.md measures how
close), so the extractor key changes and stored vectors are recomputed (``compute_features
--stale``) before ``rebuild_clusters``.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from imagetags.services.extractors.vgg16 import VGG16Extractor

# keras.applications.vgg16.preprocess_input ("caffe" mode): BGR order, minus these means.
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)

#: Smallest calibration sample accepted: fewer images give activation ranges that clip.
MIN_SAMPLES = 8


class QuantizationError(Exception):
    """The model could not be exported. The message says what to change."""


@dataclass(frozen=True)
class ExportResult:
    path: str
    tensor: str  # name of the embedding tensor, for the tflite backend's ``tensor`` option
    dim: int
    input_size: int
    samples: int  # images the activations were calibrated on
    size_bytes: int
    seconds: float

    def extractor_config(self, num_threads: int | None = None) -> dict[str, Any]:
        """The ``IMAGETAGS["EXTRACTOR"]`` setting that serves this model.

        ``num_threads`` defaults to this machine's cores: TFLite runs one thread unless told,
        which halves its speed on two cores (measured: 13.9 vs 27.7 images/s).
        """
        options = {
            "model_path": self.path,
            "tensor": self.tensor,
            "num_threads": num_threads or os.cpu_count() or 1,
        }
        return {"CLASS": "tflite", "OPTIONS": options}


def build_uint8_input_model(extractor: VGG16Extractor) -> Any:
    """A Keras model from uint8-valued RGB pixels (as float) to the extractor's pooled vector.

    Same numbers as ``extractor.embed_arrays`` (which preprocesses in NumPy), with the
    preprocessing moved into the graph as a 1×1 convolution: output channel ``c`` takes input
    channel ``2 - c`` with weight 1 and adds ``-mean[c]``.
    """
    import keras

    extractor.load()
    size = extractor.input_size
    kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
    for out_channel in range(3):
        kernel[0, 0, 2 - out_channel, out_channel] = 1.0
    bias = -np.asarray(IMAGENET_BGR_MEANS, dtype=np.float32)
    inputs = keras.Input((size, size, 3), name="rgb")
    to_bgr = keras.layers.Conv2D(3, 1, name="imagetags_vgg16_preprocess", trainable=False)
    pooled = extractor._model(to_bgr(inputs))
    to_bgr.set_weights([kernel, bias])
    return keras.Model(inputs, pooled, name="imagetags_vgg16_uint8")


def export_int8(
    extractor: VGG16Extractor,
    representative: Iterable[np.ndarray],
    path: str | os.PathLike,
    *,
    progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Quantise ``extractor`` to a full-integer (int8) TFLite model at ``path``.

    ``representative``: (size, size, 3) uint8 RGB arrays of the site's own images (``prepare``d),
    at least :data:`MIN_SAMPLES`; 100–300 is plenty. Weights are int8 per channel, activations
    int8 with ranges calibrated on them; the input is uint8 pixels and the output float32, so
    the ``tflite`` backend reads the vector with no extra scaling.
    """
    import tensorflow as tf

    started = time.perf_counter()
    size = extractor.input_size
    samples = [np.asarray(array, dtype=np.uint8) for array in representative]
    if len(samples) < MIN_SAMPLES:
        raise QuantizationError(
            f"Only {len(samples)} representative images; at least {MIN_SAMPLES} are needed "
            "(100 or more recommended) so that int8 activation ranges do not clip."
        )
    for array in samples:
        if array.shape != (size, size, 3):
            raise QuantizationError(
                f"Representative images must be ({size}, {size}, 3) uint8 arrays (use the "
                f"extractor's prepare()), got {array.shape}."
            )
    model = build_uint8_input_model(extractor)

    def dataset() -> Iterator[list[np.ndarray]]:
        for n, array in enumerate(samples, start=1):
            yield [array[None].astype(np.float32)]
            if progress is not None:
                progress(n)

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    # Integer kernels only: a float fallback would hide an op that silently runs at fp32 speed.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.float32
    try:
        with warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": the uint8 input's range is the
            # pixel range, set by inference_input_type; nothing is missing.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            flatbuffer = converter.convert()
    except Exception as exc:  # converter errors are long MLIR dumps: keep the first line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizationError(f"TFLite conversion failed: {first_line}") from exc

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Written next to the target and renamed: a worker loading the model never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tflite.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(flatbuffer)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    tensor, dim = _output_tensor(path)
    return ExportResult(
        path=os.path.abspath(path),
        tensor=tensor,
        dim=dim,
        input_size=size,
        samples=len(samples),
        size_bytes=os.path.getsize(path),
        seconds=time.perf_counter() - started,
    )


def _output_tensor(path: str) -> tuple[str, int]:
    from imagetags.services.extractors.tflite import _interpreter_class

    interpreter = _interpreter_class()(model_path=path)
    output = interpreter.get_output_details()[0]
    return str(output["name"]), int(np.prod(output["shape"][1:]))
