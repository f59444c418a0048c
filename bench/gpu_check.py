"""GPU readiness in one run (at most ~8 minutes on one H100): parity, half precision at real size, memory, time.

1. Every CCSR-v1 golden case (tests/fixtures/ccsr_v1_tiny) on the device in float32 with TF32 off: PSNR and
   largest difference of the processed image against the reference's ``output_float.npy``.
2. The real CCSR-v1 architecture with random weights (as ``ccsr bench``), in float16 and bfloat16, at 512x512 and
   2048x2048 output (tiling planned as for a user): time per image (after one warm-up upscale), peak allocated
   memory, and a second, checked upscale with a NaN/Inf count on the output of every module of every network, on
   every sampler step (eps, predicted x0, next x) and on the result.

``--quick`` runs the same code on tiny sizes (two parity cases; the tiny architecture at 64 and 128 px) so that it
can be tried on a CPU. Writes JSON to ``--json`` or ``$OUT/gpu_check.json``; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from tests.core.test_parity import CASES, case_params, resolve  # noqa: E402

from ccsr.bench import machine_info, random_model  # noqa: E402
from ccsr.params import UpscaleParams  # noqa: E402
from ccsr.pipeline import CCSRPipeline  # noqa: E402
from ccsr.sampling.ccsr_v1 import StepRecord  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "ccsr_v1_tiny"
PARITY_PSNR = 60.0  # dB, the CPU parity tests' bar


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def parity(device: torch.device, cases: list[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The golden cases in float32 with TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pipe = CCSRPipeline.from_single_file(FIXTURES / "model.safetensors", FIXTURES / "model.yaml", device=device,
                                         dtype="float32")
    rows = []
    for name in cases:
        meta = json.loads((FIXTURES / name / "case.json").read_text())
        image = Image.open(FIXTURES / "inputs" / meta["args"]["input"]).convert("RGB")
        t = time.perf_counter()
        out = pipe.run(image, case_params(meta["args"]))
        ref = np.load(resolve(FIXTURES / name, "output_float.npy"))
        row = {"case": name, "psnr_db": psnr(out.processed, ref),
               "max_abs": float(np.abs(out.processed - ref).max()), "seconds": time.perf_counter() - t}
        row["ok"] = row["psnr_db"] >= PARITY_PSNR
        log(f"parity {name}: {row['psnr_db']:.1f} dB, max {row['max_abs']:.2e} ({row['seconds']:.1f} s)")
        rows.append(row)
    return rows


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a module's output (tensors, tuples, lists, diffusers' output dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for item in obj for t in _tensors(item)]
    return []


class NonFiniteCounter:
    """Counts NaN/Inf values in the outputs of every module of the given networks, on the device (no sync per
    call), and in the sampler's per-step tensors."""

    def __init__(self, networks: dict[str, torch.nn.Module], device: torch.device):
        self.counts = {name: torch.zeros((), dtype=torch.long, device=device) for name in [*networks, "sampler"]}
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, net in networks.items() for module in net.modules()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            for t in _tensors(output):
                if t.is_floating_point():
                    self.counts[name] += (~torch.isfinite(t)).sum()

        return hook

    def step(self, rec: StepRecord) -> None:
        for t in (rec.eps, rec.pred_x0, rec.x_next):
            if t is not None:
                self.counts["sampler"] += (~torch.isfinite(t)).sum()

    def finish(self) -> dict[str, int]:
        for h in self.handles:
            h.remove()
        return {name: int(c.item()) for name, c in self.counts.items()}


def real_size(device: torch.device, dtypes: list[str], outputs: list[int], config: str | None, steps: int,
              size_mode: str, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Random-weight upscales per dtype and output size: warm-up, timed run, checked run."""
    model = random_model(config)
    rows = []
    for dtype in dtypes:
        pipe = CCSRPipeline(model, device=device, dtype=dtype)
        log(f"{dtype}: networks in {({k: str(v) for k, v in pipe.descriptor.network_dtypes(pipe.dtype).items()})}")
        for side in outputs:
            rng = np.random.default_rng(side)
            image = Image.fromarray(rng.integers(0, 256, (side // 4, side // 4, 3), dtype=np.uint8))
            params = UpscaleParams(scale=4, steps=steps, seed=233, size_mode=size_mode)
            if side == outputs[0]:
                pipe.run(image, params)  # warm-up: kernel selection, allocator
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            out = pipe.run(image, params)
            sync(device)
            seconds = time.perf_counter() - t
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            counter = NonFiniteCounter(pipe.model.networks(), device)
            checked = pipe.run(image, params, on_step=counter.step)
            nonfinite = counter.finish()
            nonfinite["result"] = int((~np.isfinite(checked.processed)).sum())
            row = {"dtype": dtype, "output": list(out.image.size), "plan": out.plan.describe() if out.plan else None,
                   "evaluations": out.evaluations, "seconds_per_image": seconds,
                   "peak_allocated_mib": None if peak is None else peak / 2**20, "timings": out.timings,
                   "nonfinite": nonfinite, "ok": not any(nonfinite.values())}
            log(f"{dtype} {side}x{side}: {seconds:.2f} s, peak "
                f"{'-' if peak is None else f'{peak / 2**20:.0f} MiB'}, {out.evaluations} evaluations, "
                f"non-finite {nonfinite}")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run on any device)")
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--json", help="output file (default $OUT/gpu_check.json when $OUT is set)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    out_path = a.json or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)

    def log(msg: str) -> None:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(device, torch.float32), "quick": a.quick}
    cases = ["case_a_adain", "case_d_tiled_mix"] if a.quick else CASES
    report["parity"] = parity(device, cases, log)
    if a.quick:  # the tiny architecture, padded (no upsizing to 512): seconds on a CPU
        report["real_size"] = real_size(device, ["float16", "bfloat16"], [64, 128], str(FIXTURES / "model.yaml"),
                                        min(a.steps, 4), "pad", log)
    else:
        report["real_size"] = real_size(device, ["float16", "bfloat16"], [512, 2048], None, a.steps, "reference",
                                        log)
    report["seconds"] = time.perf_counter() - t0
    report["ok"] = all(r["ok"] for r in report["parity"] + report["real_size"])
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(report, indent=1, default=str))
        log(f"wrote {out_path}")
    log(f"{'all checks passed' if report['ok'] else 'CHECKS FAILED'} in {report['seconds']:.0f} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
