"""``ccsr eval`` with CCSR-v2 (the tiny fixture, through the CLI in a subprocess): the loaded model's defaults (its
one-step preset) or ``--preset`` fill every parameter no flag gives, as ``ccsr upscale`` does, so each saved result
is ``ccsr upscale``'s image for the same flags and seed (``--exact``: eval scores the pipeline's own 8-bit image, the
reference's truncated bytes, where ``upscale`` rounds by default)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccsr.presets import V2_PRESETS

REPO = Path(__file__).resolve().parents[2]
V2 = REPO / "tests" / "fixtures" / "ccsr_v2_tiny"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
MODEL = ["--weights", str(V2 / "model"), "--device", "cpu", "--dtype", "float32"]

pytestmark = pytest.mark.timeout(300)


def ccsr(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "ccsr.cli", *args], env=ENV, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.parametrize("flags", [(), ("--preset", "two-step"), ("--preset", "two-step", "--cfg-scale", "3")])
def test_eval_takes_the_v2_models_defaults_like_upscale(tmp_path, flags):
    lq = tmp_path / "lq"
    lq.mkdir()
    (lq / "img.png").write_bytes((V2 / "inputs" / "lq_32x32.png").read_bytes())
    common = ("--process-size", "128", *flags)
    p = ccsr("eval", str(lq), *MODEL, *common, "--seeds", "233,234", "--save", str(tmp_path / "sr"),
             "--json", str(tmp_path / "eval.json"), "-q")
    report = json.loads((tmp_path / "eval.json").read_text())
    preset = V2_PRESETS["two-step" if flags else "one-step"]
    expected = {**preset, "process_size": 128, **({"cfg_scale": 3.0} if "--cfg-scale" in flags else {})}
    assert report["model"] == "CCSR-v2" and p.stdout.startswith("CCSR-v2: 1 image(s) x 2 run(s)")
    assert {k: report["params"][k] for k in expected} == expected
    sr = np.asarray(Image.open(tmp_path / "sr" / "seed233" / "img.png").convert("RGB"))
    assert sr.shape == (128, 128, 3) and report["summary"]["l_std"] > 0
    ccsr("upscale", str(lq / "img.png"), "-o", str(tmp_path / "up.png"), *MODEL, *common, "--seed", "233",
         "--exact", "-q")
    assert np.array_equal(sr, np.asarray(Image.open(tmp_path / "up.png").convert("RGB")))


def test_eval_refuses_a_preset_the_model_does_not_have(tmp_path):
    lq = tmp_path / "lq"
    lq.mkdir()
    (lq / "img.png").write_bytes((V2 / "inputs" / "lq_32x32.png").read_bytes())
    p = subprocess.run([sys.executable, "-m", "ccsr.cli", "eval", str(lq), *MODEL, "--preset", "three-step",
                        "--runs", "1"], env=ENV, capture_output=True, text=True, timeout=240)
    assert p.returncode == 2 and "one-step, two-step" in p.stderr, p.stderr
