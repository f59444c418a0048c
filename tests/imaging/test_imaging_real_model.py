"""The real (tiny, random-weight) CCSRPipeline through the whole imaging chain, once: sizes, alpha,
profile and the reference bytes survive end to end, and a 16-bit input stays 16-bit through the float path.

Pad mode keeps the processing size at the next 64 px multiple (the reference mode raises it to 512 px), so
this stays a few seconds on a CPU. The ``tiny_pipeline`` fixture comes from tests/conftest.py."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ccsr.imaging import EncodeOptions, decode, upscale_bytes
from ccsr.imaging.highdepth import write_png16
from ccsr.params import UpscaleParams

from .corpus import display_p3_icc, exif_with_orientation, save, soft_rgba


def test_tiny_pipeline_through_upscale_bytes(tiny_pipeline):
    params = UpscaleParams(scale=2, steps=6, seed=7, size_mode="pad")
    calls = []

    def model(rgb):
        out = tiny_pipeline.run(rgb, params)
        calls.append((rgb, out))
        return out

    src = soft_rgba(64, 48)  # RGBA with soft edges, stored sideways (orientation 6) with a Display P3 profile
    data = save(
        src.transpose(Image.Transpose.ROTATE_90),
        "PNG",
        icc_profile=display_p3_icc(),
        exif=exif_with_orientation(6),
    )
    out = upscale_bytes(data, model, scale=2, encode_options=EncodeOptions("PNG"), quantize="reference")
    res = Image.open(io.BytesIO(out.data))
    assert (out.width, out.height) == res.size == (128, 96)  # ceil(2 x 64x48), upright
    assert res.mode == "RGBA" and res.info.get("icc_profile") == display_p3_icc()
    alpha = np.asarray(res)[..., 3]
    assert alpha[48, 64] == 255 and alpha[0, 0] == 0
    assert len(calls) == 1 and isinstance(calls[0][0], Image.Image) and calls[0][0].size == (64, 48)

    # With an sRGB source and no alpha, "reference" output bytes are exactly the pipeline's own image.
    plain = save(src.convert("RGB"), "PNG")
    out = upscale_bytes(plain, model, scale=2, encode_options=EncodeOptions("PNG"), quantize="reference")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.data))), np.asarray(calls[-1][1].image))
    assert decode(out.data).size == (128, 96)

    # 16-bit in: the pipeline gets float32, the output is a 16-bit PNG.
    a16 = (np.asarray(src.convert("RGB"), dtype=np.uint16) * 257 + 7).astype(np.uint16)
    out = upscale_bytes(write_png16(a16), model, scale=2, encode_options=EncodeOptions("PNG"))
    assert isinstance(calls[-1][0], np.ndarray) and calls[-1][0].dtype == np.float32
    back = decode(out.data)
    assert back.bit_depth == 16 and back.size == (128, 96)
