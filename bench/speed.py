"""Speed baseline and variants at real model size (a benchmark, not a unit test).

Runs `ccsr bench` once per variant, each in a fresh process, on the same input and parameters, and tabulates
time per network evaluation (ControlNet + UNet), per hint encode, per decode and per image:

    python bench/speed.py                                  # 256->512, S=3 (2 evaluations), fp32, 2 threads
    python bench/speed.py --variants base,channels_last --steps 6 --json bench/results/speed.json

Variants: ``base`` (as shipped), ``channels_last`` (networks converted to channels_last memory format),
``compile`` (``torch.compile`` of the UNet and ControlNet; one warm-up run compiles, the timed run follows).
Extra `ccsr bench` flags for all variants go in ``--extra``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import run_bench

VARIANTS = {"base": [], "channels_last": ["--channels-last"], "compile": ["--compile", "--warmup", "1"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--scale", default="2")
    ap.add_argument("--steps", default="3")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--variants", default="base,channels_last")
    ap.add_argument("--repeat", default="1")
    ap.add_argument("--config")
    ap.add_argument("--extra", default="")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows, reports = [], []
    for name in a.variants.split(","):
        args = [
            "--size",
            a.size,
            "--scale",
            a.scale,
            "--steps",
            a.steps,
            "--seed",
            "0",
            "--device",
            a.device,
            "--dtype",
            a.dtype,
            "--repeat",
            a.repeat,
            *VARIANTS[name],
            *a.extra.split(),
        ]
        if a.device == "cpu":
            args += ["--threads", a.threads]
        if a.config:
            args += ["--config", a.config]
        r = run_bench(args)
        reports.append(r)
        s = r["summary"]
        rows.append(
            {
                "variant": name,
                "eval_s": s["eval_s"],
                "eval_s_min": min(x["eval_s_min"] for x in r["runs"]),
                "hint_encode_s": s["hint_encode_s"],
                "decode_s": s["decode_s"],
                "wall_s": s["wall_s"],
                "peak_rss_mb": r["memory"]["peak_rss_mb"],
                "load_avg": r["header"]["load_avg"],
            }
        )
    print(
        f"{'variant':>14} {'eval s':>8} {'min':>8} {'hint s':>8} {'decode s':>8} {'wall s':>8} "
        f"{'peak MB':>8}  load"
    )
    for r in rows:
        print(
            f"{r['variant']:>14} {r['eval_s']:>8.2f} {r['eval_s_min']:>8.2f} {r['hint_encode_s']:>8.2f} "
            f"{r['decode_s']:>8.2f} {r['wall_s']:>8.1f} {r['peak_rss_mb']:>8.0f}  {r['load_avg']}"
        )
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"rows": rows, "reports": reports}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
