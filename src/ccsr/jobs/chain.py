"""[decoded image] -> CCSRPipeline.run -> the output file's pixels -> encode: the chain behind ``ccsr upscale``,
the server's jobs and ``ccsr bench --output-type png``.

The pipeline hands its rows straight to :class:`ccsr.imaging.OutputPixels` as they are decoded, so no full-size
float image is held: what stays is the file's integer pixels.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ccsr import imaging
from ccsr.params import UpscaleParams

if TYPE_CHECKING:
    from ccsr.pipeline import CCSRPipeline, UpscaleOutput


def upscale_encode(
    pipe: CCSRPipeline,
    decoded: imaging.DecodedImage,
    params: UpscaleParams,
    options: imaging.EncodeOptions,
    *,
    quantize: str = "round",
    expected: tuple[int, int] | None = None,
    keep_float: bool = False,
    **run: Any,
) -> tuple[imaging.EncodedImage, UpscaleOutput]:
    """Upscale ``decoded`` and encode it; ``run`` goes to :meth:`CCSRPipeline.run` (progress, cancel, log).

    ``expected``: the size the caller promised (refused before any work if the plan gives another).
    ``keep_float``: also return the float result (``UpscaleOutput.processed``), which is then held whole.
    ``quantize="reference"`` (8-bit sources) writes the pipeline's own 8-bit image: the reference's bytes.
    """
    target = pipe.plan(decoded.size, params).geometry.target
    if expected is not None and target != expected:
        raise imaging.ImageError("model_output", f"the upscale gives {target}, expected {expected}")
    out = imaging.OutputPixels(decoded, target, options, quantize=quantize)
    if not keep_float and not out.takes_model_bytes:
        result = pipe.run(decoded.rgb, params, output_type=out, **run)
    else:
        result = pipe.run(decoded.rgb, params, output_type="np" if keep_float else "pil", **run)
        if out.takes_model_bytes:
            assert result.image is not None
            out.write_image(result.image)
        else:
            assert result.final is not None
            out.write(0, result.final)
    t = time.perf_counter()
    encoded = imaging.encode_pixels(out)
    result.timings["encode"] = time.perf_counter() - t
    return encoded, result
