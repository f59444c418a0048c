"""Peak memory above the weights vs output size, with tiling on (a benchmark, not a unit test).

Each output size runs `ccsr bench` in a fresh process: the real CCSR-v1 architecture with random weights
(or ``--config`` for another architecture, e.g. the tiny fixture, to measure the pipeline's full-size buffers
quickly), diffusion tiles plus the tiled VAE, and as few steps as give the plan two network evaluations per
tile (S=3: one at T and one loop step; ``ccsr.sampling.schedule.truncated_plan``). Peak RSS is the process
high-water mark, reset after the model is built; "above weights" subtracts the RSS right after building.

    python bench/memory.py --outputs 512,1024 --json bench/results/memory_real.json
    python bench/memory.py --config tests/fixtures/ccsr_v1_tiny/model.yaml --outputs 1024,2048,4096

It prints one row per size and whether the peak above the weights grows with the output area.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import run_bench


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outputs", default="512,1024", help="square output sides, comma-separated")
    ap.add_argument("--scale", type=float, default=4.0, help="upscale factor; input side = output / scale")
    ap.add_argument("--steps", type=int, default=3, help="S (3 = two evaluations per tile)")
    ap.add_argument("--tile-size", type=int, help="diffusion tile, pixels (default: planned)")
    ap.add_argument("--tile-stride", type=int, help="diffusion stride, pixels (default: planned)")
    ap.add_argument("--tile-diffusion", default="auto", choices=["auto", "none", "mix", "gaussian"])
    ap.add_argument("--vae-tile", type=int, help="tiled VAE decoder tile, latent pixels (default: planned)")
    ap.add_argument(
        "--size-mode",
        default="pad",
        choices=["pad", "reference"],
        help="pad (default): process exactly the target rounded up to 64",
    )
    ap.add_argument("--output-type", default="np", choices=["np", "pil", "png", "jpg", "webp", "tiff"],
                    help="np: the float result; pil: only the 8-bit image; png/jpg/webp/tiff: the chain of "
                    "`ccsr upscale` and the server, rows streamed into the file's pixels, encode included")
    ap.add_argument("--config", help="architecture yaml (default: the built-in real-size CCSR-v1)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--extra", default="", help="more `ccsr bench` flags, space-separated")
    ap.add_argument("--json", help="write all reports and the table here")
    a = ap.parse_args()

    rows, reports = [], []
    for side in [int(s) for s in a.outputs.split(",") if s.strip()]:
        inp = max(1, round(side / a.scale))
        args = [
            "--size",
            f"{inp}x{inp}",
            "--scale",
            str(a.scale),
            "--steps",
            str(a.steps),
            "--seed",
            "0",
            "--tile-diffusion",
            a.tile_diffusion,
            *(["--tile-diffusion-size", str(a.tile_size)] if a.tile_size else []),
            *(["--tile-diffusion-stride", str(a.tile_stride)] if a.tile_stride else []),
            *(["--tile-vae", "--tile-vae-decoder-size", str(a.vae_tile)] if a.vae_tile else []),
            "--size-mode",
            a.size_mode,
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--output-type",
            a.output_type,
        ]
        if a.config:
            args += ["--config", a.config]
        if a.threads:
            args += ["--threads", str(a.threads)]
        args += a.extra.split()
        r = run_bench(args)
        reports.append(r)
        s, m = r["summary"], r["memory"]
        ow, oh = r["output_size"]
        rows.append(
            {
                "output": f"{ow}x{oh}",
                "mp": ow * oh / 1e6,
                "plan": r.get("plan"),
                "tiles": s["tiles"],
                "evaluations": s["evaluations"],
                "wall_s": s["wall_s"],
                "s_per_mp": s["wall_s"] / (ow * oh / 1e6),
                "eval_s": s["eval_s"],
                "decode_s": s["decode_s"],
                "weights_rss_mb": m["weights_rss_mb"],
                "peak_rss_mb": m["peak_rss_mb"],
                "above_weights_mb": m["peak_above_weights_mb"],
            }
        )
        _print(rows)
    base = rows[0]
    for row in rows:
        row["above_ratio"] = row["above_weights_mb"] / base["above_weights_mb"]
        row["area_ratio"] = row["mp"] / base["mp"]
    _print(rows)
    if len(rows) > 1:
        last = rows[-1]
        grows = last["above_ratio"] > 1.3
        print(
            f"peak above weights x{last['above_ratio']:.2f} for x{last['area_ratio']:.1f} the area: "
            f"{'GROWS with output area' if grows else 'bounded (within 1.3x)'}"
        )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"rows": rows, "reports": reports}, indent=1))
    return 0


def _print(rows: list[dict]) -> None:
    print(
        f"{'output':>10} {'tiles':>5} {'evals':>5} {'wall s':>8} {'s/MP':>8} {'eval s':>7} {'decode s':>8} "
        f"{'weights MB':>10} {'peak MB':>8} {'above MB':>8} {'ratio':>6}"
    )
    for r in rows:
        print(f"{r['output']:>10} plan: {r['plan']}")
        print(
            f"{r['output']:>10} {r['tiles']:>5} {r['evaluations']:>5} {r['wall_s']:>8.1f} "
            f"{r['s_per_mp']:>8.1f} {r['eval_s']:>7.2f} {r['decode_s']:>8.1f} {r['weights_rss_mb']:>10.0f} "
            f"{r['peak_rss_mb']:>8.0f} "
            f"{r['above_weights_mb']:>8.0f} {r.get('above_ratio', float('nan')):>6.2f}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
