"""The reference CCSR code at real size with random weights, timed like `ccsr bench` (a benchmark, not a test).

Runs the original implementation (a checkout of github.com/csslc/CCSR that you provide; nothing of it is shipped
here) on the same machine as `ccsr bench`, so the two can be compared on one day:

    git clone https://github.com/csslc/CCSR /tmp/CCSR
    pip install --target /tmp/refdeps einops omegaconf
    PYTHONPATH=/tmp/refdeps python bench/reference.py --repo /tmp/CCSR --size 128 --scale 4 --steps 45

It builds `configs/model/ccsr_stage2.yaml` (CCSR-v1) with PyTorch's default random initialisation and runs the
reference's `SpacedSampler.sample_ccsr` with an empty prompt, CFG 1 and adain colour fix, as `inference_ccsr.py`
does, on a synthetic input already resized to the output size. Times per ControlNet + UNet evaluation, per
condition-encoder pass and per VAE decode come from wrapping those modules' ``forward``.

Packages the reference imports only for training or logging are replaced by minimal stand-ins when missing
(pytorch_lightning, torchvision, cv2), and the OpenCLIP text encoder by one that returns a zero context:
the reference encodes "" twice per image (not timed here, which favours the reference slightly) and its 354 M
text parameters are not built (so its RSS is not comparable; only times are).
The training loss built with the model (LPIPS + discriminator) is replaced by an empty module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

STAGE2 = "configs/model/ccsr_stage2.yaml"


class EmptyText(nn.Module):
    """Stands in for FrozenOpenCLIPEmbedder: the context of any prompt is zeros of SD-2.1's shape."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__()

    def encode(self, text: list[str]) -> torch.Tensor:
        return torch.zeros(len(text), 77, 1024)

    forward = encode


class NoTrainingLoss(nn.Module):
    """Stands in for the training loss the reference builds with the model (LPIPS + discriminator, which would
    download VGG weights): inference never calls it."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__()
        self.discriminator = nn.Module()


def _install_stand_ins() -> None:
    try:
        importlib.import_module("pytorch_lightning")
    except ImportError:
        pl = types.ModuleType("pytorch_lightning")

        class LightningModule(nn.Module):
            @property
            def device(self) -> torch.device:
                return next(self.parameters()).device

            def freeze(self) -> None:
                self.eval().requires_grad_(False)

            def log(self, *a: object, **k: object) -> None: ...

            def log_dict(self, *a: object, **k: object) -> None: ...

        pl.LightningModule = LightningModule  # type: ignore[attr-defined]
        utilities = types.ModuleType("pytorch_lightning.utilities")
        distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
        distributed.rank_zero_only = lambda fn: fn  # type: ignore[attr-defined]
        pl.utilities = utilities  # type: ignore[attr-defined]
        utilities.distributed = distributed  # type: ignore[attr-defined]
        sys.modules.update({"pytorch_lightning": pl, "pytorch_lightning.utilities": utilities,
                            "pytorch_lightning.utilities.distributed": distributed})
    try:
        importlib.import_module("torchvision.utils")
    except Exception:  # missing, or PyPI's torchvision beside a local torch build
        tv = types.ModuleType("torchvision")
        tv.__path__ = []  # a package
        tv_utils = types.ModuleType("torchvision.utils")
        tv_utils.make_grid = lambda *a, **k: None  # type: ignore[attr-defined]
        tv_transforms = types.ModuleType("torchvision.transforms")
        tv_transforms.ToTensor = tv_transforms.ToPILImage = object  # type: ignore[attr-defined]
        tv.utils, tv.transforms = tv_utils, tv_transforms  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": tv, "torchvision.utils": tv_utils, "torchvision.transforms": tv_transforms})
    try:
        importlib.import_module("cv2")
    except ImportError:
        sys.modules["cv2"] = types.ModuleType("cv2")
    stub = types.ModuleType("ccsr_reference_stub")
    stub.EmptyText = EmptyText  # type: ignore[attr-defined]
    stub.NoTrainingLoss = NoTrainingLoss  # type: ignore[attr-defined]
    sys.modules["ccsr_reference_stub"] = stub


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="a checkout of github.com/csslc/CCSR")
    ap.add_argument("--size", type=int, default=128, help="input side in pixels")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--steps", type=int, default=45)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()

    from ccsr.bench import CallTimer, machine_info, peak_rss_mb, reset_peak_rss, rss_mb

    torch.set_num_threads(a.threads)
    header = machine_info(torch.device("cpu"), torch.float32)  # before the stand-ins (it reads package versions)
    repo = Path(a.repo).resolve()
    sys.path.insert(0, str(repo))
    _install_stand_ins()
    from model.q_sampler import SpacedSampler  # the reference's own modules, from --repo
    from omegaconf import OmegaConf
    from utils.common import instantiate_from_config

    cfg = OmegaConf.load(repo / STAGE2)
    cfg.params.cond_stage_config = {"target": "ccsr_reference_stub.EmptyText"}
    cfg.params.lossconfig = {"target": "ccsr_reference_stub.NoTrainingLoss"}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = instantiate_from_config(cfg)
    model.freeze()
    build_s = time.perf_counter() - t0
    model.control_scales = [1.0] * 13
    params = sum(p.numel() for p in model.parameters())
    print(f"built the reference CCSR-v1 ({params / 1e6:.1f} M parameters, no text tower) in {build_s:.1f} s; "
          f"RSS {rss_mb():.0f} MiB", flush=True)

    out_side = a.size * a.scale
    cond = torch.rand(1, 3, out_side, out_side, generator=torch.Generator().manual_seed(0))
    x_t = torch.randn(1, 4, out_side // 8, out_side // 8, generator=torch.Generator().manual_seed(1))
    timers = {"controlnet": CallTimer(model.control_model), "unet": CallTimer(model.model.diffusion_model),
              "hint": CallTimer(model, method="apply_condition_encoder"),
              "decode": CallTimer(model, method="decode_first_stage")}
    sampler = SpacedSampler(model, var_type="fixed_small")
    weights_rss = rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    with torch.no_grad():
        img = sampler.sample_ccsr(steps=a.steps, t_max=0.6667, t_min=0.3333, shape=tuple(x_t.shape), cond_img=cond,
                                  positive_prompt="", negative_prompt="", x_T=x_t, cfg_scale=1.0,
                                  color_fix_type="adain")
    wall = time.perf_counter() - t0
    calls = {k: t.calls for k, t in timers.items()}
    n_eval = len(calls["unet"])
    eval_s = (sum(calls["unet"]) + sum(calls["controlnet"])) / max(1, n_eval)
    report = {
        "header": header,
        "reference_repo": str(repo), "parameters_without_text": params, "build_s": build_s,
        "input": [a.size, a.size], "output": [out_side, out_side], "steps": a.steps,
        "wall_s": wall, "evaluations": n_eval, "eval_s": eval_s,
        "unet_s": sum(calls["unet"]) / max(1, n_eval), "controlnet_s": sum(calls["controlnet"]) / max(1, n_eval),
        "hint_s": calls["hint"], "decode_s": calls["decode"],
        "weights_rss_mb": weights_rss, "peak_rss_mb": peak_rss_mb(), "finite": bool(torch.isfinite(img).all()),
    }
    print(f"reference {a.size}->{out_side}, S={a.steps}: {wall:.2f} s per image; {n_eval} evaluations x "
          f"{eval_s:.3f} s (UNet {report['unet_s']:.3f} + ControlNet {report['controlnet_s']:.3f}); "
          f"hint {', '.join(f'{x:.2f}' for x in calls['hint'])} s; decode (+adain) "
          f"{', '.join(f'{x:.2f}' for x in calls['decode'])} s", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
