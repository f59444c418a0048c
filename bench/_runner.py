"""Shared helper of the bench/ scripts: run one `ccsr bench` in a fresh process and return its JSON report.

A fresh process per configuration keeps peak-RSS figures independent (no allocator state carried over).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_bench(args: list[str], *, log: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "ccsr.cli", "bench", *args, "--json", str(out)]
        if log:
            print("$ ccsr bench " + " ".join(args), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=None if log else subprocess.DEVNULL, text=True
        )
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"ccsr bench failed ({proc.returncode}): {' '.join(args)}")
        report = json.loads(out.read_text())
        report["command"] = "ccsr bench " + " ".join(args)
        report["process_wall_s"] = time.perf_counter() - t0
        if log:
            print(proc.stdout, file=sys.stderr, flush=True)
        return report
