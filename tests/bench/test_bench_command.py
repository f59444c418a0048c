"""`ccsr bench` and `ccsr eval` on the tiny fixture architecture (fast; the real-size runs are in bench/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tests.conftest import FIXTURES

from ccsr.cli import main

CONFIG = FIXTURES / "model.yaml"
WEIGHTS = FIXTURES / "model.safetensors"


def _bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--config",
            str(CONFIG),
            "--size",
            "64x48",
            "--scale",
            "2",
            "--steps",
            "6",
            "--size-mode",
            "pad",
            "--threads",
            "2",
            "-q",
            "--json",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_bench_tiny_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _bench(tmp_path)
    printed = capsys.readouterr().out
    for words in ("machine:", "torch", "wall per image", "network evaluations", "peak RSS", "MP/s"):
        assert words in printed
    h = r["header"]
    for key in ("cpu", "cores", "torch", "diffusers", "device", "dtype", "threads", "parameters", "config"):
        assert h[key] not in (None, ""), key
    assert h["device"] == "cpu" and h["dtype"] == "float32" and h["threads"] == 2
    assert 1e6 < h["parameters"] < 1e7  # the tiny architecture, not the real one
    assert r["input_size"] == [64, 48] and r["output_size"] == [128, 96] and r["process_size"] == [128, 128]
    s = r["summary"]
    assert s["evaluations"] == 3 == r["planned_evaluations"]  # steps 6: one at T + two loop steps
    assert s["tiles"] == 1 and s["hint_encodes"] == 1
    assert s["finite"] is True
    for key in ("wall_s", "eval_s", "unet_s", "controlnet_s", "hint_encode_s", "decode_s", "output_mp_per_s"):
        assert isinstance(s[key], float) and math.isfinite(s[key]) and s[key] > 0, key
    assert s["eval_s"] == pytest.approx(s["unet_s"] + s["controlnet_s"])
    assert s["wall_s"] > s["eval_s"] * 3 * 0.9  # three evaluations happen inside the run
    assert s["output_mp_per_s"] == pytest.approx(128 * 96 / 1e6 / s["wall_s"])
    m = r["memory"]
    assert 50 < m["weights_rss_mb"] <= m["peak_rss_mb"] < 64 * 1024
    assert m["peak_above_weights_mb"] == pytest.approx(m["peak_rss_mb"] - m["weights_rss_mb"])
    run = r["runs"][0]
    assert run["evaluations"] == 3 and run["output_std"] > 0
    assert set(run["timings"]) >= {"preprocess", "sample", "decode", "total"}


def test_bench_tiny_tiled(tmp_path: Path) -> None:
    r = _bench(
        tmp_path,
        "--tile-diffusion",
        "mix",
        "--tile-diffusion-size",
        "128",
        "--tile-diffusion-stride",
        "64",
        "--tile-vae",
        "--tile-vae-decoder-size",
        "16",
    )
    s = r["summary"]
    # pad mode: 128x96 target -> 128x128 processing -> 16x16 latent; 16-latent tiles -> 1 tile
    assert s["tiles"] == 1 and s["evaluations"] == 3 and s["finite"]
    assert r["params"]["tile_vae"] is True and r["params"]["tile_diffusion"] == "mix"


def test_bench_file_output_runs_the_cli_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _bench(tmp_path, "--output-type", "webp", "--size", "96x64", "--tile-diffusion", "mix",
               "--tile-diffusion-size", "128", "--tile-diffusion-stride", "64")
    assert r["header"]["output_type"] == "webp" and "encode (webp):" in capsys.readouterr().out
    s, run = r["summary"], r["runs"][0]
    assert s["tiles"] > 1 and s["finite"] and run["output_std"] > 0  # the encoded file, read back
    assert 0 < s["encode_s"] == run["timings"]["encode"] < s["wall_s"]
    plain = _bench(tmp_path)
    assert plain["summary"]["encode_s"] is None and "encode" not in plain["runs"][0]["timings"]


def test_bench_bad_size_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--size", "abc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "WxH" in err


# -- eval ----------------------------------------------------------------------------------------------------


def _pairs(root: Path, n: int = 2) -> tuple[Path, Path]:
    lq, gt = root / "lq", root / "gt"
    lq.mkdir()
    gt.mkdir()
    yy, xx = np.mgrid[0:128, 0:128] / 128.0
    for i in range(n):
        img = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * ((1 + i) * xx + c * yy)) for c in (0.5, 1.0, 1.5)], -1)
        big = Image.fromarray((img * 255).round().astype(np.uint8))
        big.save(gt / f"img{i}.png")
        big.resize((64, 64), Image.Resampling.BICUBIC).save(lq / f"img{i}.png")
    return lq, gt


def _eval(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "eval.json"
    rc = main(
        [
            "eval",
            *args,
            "--runs",
            "2",
            "--steps",
            "6",
            "--scale",
            "2",
            "--size-mode",
            "pad",
            "--weights",
            str(WEIGHTS),
            "--config",
            str(CONFIG),
            "--device",
            "cpu",
            "-q",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_eval_with_ground_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lq, gt = _pairs(tmp_path)
    r = _eval(tmp_path, str(lq), "--gt", str(gt), "--save", str(tmp_path / "sr"))
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "G-STD" in printed and "L-STD" in printed
    s = r["summary"]
    assert s["images"] == 2 and s["runs"] == 2 and r["protocol"]["seeds"] == [0, 1]
    assert 5 < s["psnr"] < 60 and -1 < s["ssim"] <= 1
    assert s["psnr_g_std"] >= 0 and s["ssim_g_std"] >= 0
    assert s["l_std"] > 0  # two seeds give two different results
    assert s["time_per_run_s"] > 0 and s["peak_rss_mb"] > 50
    img = r["images"][0]
    psnrs = [run["psnr"] for run in img["runs"]]
    assert img["psnr"] == pytest.approx(np.mean(psnrs))
    assert img["psnr_std"] == pytest.approx(np.std(psnrs))
    assert s["psnr_g_std"] == pytest.approx(np.mean([i["psnr_std"] for i in r["images"]]))
    assert sorted(p.name for p in (tmp_path / "sr" / "seed1").iterdir()) == ["img0.png", "img1.png"]
    # the saved 8-bit results reproduce the reported figures
    from ccsr.evaluate import psnr_y

    saved = np.asarray(Image.open(tmp_path / "sr" / "seed0" / "img0.png"))
    assert psnr_y(saved, np.asarray(Image.open(gt / "img0.png"))) == pytest.approx(psnrs[0], rel=1e-9)


def test_eval_without_ground_truth_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lq, gt = _pairs(tmp_path, n=1)
    r = _eval(tmp_path, str(lq))
    assert "psnr" not in r["summary"] and r["summary"]["l_std"] > 0
    (gt / "img0.png").rename(gt / "other.png")
    capsys.readouterr()
    rc = main(
        ["eval", str(lq), "--gt", str(gt), "--runs", "1", "--weights", str(WEIGHTS), "--config", str(CONFIG)]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "file stem" in err
