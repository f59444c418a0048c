"""Quality and stability metrics, and ``ccsr eval``.

The protocol follows CCSR's evaluation (``cal_iqa/``, which calls pyiqa), computed here with numpy/torch only:

* **Y channel** (ITU-R BT.601, studio swing, as MATLAB ``rgb2ycbcr``, BasicSR and pyiqa with
  ``color_space='ycbcr'``): for RGB in [0, 1], ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255``, so Y lies
  in [16/255, 235/255].
  8-bit images are read as ``value / 255``. No rounding of Y.
* **Border**: ``crop`` pixels (default 4) are removed from every side of SR and GT before any metric.
* **PSNR** = ``10 log10(1 / MSE)`` with MSE the mean of ``(Y_sr - Y_gt)^2`` over the cropped image (peak 1.0;
  identical to 255-scale PSNR on ``255 Y``). Identical images give +inf (written as null in JSON).
* **SSIM** (Wang et al. 2004) on ``255 Y`` (data range L = 255): ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``;
  local statistics with an 11x11 Gaussian window (sigma 1.5, normalised to sum 1), ``'valid'`` filtering (only
  windows fully inside the cropped image), population (biased) variances ``E[x^2] - E[x]^2``; the SSIM map
  ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))``, averaged; float64.
  This equals skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255)`` (tested when skimage is importable) and pyiqa's ``ssim``,
  except that pyiqa clamps the contrast-structure term at 0 (a difference only where a window is
  anti-correlated).
* **G-STD** of a metric: with ``M[image, run]``, the mean over images of ``np.std(M[image, :])`` (population).
* **L-STD**: per image, the per-pixel, per-channel population std of the N results (RGB in [0, 1], border
  cropped) across runs, averaged over pixels and channels; then the mean over images. Needs no ground truth.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0
Y_OFFSET = 16.0 / 255.0
DEFAULT_CROP = 4


# -- metrics -------------------------------------------------------------------------------------------------


def to_float01(img: Any) -> np.ndarray:
    """PIL image / uint8 / uint16 / float array -> float64 HxWx3 (or HxW) in [0, 1]."""
    arr = np.asarray(img.convert("RGB")) if hasattr(img, "convert") else np.asarray(img)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float64) / 65535.0
    return arr.astype(np.float64)


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of RGB in [0, 1] (studio swing): ``(16 + 65.481 R + 128.553 G + 24.966 B) / 255``."""
    rgb = np.asarray(rgb, dtype=np.float64)
    if rgb.ndim == 2:
        return rgb
    return rgb[..., :3] @ Y_WEIGHTS + Y_OFFSET


def crop_border(img: np.ndarray, crop: int) -> np.ndarray:
    if crop <= 0:
        return img
    if img.shape[0] <= 2 * crop or img.shape[1] <= 2 * crop:
        raise ValueError(f"image {img.shape[1]}x{img.shape[0]} is too small for a {crop}-pixel border crop")
    return img[crop:-crop, crop:-crop]


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"size mismatch: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}")


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR of two same-shape arrays; +inf when identical."""
    _check_pair(a, b)
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian (the 2-D window is its outer product, which also sums to 1)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_valid(img: Any, g: Any) -> Any:
    """Separable 'valid' correlation of [N, 1, H, W] float64 tensors with the 1-D window ``g``."""
    import torch.nn.functional as F

    k = g.numel()
    out = F.conv2d(img, g.view(1, 1, k, 1))
    return F.conv2d(out, g.view(1, 1, 1, k))


def ssim_map(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float = 255.0,
    win: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """SSIM map of two 2-D arrays ('valid' region: (H - win + 1) x (W - win + 1))."""
    import torch

    _check_pair(a, b)
    if a.ndim != 2:
        raise ValueError("ssim_map expects 2-D (single-channel) arrays")
    if min(a.shape) < win:
        raise ValueError(f"image {a.shape[1]}x{a.shape[0]} is smaller than the {win}x{win} SSIM window")
    g = torch.from_numpy(gaussian_window(win, sigma))
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))[None, None]
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mu_x * mu_x
    syy = _filter_valid(y * y, g) - mu_y * mu_y
    sxy = _filter_valid(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return (num / den)[0, 0].numpy()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    return float(ssim_map(a, b, data_range).mean())


def psnr_y(sr: Any, gt: Any, crop: int = DEFAULT_CROP) -> float:
    """PSNR on the BT.601 Y channel (peak 1.0) after cropping ``crop`` pixels of border."""
    ys, yg = (crop_border(rgb_to_y(to_float01(x)), crop) for x in (sr, gt))
    return psnr(ys, yg, 1.0)


def ssim_y(sr: Any, gt: Any, crop: int = DEFAULT_CROP) -> float:
    """SSIM on 255 x the BT.601 Y channel after cropping ``crop`` pixels of border."""
    ys, yg = (crop_border(rgb_to_y(to_float01(x)), crop) * 255.0 for x in (sr, gt))
    return ssim(ys, yg, 255.0)


def g_std(matrix: Any) -> float:
    """Mean over rows (images) of the population std across columns (runs)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError("G-STD needs an [images, runs] matrix")
    return float(np.std(m, axis=1).mean())


class RunningStd:
    """Welford's per-pixel mean/variance over runs: memory of two images however many runs."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self.mean is None:
            self.n, self.mean, self.m2 = 1, x.copy(), np.zeros_like(x)
            return
        if x.shape != self.mean.shape:
            raise ValueError("all runs of an image must have the same size")
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def local_std(self) -> float:
        """Mean over pixels and channels of the population std across the runs added so far."""
        if self.m2 is None:
            raise ValueError("no runs")
        return float(np.sqrt(np.maximum(self.m2 / self.n, 0.0)).mean())


def l_std(runs: list[Any], crop: int = DEFAULT_CROP) -> float:
    """L-STD of one image from its N results (RGB in [0, 1], border cropped)."""
    acc = RunningStd()
    for r in runs:
        acc.add(crop_border(to_float01(r), crop))
    return acc.local_std()


# -- ccsr eval -----------------------------------------------------------------------------------------------


def _images(folder: Path) -> dict[str, Path]:
    from ccsr.cli import IMAGE_SUFFIXES

    found: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(f.stem, f)
    return found


def _seeds(a: argparse.Namespace) -> list[int]:
    from ccsr.cli import CLIError

    if a.seeds:
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        except ValueError:
            raise CLIError(f"--seeds: expected comma-separated integers, got {a.seeds!r}") from None
    else:
        if a.runs < 1:
            raise CLIError("--runs must be at least 1")
        base = a.seed if a.seed is not None else 0
        seeds = [base + i for i in range(a.runs)]
    if not seeds or len(set(seeds)) != len(seeds):
        raise CLIError("--seeds must list distinct integers")
    return seeds


def _stat(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None]
    return float(np.mean(finite)) if finite else None


def evaluate_folder(
    pipe: Any,
    lq_dir: Path,
    gt_dir: Path | None,
    params: Any,
    seeds: list[int],
    *,
    crop: int = DEFAULT_CROP,
    save_dir: Path | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Upscale every image of ``lq_dir`` once per seed; metrics against ``gt_dir`` (matched by stem)."""
    from PIL import Image

    from ccsr import bench
    from ccsr.cli import CLIError

    lqs = _images(lq_dir)
    if not lqs:
        raise CLIError(f"no input images in {lq_dir}")
    gts = _images(gt_dir) if gt_dir is not None else {}
    missing = [s for s in lqs if gt_dir is not None and s not in gts]
    if missing:
        raise CLIError(
            f"no ground truth for {len(missing)} input(s) in {gt_dir} (e.g. {missing[0]!r}); "
            "inputs and ground truths are matched by file stem"
        )
    rows = []
    times: list[float] = []
    bench.reset_peak_rss()
    if pipe.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(pipe.device)
    t_all = time.perf_counter()
    for stem, path in lqs.items():
        lq = Image.open(path)
        lq.load()
        lq = lq.convert("RGB")
        gt = to_float01(Image.open(gts[stem])) if stem in gts else None
        acc = RunningStd()
        per_run: list[dict[str, Any]] = []
        for seed in seeds:
            t0 = time.perf_counter()
            out = pipe.run(lq, params.replace(seed=seed), output_type="pil")  # only the 8-bit image is scored
            dt = time.perf_counter() - t0
            times.append(dt)
            sr = to_float01(out.image)  # the 8-bit result, as a saved PNG would be evaluated
            run: dict[str, Any] = {"seed": seed, "time_s": dt}
            if gt is not None:
                if gt.shape[:2] != sr.shape[:2]:
                    raise CLIError(
                        f"{stem}: ground truth is {gt.shape[1]}x{gt.shape[0]} but the output is "
                        f"{sr.shape[1]}x{sr.shape[0]} (check --scale)"
                    )
                run["psnr"] = psnr_y(sr, gt, crop)
                run["ssim"] = ssim_y(sr, gt, crop)
            acc.add(crop_border(sr, crop))
            if save_dir is not None:
                dst = save_dir / f"seed{seed}" / f"{stem}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                out.image.save(dst)
            per_run.append(run)
            if log:
                extra = f" PSNR {run['psnr']:.3f} SSIM {run['ssim']:.4f}" if "psnr" in run else ""
                log(f"{stem} seed {seed}: {dt:.2f} s{extra}")
        rows.append({"image": stem, "runs": per_run, "l_std": acc.local_std()})
    total = time.perf_counter() - t_all

    summary: dict[str, Any] = {
        "images": len(rows),
        "runs": len(seeds),
        "l_std": _stat([r["l_std"] for r in rows]),
    }
    if gts:
        for metric in ("psnr", "ssim"):
            m = np.array([[run[metric] for run in r["runs"]] for r in rows], dtype=np.float64)
            finite = np.isfinite(m).all()
            summary[metric] = float(m.mean()) if finite else math.inf
            summary[f"{metric}_g_std"] = g_std(m) if finite else None
            for r, row in zip(rows, m, strict=True):
                r[metric] = float(row.mean()) if np.isfinite(row).all() else math.inf
                r[f"{metric}_std"] = float(row.std()) if np.isfinite(row).all() else None
    summary["time_per_run_s"] = float(np.mean(times))
    summary["total_s"] = total
    summary["peak_rss_mb"] = bench.peak_rss_mb()
    if pipe.device.type == "cuda":
        import torch

        summary["peak_allocated_mb"] = torch.cuda.max_memory_allocated(pipe.device) / 2**20
    summary["learned_metrics"] = "none (LPIPS/MUSIQ/... need local weights; not computed)"
    return {
        "protocol": {
            "crop": crop,
            "y": "BT.601 studio swing",
            "ssim": "gaussian 11, sigma 1.5, K .01/.03, L=255, valid",
            "seeds": seeds,
        },
        "model": pipe.descriptor.name,
        "params": params.to_dict(),
        "summary": summary,
        "images": rows,
    }


def _finite_or_none(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite_or_none(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite_or_none(v) for v in o]
    return o


def _fmt(v: Any, digits: int) -> str:
    if v is None:
        return "-"
    return "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.{digits}f}"


def cmd_eval(a: argparse.Namespace) -> int:
    """The parameters are the loaded model's defaults (or ``--preset``) where no flag spells them out, as in
    ``ccsr upscale``: CCSR-v2 is evaluated at its one-step preset unless told otherwise."""
    from ccsr.cli import CLIError, load_pipeline, params_from_args, with_model_defaults

    lq_dir = Path(a.inputs)
    if not lq_dir.is_dir():
        raise CLIError(f"not a folder: {lq_dir}")
    gt_dir = Path(a.gt) if a.gt else None
    if gt_dir is not None and not gt_dir.is_dir():
        raise CLIError(f"not a folder: {gt_dir}")
    if a.crop < 0:
        raise CLIError("--crop must be >= 0")
    params = params_from_args(a)
    seeds = _seeds(a)

    def log(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    pipe = load_pipeline(a)
    params = with_model_defaults(params, a, pipe.descriptor)
    try:
        report = evaluate_folder(
            pipe,
            lq_dir,
            gt_dir,
            params,
            seeds,
            crop=a.crop,
            save_dir=Path(a.save) if a.save else None,
            log=log,
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    s = report["summary"]
    print(
        f"{report['model']}: {s['images']} image(s) x {s['runs']} run(s) (seeds {','.join(map(str, seeds))}), "
        f"{a.crop}-px border crop, Y = BT.601"
    )
    if "psnr" in s:
        print(f"{'image':<24} {'PSNR':>8} {'std':>7} {'SSIM':>7} {'std':>7} {'L-STD':>8}")
        for r in report["images"]:
            print(
                f"{r['image'][:24]:<24} {_fmt(r['psnr'], 3):>8} {_fmt(r['psnr_std'], 3):>7} "
                f"{_fmt(r['ssim'], 4):>7} {_fmt(r['ssim_std'], 4):>7} {_fmt(r['l_std'], 5):>8}"
            )
        print(
            f"PSNR {_fmt(s['psnr'], 3)} (G-STD {_fmt(s['psnr_g_std'], 4)})  "
            f"SSIM {_fmt(s['ssim'], 4)} (G-STD {_fmt(s['ssim_g_std'], 4)})  L-STD {_fmt(s['l_std'], 5)}"
        )
    else:
        print(f"L-STD {_fmt(s['l_std'], 5)} (no ground truth: PSNR/SSIM not computed)")
    mem = f"peak RSS {s['peak_rss_mb']:.0f} MB"
    if "peak_allocated_mb" in s:
        mem += f", peak allocated {s['peak_allocated_mb']:.0f} MB"
    print(f"time {s['time_per_run_s']:.2f} s per run, {s['total_s']:.1f} s total; {mem}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(_finite_or_none(report), indent=1))
    return 0


def add_command(sub: Any) -> None:
    from ccsr.cli import _model_args, add_upscale_params

    e = sub.add_parser("eval", help="PSNR/SSIM (Y, border-cropped), G-STD and L-STD over N seeds")
    e.add_argument("inputs", metavar="LQ_DIR", help="folder of low-quality inputs")
    e.add_argument("--gt", metavar="GT_DIR", help="folder of ground truths, matched to inputs by file stem")
    e.add_argument(
        "--runs",
        type=int,
        default=10,
        help="runs per image, with seeds --seed, --seed + 1, ... (default 10, as the paper)",
    )
    e.add_argument("--seeds", help="explicit comma-separated seeds (overrides --runs)")
    e.add_argument("--crop", type=int, default=DEFAULT_CROP, help="border pixels cropped before metrics (4)")
    e.add_argument("--save", metavar="DIR", help="also save every result as DIR/seed<N>/<stem>.png")
    e.add_argument("--json", metavar="FILE", help="write the per-image and summary figures as JSON")
    e.add_argument("-q", "--quiet", action="store_true")
    _model_args(e)
    add_upscale_params(e, seed_help="first seed of --runs (default 0, so runs are repeatable)")
    e.set_defaults(func=cmd_eval)
