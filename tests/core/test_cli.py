"""The command line end to end, in subprocesses, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tests.conftest import FIXTURES, REPO, TINY_CKPT, TINY_CONFIG

MODEL = ["--weights", str(TINY_CKPT), "--config", str(TINY_CONFIG)]


def ccsr(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """This checkout's ccsr (PYTHONPATH), whatever the environment's editable install points at."""
    return subprocess.run([sys.executable, "-m", "ccsr.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])})


def test_reproduces_fixture_case_d_from_the_command_line(tmp_path):
    case = FIXTURES / "case_d_tiled_mix"
    out, flt = tmp_path / "out.png", tmp_path / "out.npy"
    r = ccsr("upscale", str(FIXTURES / "inputs" / "lq_48x40.png"), "-o", str(out), *MODEL, "--scale", "6",
             "--steps", "6", "--seed", "233", "--tile-diffusion", "mix", "--tile-diffusion-size", "128",
             "--tile-diffusion-stride", "96", "--exact", "--save-float", str(flt), "-q")
    assert r.returncode == 0, r.stderr
    assert np.abs(np.load(flt) - np.load(case / "output_float.npy")).max() < 1e-3
    ref = np.asarray(Image.open(case / "output.png").convert("RGB")).astype(int)
    mine = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert mine.shape == ref.shape and np.abs(mine - ref).max() <= 1 and (mine != ref).mean() <= 0.001


def test_folder_mode_skips_existing_outputs(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.open(FIXTURES / "inputs" / "lq_48x40.png").save(src / "a.png")
    Image.open(FIXTURES / "inputs" / "lq_48x40.png").convert("RGB").save(src / "sub" / "b.jpg")
    args = ["upscale", str(src), "-o", str(tmp_path / "out"), *MODEL, "--steps", "6", "--size-mode", "pad",
            "--format", "webp", "--seed", "1"]
    r = ccsr(*args)
    assert r.returncode == 0, r.stderr
    made = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.webp"))
    assert made == ["a.webp", "sub/b.webp"]
    assert Image.open(tmp_path / "out" / "a.webp").size == (96, 80)
    again = ccsr(*args)
    assert again.returncode == 0
    assert sum(line.startswith("skip ") for line in again.stderr.splitlines()) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--color-fix", "purple"], "invalid choice"),
        (["--t-min", "0.9"], "t_min"),
        (["--scale", "0"], "scale"),
        (["--weights", str(FIXTURES / "README.md")], "not a readable checkpoint"),
        (["--weights", "/nonexistent/model.ckpt"], "not found"),
        (["--config", str(FIXTURES / "README.md")], "config"),
    ],
)
def test_bad_input_is_one_line_no_traceback(tmp_path, args, needle):
    base = ["upscale", str(FIXTURES / "inputs" / "lq_48x40.png"), "-o", str(tmp_path / "o.png")]
    extra = [] if any(a in ("--weights", "--config") for a in args) else MODEL
    r = ccsr(*base, *extra, *args)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unreadable_image_is_one_line(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image at all")
    r = ccsr("upscale", str(bad), "-o", str(tmp_path / "o.png"), *MODEL)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_zero_size_image_is_refused(tmp_path):
    empty = tmp_path / "e.png"
    empty.write_bytes(b"")
    r = ccsr("upscale", str(empty), "-o", str(tmp_path / "o.png"), *MODEL)
    assert r.returncode != 0 and "Traceback" not in r.stderr
