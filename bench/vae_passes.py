"""The lean VAE passes against diffusers' forward at real size (a benchmark, not a unit test).

Builds the real CCSR-v1 VAE decoder and condition encoder with random weights and runs each pass alternately,
diffusers first, on the same input, reporting time, process CPU split (user/system: page faults show as system
time) and peak RSS above the start of each call, and whether the outputs are bit-identical:

    python bench/vae_passes.py --size 512 --json bench/results/vae_passes_512.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from ccsr.bench import machine_info, peak_rss_mb, random_model, reset_peak_rss, rss_mb
from ccsr.vae import lean


def _measure(fn):  # type: ignore[no-untyped-def]
    base = rss_mb()
    reset_peak_rss()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return out, {"wall_s": wall, "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime,
                 "peak_above_start_mb": peak_rss_mb() - base}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (latent side = size / 8)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = random_model(None)
    enc, vae = model.cond_encoder.encoder, model.vae
    x = torch.rand(1, 3, a.size, a.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(1, 4, a.size // 8, a.size // 8, generator=torch.Generator().manual_seed(1))
    report: dict = {"header": machine_info(torch.device("cpu"), torch.float32), "size": a.size}
    with torch.inference_mode():
        enc(x[:, :, :64, :64])  # first-call set-up out of the figures
        for name, ref, new in (("encode", lambda: enc(x), lambda: lean.encode(enc, x)),
                               ("decode", lambda: vae.decode(z).sample, lambda: lean.vae_decode(vae, z))):
            want, diffusers = _measure(ref)
            got, lean_pass = _measure(new)
            report[name] = {"diffusers": diffusers, "lean": lean_pass, "bit_identical": bool(torch.equal(got, want)),
                            "max_abs_diff": float((got - want).abs().max())}
            del want, got
            print(f"{name} {a.size}x{a.size}: diffusers {diffusers['wall_s']:.2f} s (sys {diffusers['system_s']:.1f}),"
                  f" +{diffusers['peak_above_start_mb']:.0f} MiB | lean {lean_pass['wall_s']:.2f} s "
                  f"(sys {lean_pass['system_s']:.1f}), +{lean_pass['peak_above_start_mb']:.0f} MiB | "
                  f"bit-identical {report[name]['bit_identical']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
