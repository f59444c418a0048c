"""Parity beyond the golden cases: the original CCSR code and `ccsr upscale` on random inputs and settings.

The fixtures pin a few settings; this draws many (input size and content, scale, steps, t range, seed, colour fix,
tiling mode, tile size and stride, tiled-VAE tile, and for v2 prompts, CFG, process size, start point and start
steps), runs the reference's own script on the tiny fixture model for each, runs `ccsr upscale --exact` with the
matching flags, and compares the two PNGs. A check for maintainers (it needs a checkout of the reference and its
old dependencies), not a test. Nothing of the reference is shipped here.

Set-up (once; the reference's versions, in a venv of their own):

    git clone https://github.com/csslc/CCSR /tmp/CCSRv1                       # v1 (commit 15778ed)
    git clone -b CCSR-v2.0 https://github.com/csslc/CCSR /tmp/CCSRv2          # v2 (commit c5f7d4e)
    python -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 diffusers==0.21.0 \
        transformers==4.25.1 huggingface_hub==0.17.3 accelerate==0.24.1 einops omegaconf "numpy<2" \
        pytorch-lightning==1.9.5 torchmetrics==0.11.4 lightning-utilities==0.8.0 open-clip-torch==2.20.0 \
        opencv-python-headless "setuptools<70" ftfy regex wcwidth timm
    sed -i 's/torch.float16)/torch.float32)/' /tmp/CCSRv2/pipelines/pipeline_ccsr.py   # the fixtures' fp32 rule

    python bench/reference_sweep.py v2 --repo /tmp/CCSRv2 --ref-python /tmp/refvenv/bin/python -n 30
    python bench/reference_sweep.py v1 --repo /tmp/CCSRv1 --ref-python /tmp/refvenv/bin/python -n 20

The run-time changes are those the fixtures' READMEs list, none numeric: a CPU-only stand-in for torchvision (PyPI's
wheel does not load beside the CPU torch; the scripts use only ``to_tensor``/``ToPILImage`` from it), an empty
training-loss module for taming, ``torch.cuda.synchronize`` and the tiled VAE's device made CPU, and the global RNG
re-seeded right before the pipeline call (the seed convention of both fixtures). A line per case: ``OK`` when at
most 0.1 % of values differ by more than 1 and none by more than 2; ``REF FAILED`` where the reference itself
raises (the tiny model's 1x1 GroupNorm on small tiles, an unbound ``latents_old`` in v2's tiled loop, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PROMPTS = ["clean, high-resolution, 8k", "", "a photo of a cat", "ultra detailed, sharp",
           "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"]

TORCHVISION = {  # the parts of torchvision the reference scripts use, on the CPU; any other name is an inert class
    "__init__.py": """
        __version__ = "0.28.0"
        import importlib.abc, importlib.machinery, importlib.util, sys, types
        from ._inert import module_getattr as __getattr__

        class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name.startswith("torchvision.") and importlib.machinery.PathFinder.find_spec(name, path) is None:
                    return importlib.util.spec_from_loader(name, self, is_package=True)
            def create_module(self, spec):
                m = types.ModuleType(spec.name)
                m.__path__, m.__getattr__ = [], __getattr__
                return m
            def exec_module(self, module):
                pass

        sys.meta_path.append(_Finder())
        import torchvision.transforms
        import torchvision.utils
    """,
    "_inert.py": """
        class Inert:
            def __init__(self, *a, **k):
                pass
            def __call__(self, *a, **k):
                raise NotImplementedError("not in the torchvision stand-in")

        def module_getattr(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (Inert,), {})
    """,
    "utils.py": "from ._inert import module_getattr as __getattr__\n",
    "transforms/__init__.py": """
        import enum
        from .functional import to_pil_image, to_tensor
        from .._inert import module_getattr as __getattr__

        class InterpolationMode(enum.Enum):
            NEAREST, NEAREST_EXACT, BILINEAR, BICUBIC = "nearest", "nearest-exact", "bilinear", "bicubic"
            BOX, HAMMING, LANCZOS = "box", "hamming", "lanczos"

        class ToTensor:
            def __call__(self, pic):
                return to_tensor(pic)

        class ToPILImage:
            def __init__(self, mode=None):
                self.mode = mode
            def __call__(self, pic):
                return to_pil_image(pic, self.mode)
    """,
    "transforms/functional.py": """
        import numpy as np
        import torch
        from PIL import Image

        def to_tensor(pic):
            arr = np.array(pic, np.uint8, copy=True)
            t = torch.from_numpy(arr).view(pic.size[1], pic.size[0], len(pic.getbands())).permute(2, 0, 1)
            return t.contiguous().to(torch.get_default_dtype()).div(255)

        def to_pil_image(pic, mode=None):
            if pic.is_floating_point() and mode != "F":
                pic = pic.mul(255).byte()
            return Image.fromarray(np.transpose(pic.cpu().numpy(), (1, 2, 0)), mode="RGB")

        def __getattr__(name):
            if name == "InterpolationMode":
                from . import InterpolationMode
                return InterpolationMode
            from .._inert import module_getattr
            return module_getattr(name)
    """,
}
TAMING = """
    from torch import nn

    class LPIPS(nn.Module):
        pass

    class NLayerDiscriminator(nn.Module):
        def __init__(self, *a, **k):
            super().__init__()

    def weights_init(m):
        pass

    def adopt_weight(weight, global_step, threshold=0, value=0.0):
        return weight

    def hinge_d_loss(a, b):
        raise NotImplementedError

    vanilla_d_loss = hinge_d_loss
"""
RUNNER = """
    import argparse, importlib, json, os, sys
    import torch
    version, repo, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.path.insert(0, repo)
    os.chdir(repo)
    torch.cuda.synchronize = lambda *a, **k: None
    if version == "v2":
        import test_ccsr_tile as script
        import myutils.devices as devices
        devices.device = torch.device("cpu")
        call = script.StableDiffusionControlNetPipeline.__call__
        def reseeded(self, *a, **k):
            torch.manual_seed(spec["seed"])
            return call(self, *a, **k)
        script.StableDiffusionControlNetPipeline.__call__ = reseeded
        script.main(argparse.Namespace(**spec), enable_xformers_memory_efficient_attention=False)
    else:
        import open_clip
        import pytorch_lightning as pl
        open_clip.add_model_config(spec["open_clip_config"])
        import utils.devices as devices
        devices.device = torch.device("cpu")
        script = importlib.import_module(spec["script"])
        process = script.process
        def reseeded(*a, **k):
            pl.seed_everything(spec["seed"])
            return process(*a, **k)
        script.process = reseeded
        sys.argv = [spec["script"] + ".py", *spec["argv"]]
        script.main()
"""


def write_shims(folder: Path) -> None:
    for name, text in TORCHVISION.items():
        path = folder / "torchvision" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    meta = folder / "torchvision-0.28.0.dist-info"  # some packages ask pkg_resources for torchvision's version
    meta.mkdir(exist_ok=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    losses = folder / "taming" / "modules" / "losses"
    losses.mkdir(parents=True, exist_ok=True)
    for package in (folder / "taming", folder / "taming" / "modules", losses):
        (package / "__init__.py").touch()
    (losses / "vqperceptual.py").write_text(textwrap.dedent(TAMING))
    (folder / "ccsr_reference_runner.py").write_text(textwrap.dedent(RUNNER))


def make_input(rng: random.Random, path: Path, lo: int, hi: int) -> tuple[int, int]:
    """Smooth colour waves plus noise: structure for the colour fixes, detail for the resizes."""
    w, h = rng.randint(lo, hi), rng.randint(lo, hi)
    yy, xx = np.mgrid[0:h, 0:w]
    waves = np.stack([np.sin(xx / rng.uniform(2, 9) + c) * np.cos(yy / rng.uniform(2, 9) - c) for c in range(3)], -1)
    noise = np.random.default_rng(rng.randrange(10**6)).normal(0, 20, (h, w, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((waves * 100 + 128 + noise).clip(0, 255).astype(np.uint8)).save(path)
    return w, h


def v2_case(rng: random.Random, folder: Path) -> tuple[dict, list[str]]:
    """The reference's arguments (``test_ccsr_tile.py``) and the matching `ccsr upscale` flags."""
    model = FIXTURES / "ccsr_v2_tiny" / "model"
    tiled = rng.random() < 0.4
    image = folder / "in" / "x.png"
    make_input(rng, image, 40 if tiled else 9, 72)
    scale = 4 if tiled else rng.choice([1, 2, 3, 4])
    steps = rng.choice([1, 1, 2, 3, 5, 6, 8])
    t_max = round(rng.uniform(0.3, 1.0), 4)
    t_min = rng.choice([0.0, round(rng.uniform(0.05, t_max - 0.05), 4)])
    if t_min > 0 and round(steps * t_min) == 0:
        t_min = 0.0  # the reference crashes there (our own rule is documented and tested)
    spec = dict(
        controlnet_model_path=str(model), pretrained_model_path=str(model / "stable-diffusion-2-1-base"),
        vae_model_path=str(model), image_path=str(image), output_dir=str(folder / "ref"), mixed_precision="no",
        guidance_scale=rng.choice([1.0, 1.0, 3.0, 4.5, 7.0]), conditioning_scale=1.0, num_inference_steps=steps,
        t_max=t_max, t_min=t_min, process_size=rng.choice([128, 192, 256] if tiled else [64, 96, 128, 136]),
        upscale=scale, seed=rng.randrange(2**31), sample_times=1, sample_method="ddpm",
        align_method=rng.choice(["adain", "wavelet", "nofix"]), start_steps=rng.choice([999, 999, 700]),
        start_point=rng.choice(["lr", "lr", "noise"]), baseline_name="ccsr-v2", use_vae_encode_condition=True,
        added_prompt=rng.choice(PROMPTS), negative_prompt=rng.choice(PROMPTS), tile_diffusion=tiled,
        tile_diffusion_size=rng.choice([128, 136, 160, 192]), tile_diffusion_stride=rng.choice([64, 72, 80, 96, 120]),
        tile_vae=rng.random() < 0.35, vae_decoder_tile_size=rng.choice([8, 16, 24, 40]), vae_encoder_tile_size=1024)
    flags = ["--weights", str(model), "--scale", str(scale), "--steps", str(steps), "--t-max", str(t_max),
             "--t-min", str(t_min), "--cfg-scale", str(spec["guidance_scale"]), "--prompt", spec["added_prompt"],
             "--negative-prompt", spec["negative_prompt"], "--seed", str(spec["seed"]),
             "--color-fix", {"nofix": "none"}.get(spec["align_method"], spec["align_method"]),
             "--process-size", str(spec["process_size"]), "--start-point", spec["start_point"],
             "--start-steps", str(spec["start_steps"])]
    flags += (["--tile-diffusion", "gaussian", "--tile-diffusion-size", str(spec["tile_diffusion_size"]),
               "--tile-diffusion-stride", str(spec["tile_diffusion_stride"])] if tiled
              else ["--tile-diffusion", "none"])
    flags += (["--tile-vae", "--tile-vae-decoder-size", str(spec["vae_decoder_tile_size"])] if spec["tile_vae"]
              else ["--no-tile-vae"])
    return spec, flags


def v1_case(rng: random.Random, folder: Path) -> tuple[dict, list[str]]:
    """The reference's command line (``inference_ccsr.py`` or ``inference_ccsr_tile.py``) and our flags."""
    fx = FIXTURES / "ccsr_v1_tiny"
    mode = rng.choice(["plain", "mix", "mix", "gaussian", "gaussian", "gaussian+vae", "vae"])
    small = mode in ("plain", "vae")  # untiled runs process at >= 512 px: the slow ones
    make_input(rng, folder / "in" / "x.png", 20, 60 if small else 64)
    steps = rng.choice([2, 3, 4, 6] if small else [2, 3, 5, 6, 8, 10])
    scale = rng.choice([1, 2, 2.5, 3, 4] if small else [2, 3, 4, 4.5, 6])
    t_max = round(rng.uniform(0.4, 1.0), 4)
    t_min = round(rng.uniform(0.0, t_max - 0.1), 4)
    seed, fix = rng.randrange(2**31), rng.choice(["adain", "wavelet", "none"])
    size = rng.choice([128, 192, 256])  # the tiny model's UNet needs latent tiles of 16+
    stride = rng.choice([s for s in (64, 96, 128, 160) if s < size])
    argv = ["--config", str(fx / "model.yaml"), "--ckpt", str(fx / "model.ckpt"), "--input", str(folder / "in"),
            "--output", str(folder / "ref"), "--device", "cpu", "--steps", str(steps), "--sr_scale", str(scale),
            "--t_max", str(t_max), "--t_min", str(t_min), "--color_fix_type", fix, "--seed", str(seed)]
    flags = ["--weights", str(fx / "model.ckpt"), "--config", str(fx / "model.yaml"), "--scale", str(scale),
             "--steps", str(steps), "--t-max", str(t_max), "--t-min", str(t_min), "--color-fix", fix,
             "--seed", str(seed)]
    script = "inference_ccsr" if mode in ("plain", "mix") else "inference_ccsr_tile"
    if mode == "mix":
        argv += ["--tiled", "--tile_size", str(size), "--tile_stride", str(stride)]
    if mode.startswith("gaussian"):
        argv += ["--tile_diffusion", "--tile_diffusion_size", str(size), "--tile_diffusion_stride", str(stride)]
    flags += (["--tile-diffusion", mode.split("+")[0], "--tile-diffusion-size", str(size),
               "--tile-diffusion-stride", str(stride)] if mode in ("mix", "gaussian", "gaussian+vae")
              else ["--tile-diffusion", "none"])
    if mode.endswith("vae"):
        tile = rng.choice([8, 16, 24])
        argv += ["--tile_vae", "--vae_decoder_tile_size", str(tile), "--vae_encoder_tile_size", "256"]
        flags += ["--tile-vae", "--tile-vae-decoder-size", str(tile)]
    else:
        flags += ["--no-tile-vae"]
    spec = dict(script=script, argv=argv, seed=seed, open_clip_config=str(fx / "open_clip_config"))
    return spec, flags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("version", choices=["v1", "v2"])
    ap.add_argument("--repo", required=True, help="checkout of the reference (v1: main; v2: the CCSR-v2.0 branch)")
    ap.add_argument("--ref-python", required=True, help="python of the venv with the reference's dependencies")
    ap.add_argument("-n", type=int, default=20, help="cases")
    ap.add_argument("--seed", type=int, default=1, help="draws the cases")
    ap.add_argument("--keep", type=Path, help="keep each case's files under this folder")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="ccsr-sweep-"))
    shims = work / "shims"
    write_shims(shims)
    failures = 0
    try:
        for i in range(a.n):
            folder = (a.keep or work) / f"case_{a.seed}_{i}"
            shutil.rmtree(folder, ignore_errors=True)
            spec, flags = (v1_case if a.version == "v1" else v2_case)(rng, folder)
            ref = subprocess.run([a.ref_python, str(shims / "ccsr_reference_runner.py"), a.version, a.repo,
                                  json.dumps(spec)], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(shims)})
            if ref.returncode:
                print(i, "REF FAILED", ref.stderr.strip().splitlines()[-1:], flush=True)
                continue
            ours = subprocess.run([sys.executable, "-m", "ccsr.cli", "upscale", str(folder / "in" / "x.png"), "-o",
                                   str(folder / "ours.png"), "--device", "cpu", "--dtype", "float32", "--exact",
                                   "-q", *flags], capture_output=True, text=True,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if ours.returncode:
                failures += 1
                print(i, "OURS FAILED", " ".join(flags), ours.stderr.strip().splitlines()[-1:], flush=True)
                continue
            x = np.asarray(Image.open(next((folder / "ref").rglob("*.png")))).astype(int)
            y = np.asarray(Image.open(folder / "ours.png")).astype(int)
            if x.shape != y.shape:
                failures += 1
                print(i, "SHAPE", x.shape, y.shape, " ".join(flags), flush=True)
                continue
            diff = np.abs(x - y)
            ok = (diff > 1).mean() <= 0.001 and diff.max() <= 2
            failures += not ok
            print(i, "OK " if ok else "BAD", f"max {diff.max()} off-by-more-than-1 {(diff > 1).mean():.5f} "
                  f"differing {(diff > 0).mean():.5f}", " ".join(flags[2:] if flags[0] == "--weights" else flags),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
