"""Turning the image inputs callers have into request bytes and RGB pictures."""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageInput", "encode_image", "load_image"]

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""Anything :func:`encode_image` and :func:`load_image` accept."""

_ACCEPTED = (
    "a file path (str or os.PathLike), encoded image bytes (bytes, bytearray, memoryview), "
    "a PIL.Image.Image, or an HxWx3 uint8 numpy array"
)

# Modes Pillow's PNG encoder writes as they are; others are converted first.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


def _check_array(array: np.ndarray) -> None:
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or 0 in array.shape:
        raise ValueError(
            f"image array has shape {array.shape} and dtype {array.dtype}; "
            "required: shape (H, W, 3) with H, W >= 1 and dtype uint8 (RGB)"
        )


def _png_bytes(image: Image.Image) -> bytes:
    # PNG carries no EXIF orientation here, so bake the orientation into the
    # pixels; otherwise the server would see the unrotated image while
    # load_image (used for overlays) sees the rotated one.
    image = ImageOps.exif_transpose(image)
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_image(image: ImageInput) -> bytes:
    """Return the bytes to send as ``ExplainRequest.image``.

    Args:
        image: one of
            - a path (``str`` or ``os.PathLike``): the file's bytes, unchanged;
            - ``bytes``/``bytearray``/``memoryview``: the bytes, unchanged
              (any format Pillow reads; the server decodes them);
            - a ``PIL.Image.Image``: encoded losslessly as PNG, with its EXIF
              orientation applied to the pixels; modes PNG cannot store
              (e.g. CMYK, F) are converted to RGB first;
            - a numpy array of shape (H, W, 3), dtype uint8, RGB: encoded as PNG.

    Returns:
        Encoded image bytes.

    Raises:
        TypeError: ``image`` is none of the accepted kinds.
        ValueError: an array of another shape or dtype.
        OSError: a path that cannot be read.
    """
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as file:
            return file.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        return _png_bytes(image)
    if isinstance(image, np.ndarray):
        _check_array(image)
        return _png_bytes(Image.fromarray(image))
    raise TypeError(f"image must be {_ACCEPTED}; got {type(image).__name__}")


def load_image(image: ImageInput) -> Image.Image:
    """Decode ``image`` the way the server does: EXIF orientation applied, RGB.

    Args:
        image: anything :func:`encode_image` accepts.

    Returns:
        A new RGB ``PIL.Image.Image`` (the input is not modified); its size is
        the size the server reports as ``image_size``.

    Raises:
        TypeError: ``image`` is none of the accepted kinds.
        ValueError: an array of another shape or dtype, or bytes/a file Pillow
            cannot decode.
        OSError: a path that cannot be read.
    """
    if isinstance(image, Image.Image):
        decoded = image
    elif isinstance(image, np.ndarray):
        _check_array(image)
        decoded = Image.fromarray(image)
    else:
        data = encode_image(image)
        try:
            decoded = Image.open(io.BytesIO(data))
            decoded.load()
        # Pillow reports unreadable and truncated data as OSError subclasses.
        except OSError as err:
            raise ValueError(f"cannot decode image: {err}") from err
    return ImageOps.exif_transpose(decoded).convert("RGB")
