"""Decoding the wire format of ``explain.v1.Float32Tensor``."""

from __future__ import annotations

import math

import numpy as np

from explain_api import explain_pb2

__all__ = ["decode_float32_tensor"]


def decode_float32_tensor(tensor: explain_pb2.Float32Tensor) -> np.ndarray:
    """Decode a ``Float32Tensor`` message into a numpy array.

    Args:
        tensor: ``shape`` (int64 dims) and ``data`` (prod(shape) little-endian
            IEEE-754 float32 values, row-major).

    Returns:
        A read-only float32 array of ``tuple(tensor.shape)``, in native byte order.

    Raises:
        ValueError: a negative dimension, or ``len(data) != 4 * prod(shape)``.
    """
    shape = tuple(int(n) for n in tensor.shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"Float32Tensor has a negative dimension in shape {shape}")
    expected = 4 * math.prod(shape)
    if len(tensor.data) != expected:
        raise ValueError(f"Float32Tensor data has {len(tensor.data)} bytes; shape {shape} needs {expected}")
    array = np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32, copy=False)
    # On big-endian hosts astype made a writable copy; keep the result read-only either way.
    array.flags.writeable = False
    return array
