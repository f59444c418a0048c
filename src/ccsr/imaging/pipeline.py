"""[model] -> merge alpha: run any model on a :class:`DecodedImage` and bring the alpha along.

:func:`upscale` knows nothing about how the model reaches its size (reference 64-multiple resize, reflect
pad, tiles): it only requires the model's output to come back at one exact size, and upscales alpha to that
same size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from .decode import decode
from .encode import encode
from .errors import ImageError
from .output import check_quantize
from .pixels import resize_alpha, resize_float
from .security import DEFAULT_LIMITS, Limits, fit_scale
from .values import DEFAULT_ENCODE, DecodedImage, EncodedImage, EncodeOptions, UpscaledImage

_LANCZOS = Image.Resampling.LANCZOS


def _model_output(out: Any) -> tuple[np.ndarray, Image.Image | None]:
    """Accept the pipeline's result (``.final`` float + ``.image`` 8-bit), a bare PIL image or a float
    array."""
    image = getattr(out, "image", None)
    final = getattr(out, "final", None)
    if image is None and final is None:
        if isinstance(out, Image.Image):
            image = out
        elif isinstance(out, np.ndarray):
            final = out
    if final is None and image is None:
        raise ImageError("model_output", f"model returned {type(out).__name__}, not an image")
    if final is None:
        final = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    final = np.asarray(final, dtype=np.float32)
    if final.ndim != 3 or final.shape[2] != 3:
        raise ImageError("model_output", f"model output has shape {final.shape}, expected HxWx3")
    if image is not None and image.size != (final.shape[1], final.shape[0]):
        raise ImageError("model_output", f"model .image is {image.size}, .final is {final.shape[1::-1]}")
    return final, image


def upscale(
    decoded: DecodedImage,
    model: Callable[[Image.Image | np.ndarray], Any],
    *,
    quantize: str = "round",
) -> UpscaledImage:
    """Run ``model`` on ``decoded.rgb`` and merge the separately upscaled alpha back.

    ``quantize`` decides the 8-bit pixels: ``"round"`` rounds ``.final`` (default; never truncates),
    ``"dither"`` applies an ordered dither, ``"reference"`` keeps the model's own ``.image`` (the reference
    implementation's truncating quantisation, for bit-parity). A 16-bit source has no 8-bit reference: it
    always rounds.
    """
    check_quantize(quantize)
    final, image = _model_output(model(decoded.rgb))
    size = (final.shape[1], final.shape[0])
    reference8 = None
    if quantize == "reference" and image is not None and decoded.bit_depth == 8:
        reference8 = np.asarray(image.convert("RGB"), dtype=np.uint8)
    alpha = None if decoded.alpha is None else resize_alpha(decoded.alpha, size)
    return UpscaledImage(
        final=final,
        reference8=reference8,
        alpha=alpha,
        icc_profile=decoded.icc_profile,
        rgb_is_srgb=decoded.rgb_is_srgb,
        exif=decoded.exif,
        xmp=decoded.xmp,
        bit_depth=decoded.bit_depth,
        source_format=decoded.source_format,
        grayscale=decoded.grayscale,
        quantize=quantize,
        notes=decoded.notes,
    )


def shrink(decoded: DecodedImage, size: tuple[int, int]) -> DecodedImage:
    """Lanczos-shrink colour and alpha to ``size`` (used to fit the output cap before the model)."""
    if decoded.size == size:
        return decoded
    if isinstance(decoded.rgb, Image.Image):
        rgb = decoded.rgb.resize(size, _LANCZOS)
    else:
        rgb = np.clip(resize_float(decoded.rgb, size), 0.0, 1.0)
    alpha = None if decoded.alpha is None else resize_alpha(decoded.alpha, size)
    note = (
        f"input shrunk from {decoded.size[0]}x{decoded.size[1]} to {size[0]}x{size[1]} to fit the output cap"
    )
    return dataclasses.replace(decoded, rgb=rgb, alpha=alpha, notes=(*decoded.notes, note))


def upscale_bytes(
    data: bytes,
    model: Callable[[Image.Image | np.ndarray], Any],
    *,
    encode_options: EncodeOptions = DEFAULT_ENCODE,
    limits: Limits = DEFAULT_LIMITS,
    quantize: str = "round",
    scale: float | None = None,
) -> EncodedImage:
    """The whole chain: decode -> (shrink to fit the output cap) -> model -> merge alpha -> encode.

    ``scale`` (or a ``model.scale`` attribute) enables the Runware rule of shrinking the input first so that
    ``ceil(scale * size)`` fits ``limits.max_output_side``, and checks the model's output size against it.
    """
    decoded = decode(data, limits)
    scale = scale if scale is not None else getattr(model, "scale", None)
    expected = None
    if scale is not None:
        fit = fit_scale(decoded.size, float(scale), limits)
        if fit.shrink is not None:
            decoded = shrink(decoded, fit.input_size)
        expected = fit.output_size(float(scale))
    up = upscale(decoded, model, quantize=quantize)
    limits.check_output(up.size)
    if expected is not None and up.size != expected:
        raise ImageError("model_output", f"model returned {up.size}, expected {expected} for scale {scale}")
    return encode(up, encode_options)
