"""TFLite backend: any TFLite image model file, read at its embedding tensor. Fully offline.

For an ordinary classification model the embedding is found automatically: it is the tensor that
feeds the classifier (the last FULLY_CONNECTED or CONV_2D before softmax/reshape), so
``IMAGETAGS_EXTRACTOR=tflite:/path/model.tflite`` works without knowing tensor names.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
import warnings
from typing import Any

import numpy as np
from django.core.exceptions import ImproperlyConfigured
from PIL import Image

from imagetags.services.extractors.base import FeatureExtractor, cached_file_sha256

logger = logging.getLogger(__name__)

POOLINGS = ("avg", "max")
# Ops between a classifier and the model's output that do not change what the classifier saw.
_PASS_THROUGH_OPS = {"SOFTMAX", "RESHAPE", "SQUEEZE", "DEQUANTIZE", "QUANTIZE", "LOGISTIC"}
_CLASSIFIER_OPS = {"FULLY_CONNECTED", "CONV_2D"}


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older installs ship only TensorFlow's copy of the same runtime
        from tensorflow.lite import Interpreter
    return Interpreter


class TFLiteExtractor(FeatureExtractor):
    """Runs a TFLite image model and returns one of its intermediate tensors as the vector.

    ``tensor``: name of the embedding tensor; ``None`` finds the one feeding the classifier.
    Tensors with spatial dimensions left are pooled (``pooling``: ``avg`` or ``max``).
    Quantized models (uint8/int8 input) get raw RGB pixels, as their input quantization already
    encodes the normalisation they were trained with; float models get ``(x - mean) / std``
    (default: MobileNet's [-1, 1]).
    ``max_batch``: images per invocation when the model accepts a batch dimension other than 1.
    """

    backend = "tflite"

    def __init__(
        self,
        model_path: str | os.PathLike,
        tensor: str | None = None,
        num_threads: int | None = None,
        pooling: str = "avg",
        mean: float = 127.5,
        std: float = 127.5,
        max_batch: int = 32,
    ) -> None:
        if not isinstance(model_path, str | os.PathLike) or not os.fspath(model_path):
            raise ImproperlyConfigured(
                f"TFLite extractor option model_path={model_path!r} must be a file path."
            )
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise ImproperlyConfigured(
                f"TFLite model file {model_path!r} does not exist (option model_path). Point it "
                "at a .tflite file readable on every web and worker machine."
            )
        if pooling not in POOLINGS:
            raise ImproperlyConfigured(
                f"TFLite extractor option pooling={pooling!r} is not supported; "
                f"use one of {', '.join(POOLINGS)}."
            )
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ImproperlyConfigured(
                f"TFLite extractor option num_threads={num_threads!r} must be a positive integer."
            )
        if not std:
            raise ImproperlyConfigured("TFLite extractor option std must not be zero.")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ImproperlyConfigured(
                f"TFLite extractor option max_batch={max_batch!r} must be a positive integer."
            )
        self.model_path = model_path
        self.tensor = tensor
        self.num_threads = num_threads
        self.pooling = pooling
        self.mean = float(mean)
        self.std = float(std)
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._interpreter: Any = None
        self._digest: str | None = None
        self._tensor_name = ""
        self._tensor_index = -1
        self._tensor_shape: tuple[int, ...] = ()
        self._tensor_quant: tuple[float, int] = (0.0, 0)
        self._input: dict[str, Any] = {}
        self._batched: bool | None = None  # None: not tried yet
        self._batch_size = 1

    # -- identity --------------------------------------------------------------------------

    @property
    def key(self) -> str:
        self.load()
        return f"tflite/{self._digest[:12]}/{self._tensor_name}/{self.input_size}"

    @property
    def dim(self) -> int:
        self.load()
        # NHWC feature maps are pooled to their channels; anything else is flattened.
        return int(self._tensor_shape[-1]) if len(self._tensor_shape) == 4 else self._flat_dim

    @property
    def _flat_dim(self) -> int:
        return int(np.prod(self._tensor_shape[1:]))

    @property
    def input_size(self) -> int:  # type: ignore[override]  # read from the model
        self.load()
        return int(self._input["shape"][1])

    @property
    def decode_size(self) -> int:
        self.load()
        return int(max(self._input["shape"][1], self._input["shape"][2]))

    @property
    def tensor_name(self) -> str:
        """Name of the embedding tensor, given or found."""
        self.load()
        return self._tensor_name

    @property
    def supports_batching(self) -> bool | None:
        """Whether the model ran batches larger than 1: None until one was tried."""
        return self._batched

    # -- model -----------------------------------------------------------------------------

    def load(self) -> None:
        if self._interpreter is not None:
            return
        with self._lock:
            if self._interpreter is None:
                self._load()

    def _new_interpreter(self) -> Any:
        Interpreter = _interpreter_class()
        try:
            # preserve_all_tensors: the embedding is an intermediate tensor, whose memory the
            # runtime would otherwise reuse for later ops before we could read it. That costs
            # every activation of one forward pass (a few MB for MobileNet), which is why the
            # runtime warns "for debugging only"; here it is the point, so the warning is muted.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*experimental_preserve_all_tensors")
                return Interpreter(
                    model_path=self.model_path,
                    num_threads=self.num_threads,
                    experimental_preserve_all_tensors=True,
                )
        except (ValueError, RuntimeError) as exc:
            raise ImproperlyConfigured(
                f"TFLite model file {self.model_path!r} could not be loaded: {exc}"
            ) from exc

    def _load(self) -> None:
        interpreter = self._new_interpreter()
        inputs = interpreter.get_input_details()
        if len(inputs) != 1 or len(inputs[0]["shape"]) != 4 or inputs[0]["shape"][3] != 3:
            raise ImproperlyConfigured(
                f"TFLite model {self.model_path!r} is not an RGB image model: expected one input "
                f"of shape (1, height, width, 3), got {[list(i['shape']) for i in inputs]}."
            )
        details = {t["index"]: t for t in interpreter.get_tensor_details()}
        if self.tensor is None:
            # The op graph must be read before allocate_tensors(): the default XNNPACK delegate
            # then replaces the ops with opaque DELEGATE nodes.
            index = _find_embedding(interpreter, details, self.model_path)
        else:
            index = _tensor_by_name(details, self.tensor, self.model_path)
        interpreter.allocate_tensors()
        tensor = details[index]
        self._tensor_index = index
        self._tensor_name = tensor["name"]
        self._tensor_shape = tuple(int(d) for d in tensor["shape"])
        scale, zero_point = tensor["quantization"]
        self._tensor_quant = (float(scale), int(zero_point))
        if len(self._tensor_shape) < 2 or self._flat_dim < 1:
            raise ImproperlyConfigured(
                f"Tensor {self._tensor_name!r} of {self.model_path!r} has shape "
                f"{list(self._tensor_shape)}; an embedding needs at least (1, features)."
            )
        self._input = inputs[0]
        self._digest = cached_file_sha256(self.model_path)
        self._batched = None
        self._batch_size = 1
        self._interpreter = interpreter
        logger.info("Loaded feature extractor %s", self.key)

    # -- inference -------------------------------------------------------------------------

    def prepare(self, image: Image.Image) -> np.ndarray:
        self.load()
        height, width = int(self._input["shape"][1]), int(self._input["shape"][2])
        if height == width:
            return super().prepare(image)
        from imagetags.images import to_rgb

        rgb = to_rgb(image) if image.mode != "RGB" else image
        resized = rgb.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(resized, dtype=np.uint8)

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        self.load()
        expected = tuple(int(d) for d in self._input["shape"][1:])
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(
                f"Expected a (n, {', '.join(map(str, expected))}) batch for {self.key}, "
                f"got {batch.shape}."
            )
        inputs = self._to_input(batch)
        out = np.empty((len(batch), self.dim), dtype=np.float32)
        # One interpreter per process; its tensors are shared state, so invocations take turns.
        with self._lock:
            start = 0
            while start < len(inputs):
                chunk = inputs[start : start + self.max_batch]
                if len(chunk) > 1 and self._batched is not False and self._resize(len(chunk)):
                    out[start : start + len(chunk)] = self._invoke(chunk)
                    start += len(chunk)
                else:
                    if self._batch_size != 1:
                        self._resize(1)
                    out[start] = self._invoke(chunk[:1])[0]
                    start += 1
        return out

    def _to_input(self, batch: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self._input["dtype"])
        if dtype == np.uint8:
            return np.ascontiguousarray(batch, dtype=np.uint8)
        if dtype == np.int8:
            # int8 models take the uint8 pixel range shifted by 128 (zero point -128).
            return (batch.astype(np.int16) - 128).astype(np.int8)
        if dtype.kind == "f":
            return ((batch.astype(np.float32) - self.mean) / self.std).astype(dtype)
        raise ImproperlyConfigured(
            f"TFLite model {self.model_path!r} takes {dtype} input; only uint8, int8 and "
            "float models are supported."
        )

    def _resize(self, n: int) -> bool:
        """Make the interpreter take batches of ``n``; False (and batch 1) if the model refuses.

        Many models bake batch 1 into a RESHAPE (MobileNetV2 reshapes logits to (1, 1001)), which
        only shows when tensors are allocated, so the first refusal is remembered.
        """
        if n == self._batch_size:
            return True
        interpreter = self._interpreter
        shape = [n, *(int(d) for d in self._input["shape"][1:])]
        try:
            interpreter.resize_tensor_input(self._input["index"], shape, strict=False)
            interpreter.allocate_tensors()
            ok = interpreter.get_tensor(self._tensor_index).shape[0] == n
        except (ValueError, RuntimeError) as exc:
            logger.info("%s runs at batch size 1 (%s)", self.model_path, exc)
            ok = False
        if ok:
            self._batched = self._batched or n > 1
            self._batch_size = n
            return True
        # A failed allocation can leave the interpreter unusable: start again at batch 1.
        if n != 1:
            self._batched = False
        interpreter = self._new_interpreter()
        interpreter.allocate_tensors()
        self._interpreter = interpreter
        self._batch_size = 1
        return n == 1

    def _invoke(self, chunk: np.ndarray) -> np.ndarray:
        interpreter = self._interpreter
        interpreter.set_tensor(self._input["index"], chunk)
        interpreter.invoke()
        raw = interpreter.get_tensor(self._tensor_index)
        scale, zero_point = self._tensor_quant
        values = (raw.astype(np.float32) - zero_point) * scale if scale else raw.astype(np.float32)
        n = len(chunk)
        if values.ndim == 4 and values.shape[1] * values.shape[2] > 1:
            # A feature map, not a vector: pool its positions (NHWC).
            values = values.mean(axis=(1, 2)) if self.pooling == "avg" else values.max((1, 2))
        return values.reshape(n, -1)


def _tensor_by_name(details: dict[int, dict], name: str, model_path: str) -> int:
    for index, tensor in details.items():
        if tensor["name"] == name:
            return index
    names = [t["name"] for t in details.values()]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
    raise ImproperlyConfigured(
        f"TFLite model {model_path!r} has no tensor named {name!r} (option tensor)."
        + (f" Close names: {', '.join(close)}." if close else "")
    )


def _find_embedding(interpreter: Any, details: dict[int, dict], model_path: str) -> int:
    """Index of the tensor feeding the classifier: walk back from the output through
    pass-through ops to the first FULLY_CONNECTED / CONV_2D and take its data input."""
    ops = interpreter._get_ops_details()
    producer = {int(out): op for op in ops for out in op["outputs"]}
    index = int(interpreter.get_output_details()[0]["index"])
    seen: set[int] = set()
    while index in producer and index not in seen:
        seen.add(index)
        op = producer[index]
        if op["op_name"] in _CLASSIFIER_OPS:
            return int(op["inputs"][0])
        if op["op_name"] not in _PASS_THROUGH_OPS:
            break
        index = int(op["inputs"][0])
    # Not a plain classifier: show the last few activations (tensors some op produces).
    candidates = [
        f"{details[i]['name']} {tuple(int(d) for d in details[i]['shape'])}"
        for i in sorted(producer, key=lambda i: -int(producer[i]["index"]))
        if i in details and len(details[i]["shape"]) >= 2
    ][:5]
    raise ImproperlyConfigured(
        f"Could not find the embedding tensor of TFLite model {model_path!r}: no "
        "FULLY_CONNECTED or CONV_2D classifier feeds its output. Pass tensor='<name>' in the "
        f"extractor OPTIONS; tensors near the output: {'; '.join(candidates) or 'none'}."
    )
