"""Would batching diffusion tiles help? One network evaluation per tile at batch 1, 2, 4 ... (a benchmark).

Tiled sampling evaluates the UNet + ControlNet once per window and step, each window alone. This times
``CCSRDenoiser`` (the sampler's epsilon model: ControlNet + UNet, as the pipeline calls them) on a batch of B
tiles of the planner's default size (64x64 latent = 512x512 pixels) at real size with random weights, rounds
alternating the batch sizes so that a noisy machine spreads evenly, and reports wall time (and process CPU time
on the CPU) per tile, plus how far a batched tile's output is from the same tile evaluated alone:

    python bench/tile_batch.py --batches 1,2,4 --rounds 2 --json bench/results/tile_batch_cpu.json
    python bench/tile_batch.py --device cuda --dtype float16 --batches 1,2,4,8 --rounds 5

Batching would be worth building into the sampler only where the per-tile time falls clearly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ccsr.bench import machine_info, random_model
from ccsr.pipeline import parse_dtype
from ccsr.sampling.denoiser import CCSRDenoiser


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latent", type=int, default=64, help="tile side in latent pixels (64 = 512 px)")
    ap.add_argument("--batches", default="1,2,4", help="batch sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds over all batch sizes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    ap.add_argument("--json")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = parse_dtype(a.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    batches = [int(b) for b in a.batches.split(",")]

    model = random_model(None).to(device, dtype, dtype)
    gen = torch.Generator().manual_seed(0)
    side = a.latent
    condition = torch.rand(1, 3, side * 8, side * 8, generator=gen).to(device)
    denoiser = CCSRDenoiser(model.unet, model.controlnet, model.cond_encoder, lambda _w: condition,
                            model.text.encode("").to(device, dtype))
    x = torch.randn(max(batches), 4, side, side, generator=gen).to(device)
    report: dict = {"header": machine_info(device, dtype), "latent": side, "batches": batches, "rounds": []}

    with torch.inference_mode():
        alone = denoiser(x[:1], 500, None).float()  # also the warm-up (and the hint, cached for every call)
        diffs = {}
        for b in batches:  # the batched tile vs alone; also each batch shape's first (untimed) call
            diffs[b] = float((denoiser(x[:b], 500, None)[:1].float() - alone).abs().max()) if b > 1 else 0.0
        times: dict[int, list[float]] = {b: [] for b in batches}
        cpu: dict[int, list[float]] = {b: [] for b in batches}
        for r in range(a.rounds):
            for b in batches if r % 2 == 0 else batches[::-1]:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                denoiser(x[:b], 500, None)
                sync()
                times[b].append((time.perf_counter() - t0) / b)
                cpu[b].append((time.process_time() - c0) / b)
                print(f"round {r + 1}: batch {b}: {times[b][-1]:.3f} s per tile", flush=True)
    base = statistics.median(times[batches[0]])
    for b in batches:
        row = {"batch": b, "s_per_tile": times[b], "median_s_per_tile": statistics.median(times[b]),
               "speedup_vs_first": base / statistics.median(times[b]), "max_abs_diff_vs_alone": diffs[b]}
        if not cuda:
            row["cpu_s_per_tile"] = cpu[b]
        report["rounds"].append(row)
        print(f"batch {b}: median {row['median_s_per_tile']:.3f} s per tile, x{row['speedup_vs_first']:.2f} "
              f"vs batch {batches[0]}, max |diff| vs alone {diffs[b]:.2e}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
