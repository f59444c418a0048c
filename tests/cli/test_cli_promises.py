"""``ccsr upscale`` as a user runs it (subprocesses): the output cap, folder collisions, errors found before the
model loads, batch reporting, ``--dry-run`` / ``--json`` / ``--version``, Ctrl+C, the model's environment
variables and ``convert``'s file modes (issues 17 and 20)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest
from PIL import Image
from tests.conftest import REPO, TINY_CKPT, TINY_CONFIG

MODEL = ["--weights", str(TINY_CKPT), "--config", str(TINY_CONFIG)]
FAST = ["--steps", "2", "--size-mode", "pad", "--seed", "1"]
MISSING_WEIGHTS = ["--weights", "/nonexistent/model.ckpt"]  # loading it would fail: proves a check came first


def env(**extra: str) -> dict[str, str]:
    base = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    return {**base, **extra}


def ccsr(*args: str, timeout: int = 600, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ccsr.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env(**extra))


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def picture(path, size=(96, 64), color=(90, 140, 200)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# -- issue 17.4: the output cap ------------------------------------------------------------------------------


def test_max_output_side_shrinks_the_input_first(tmp_path):
    """96x64 at x4 is 384x256; capped at 200 the input is shrunk to 50x33 first (as the server does). The model
    comes from CCSR_WEIGHTS / CCSR_CONFIG, as for `ccsr serve`."""
    out = tmp_path / "o.png"
    r = ccsr("upscale", str(picture(tmp_path / "in.png")), "-o", str(out), "--scale", "4", "--max-output-side", "200",
             *FAST, CCSR_WEIGHTS=str(TINY_CKPT), CCSR_CONFIG=str(TINY_CONFIG))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (200, 132)
    assert "input shrunk from 96x64 to 50x33" in r.stderr


def test_default_output_cap_is_4096(tmp_path):
    """No weights are read by --dry-run; a 1100x1000 input at x4 (4400x4000) is planned at 4096x3720."""
    src = picture(tmp_path / "big.png", size=(1100, 1000))
    r = ccsr("upscale", str(src), "-o", str(tmp_path / "o.png"), "--scale", "4", "--dry-run", "--json", "-",
             "--weights", str(REPO / "README.md"), "--config", str(TINY_CONFIG))
    assert r.returncode == 0, r.stderr
    (plan,) = json.loads(r.stdout)["files"]
    assert plan["output_size"] == [4096, 3720] and plan["model_input_size"] == [1024, 930]
    assert not (tmp_path / "o.png").exists()


# -- issue 17.5: two inputs, one output ----------------------------------------------------------------------


def test_two_inputs_mapping_to_one_output_are_refused_before_any_work(tmp_path):
    src = tmp_path / "in"
    picture(src / "x.png")
    picture(src / "x.jpg")
    line = one_error_line(ccsr("upscale", str(src), "-o", str(tmp_path / "out"), *MISSING_WEIGHTS))
    assert "x.jpg" in line and "x.png" in line and "both write" in line
    assert not (tmp_path / "out").exists()


# -- issue 17.6: one-line errors before the model loads -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "environment", "needle"),
    [
        (["--device", "cuda:99"], {}, "--device cuda:99"),  # CPU-only torch: no CUDA; a GPU machine: no 100th GPU
        (["--device", "tpu"], {}, "--device tpu"),
        (["--quality", "5"], {}, "--quality"),
        ([], {"CCSR_DTYPE": "float8"}, "CCSR_DTYPE"),
        (["--format", "webp"], {}, "--format webp contradicts"),
    ],
)
def test_setup_errors_are_one_line_before_loading(tmp_path, args, environment, needle):
    src = picture(tmp_path / "in.png")
    line = one_error_line(ccsr("upscale", str(src), "-o", str(tmp_path / "x.png"), *MISSING_WEIGHTS, *args,
                               **environment))
    assert needle in line


def test_output_below_a_file_is_refused_before_loading(tmp_path):
    src = picture(tmp_path / "in.png")
    (tmp_path / "file.png").write_bytes(b"x")
    line = one_error_line(ccsr("upscale", str(src), "-o", str(tmp_path / "file.png" / "out.png"), *MISSING_WEIGHTS))
    assert "is a file, not a folder" in line


def test_one_output_file_for_several_inputs_is_refused(tmp_path):
    a, b = picture(tmp_path / "a.png"), picture(tmp_path / "b.png")
    line = one_error_line(ccsr("upscale", str(a), str(b), "-o", str(tmp_path / "x.png"), *MISSING_WEIGHTS))
    assert "names one file but there are 2 inputs" in line


def test_checkpoint_config_mismatch_suggests_config(tmp_path):
    """The tiny checkpoint against the built-in (SD-2.1 size) config: missing keys, and the way out."""
    line = one_error_line(ccsr("upscale", str(picture(tmp_path / "in.png")), "-o", str(tmp_path / "o.png"),
                               "--weights", str(TINY_CKPT)))
    assert "missing key(s)" in line and "--config" in line


# -- issue 20: batches, progress, JSON ------------------------------------------------------------------------


def test_batch_reports_files_stages_failures_and_json(tmp_path):
    src = tmp_path / "in"
    picture(src / "a.png")
    picture(src / "b.png", color=(200, 40, 10))
    good = (src / "a.png").read_bytes()
    (src / "c.png").write_bytes(good[: len(good) // 2])  # a valid header, truncated pixels: fails in the batch
    report = tmp_path / "r.json"
    r = ccsr("upscale", str(src), "-o", str(tmp_path / "out"), *MODEL, *FAST, "--json", str(report))
    assert r.returncode == 1, r.stderr  # one failed
    lines = r.stderr.splitlines()
    for n in (1, 2, 3):
        assert any(line.startswith(f"[{n}/3] ") for line in lines), r.stderr
    assert any("about" in line and "left for the batch" in line for line in lines if line.startswith("[3/3]"))
    assert any("VAE decode and encode" in line for line in lines)
    assert "\r" not in r.stderr and "eval/s" not in r.stderr  # not a terminal: plain lines, no bar redraws
    summary = lines.index("2 done, 0 skipped, 1 failed")
    assert any("c.png" in line for line in lines[summary + 1:]), "the failure is listed after the summary"
    data = json.loads(report.read_text())
    assert [f["status"] for f in data["files"]] == ["done", "done", "failed"]
    assert data["summary"] == {"files": 3, "done": 2, "skipped": 0, "failed": 1}
    assert data["files"][0]["width"] == 192 and data["files"][0]["seed"] == 1 and data["files"][2]["error"]
    again = ccsr("upscale", str(src / "a.png"), "-o", str(tmp_path / "out"), *MODEL, "--json", "-")
    assert again.returncode == 0 and json.loads(again.stdout)["files"][0]["status"] == "skipped"


def test_ctrl_c_stops_with_130_and_one_line(tmp_path):
    """SIGINT during sampling (many evaluations left): exit 130, one line, no traceback, no output file."""
    out = tmp_path / "o.png"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ccsr.cli", "upscale", str(picture(tmp_path / "in.png")), "-o", str(out), *MODEL,
         "--steps", "400", "--seed", "1"],
        stderr=subprocess.PIPE, text=True, env=env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores SIGINT
    )
    seen = []
    for line in proc.stderr:  # plain lines: the first evaluation has been reported
        seen.append(line)
        if "sampling:" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 130, "".join(seen) + rest
    assert rest.strip() == "ccsr: interrupted", rest
    assert not out.exists() and not list(tmp_path.glob("*.part"))


def test_version():
    r = ccsr("--version")
    assert r.returncode == 0 and r.stdout.startswith("ccsr ")


def test_help_says_what_format_a_jpeg_becomes():
    text = " ".join(ccsr("upscale", "--help").stdout.split())
    assert "default png, also for JPEG inputs" in text


def test_eval_help_states_one_seed_default():
    text = " ".join(ccsr("eval", "--help").stdout.split())
    assert "default: random" not in text and "default 0" in text


def test_convert_writes_every_file_with_the_umask_mode(tmp_path):
    out = tmp_path / "conv"
    r = subprocess.run(["sh", "-c", 'umask 022 && exec "$0" -m ccsr.cli convert "$@"', sys.executable, str(out),
                        *MODEL], capture_output=True, text=True, timeout=600, env=env())
    assert r.returncode == 0, r.stderr
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


def run_in_terminal(args: list[str], timeout: float = 600) -> tuple[int, str]:
    """``ccsr`` on a pseudo-terminal (120 columns): what a user at a terminal sees, redraws included."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "ccsr.cli", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env(), close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


def test_terminal_shows_a_bar_then_the_stage(tmp_path):
    rc, screen = run_in_terminal(["upscale", str(picture(tmp_path / "in.png")), "-o", str(tmp_path / "o.png"),
                                  *MODEL, *FAST])
    assert rc == 0, screen
    assert "[1/1]" in screen and "eval/s" in screen and "VAE decode and encode" in screen, screen
    assert "0eval [" not in screen  # no bar without a total (drawn before the plan was known, or never used)
    assert "sampling:" not in screen  # the plain lines are for logs only
