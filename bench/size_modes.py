"""Measure the two size modes (issue 3, item 7): ``reference`` (resize to a multiple of 64, Lanczos back) against
``pad`` (reflect-pad, crop; no second resampling).

Two figures per input:
* ``roundtrip``: PSNR of the reference geometry applied to an identity model (prepare -> resize back) against the
  bicubic-upscaled input itself: the detail that the resampling chain alone costs. ``pad`` is lossless here (inf).
* ``pad_vs_ref``: PSNR between the two modes' outputs with the tiny fixture model (same seed), for scale.

Usage: python bench/size_modes.py [--fixtures DIR] [--steps 6]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ccsr.geometry import finish, plan_geometry, prepare, resize, to_float
from ccsr.params import UpscaleParams
from ccsr.pipeline import CCSRPipeline


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[1] / "tests/fixtures/ccsr_v1_tiny"))
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    fx = Path(a.fixtures)
    pipe = CCSRPipeline.from_single_file(fx / "model.safetensors", config=fx / "model.yaml", device="cpu")
    lq = Image.open(fx / "inputs" / "lq_64x64.png").convert("RGB")
    inputs = {
        "lq_48x40": Image.open(fx / "inputs" / "lq_48x40.png").convert("RGB"),
        "lq_64x64": lq,
        "photo_600x420": lq.resize((600, 420), Image.Resampling.BICUBIC),  # above 512: no auto-resize
    }
    print(f"{'input':>14} {'scale':>5} {'process(ref)':>13} {'roundtrip dB':>12} {'pad_vs_ref dB':>13}")
    for name, img in inputs.items():
        for scale in (2, 3, 4):
            g = plan_geometry(img.size, scale)
            target = to_float(resize(img, g.target, Image.Resampling.BICUBIC))
            _, back = finish(prepare(img, g), g)  # identity model through the reference geometry
            rt = psnr(back, target)
            pad_vs_ref = float("nan")
            if max(g.process) <= 1024:
                p = UpscaleParams(scale=scale, steps=a.steps, seed=1)
                ref = pipe.run(img, p).final
                pad = pipe.run(img, p.replace(size_mode="pad")).final
                pad_vs_ref = psnr(pad, ref)
            print(f"{name:>14} {scale:>5} {g.process!s:>13} {rt:>12.2f} {pad_vs_ref:>13.2f}")


if __name__ == "__main__":
    main()
