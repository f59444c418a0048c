"""``ccsr`` command line: upscale, convert, serve, bench, eval.

Every user error ends in one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ccsr.params import COLOR_FIXES, SIZE_MODES, START_POINTS, TILE_DIFFUSIONS, ParamError, UpscaleParams

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPG", ".jpeg": "JPG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


class CLIError(Exception):
    """A user-facing error: printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--weights", help="checkpoint (.ckpt/.safetensors), `ccsr convert` folder, CCSR-v2 folder "
                                     "(stable-diffusion-2-1-base/, controlnet/, vae/) or hf://owner/repo/file "
                                     "(default: the released CCSR-v1 checkpoint, downloaded once and cached)")
    g.add_argument("--config", help="LDM yaml of the checkpoint (default: the built-in CCSR-v1 SD-2.1 config)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="network precision (default: float32 on CPU, float16 on CUDA)")
    g.add_argument("--tokenizer", help="CLIP tokenizer folder for prompts (vocab.json + merges.txt)")
    g.add_argument("--max-memory", help="working memory automatic tiling may plan for, e.g. 6G "
                                        "(default: $CCSR_MAX_MEMORY, else 80%% of what the device has free)")


def add_upscale_params(p: argparse.ArgumentParser) -> None:
    """Flags named after the fal parameters; defaults from :class:`UpscaleParams`."""
    d = UpscaleParams()
    g = p.add_argument_group("upscale")
    g.add_argument("--scale", type=float, default=d.scale, help=f"upscale factor (default {d.scale})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"spaced sampling steps S (default {d.steps})")
    g.add_argument("--t-max", type=float, default=d.t_max, help=f"truncation start (default {d.t_max})")
    g.add_argument("--t-min", type=float, default=d.t_min, help=f"truncation end (default {d.t_min})")
    g.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    g.add_argument("--color-fix", choices=COLOR_FIXES, default=d.color_fix)
    g.add_argument("--tile-diffusion", choices=TILE_DIFFUSIONS, default=d.tile_diffusion,
                   help="auto (default): untiled when it fits in free memory, else mix tiles")
    g.add_argument("--tile-diffusion-size", type=int, default=d.tile_diffusion_size,
                   help="tile size in pixels (default: windows near the native 512 px covering each axis 1.25x)")
    g.add_argument("--tile-diffusion-stride", type=int, default=d.tile_diffusion_stride,
                   help="stride in pixels (default: planned with the tile; 3/4 of a tile given alone)")
    g.add_argument("--tile-vae", action=argparse.BooleanOptionalAction, default=d.tile_vae,
                   help="decode with the tiled VAE (default: only when a whole decode would not fit)")
    g.add_argument("--tile-vae-decoder-size", type=int, default=d.tile_vae_decoder_size,
                   help="in latent pixels (default: chosen from free memory)")
    g.add_argument("--tile-vae-encoder-size", type=int, default=d.tile_vae_encoder_size, help="in image pixels")
    g.add_argument("--prompt", default=d.prompt)
    g.add_argument("--negative-prompt", default=d.negative_prompt)
    g.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    g.add_argument("--controlnet-weight", type=float, default=d.controlnet_weight)
    g.add_argument("--size-mode", choices=SIZE_MODES, default=d.size_mode,
                   help="reference: resize to a multiple of 64 and back (the reference's pixels); "
                        "pad: reflect-pad and crop, no second resampling")
    g.add_argument("--process-size", type=int, default=d.process_size,
                   help=f"CCSR-v2: inputs below PROCESS_SIZE / scale are enlarged first (default {d.process_size})")
    g.add_argument("--start-point", choices=START_POINTS, default=d.start_point,
                   help="CCSR-v2: start from the input's latent diffused to --start-steps (lr) or from noise")
    g.add_argument("--start-steps", type=int, default=d.start_steps, help=f"CCSR-v2 (default {d.start_steps})")
    g.add_argument("--preset", help="the model's documented starting point (CCSR-v2: one-step, two-step); "
                                    "flags given override it (default: the model's own defaults)")


def params_from_args(a: argparse.Namespace) -> UpscaleParams:
    return UpscaleParams(
        scale=a.scale, steps=a.steps, t_max=a.t_max, t_min=a.t_min, seed=a.seed, color_fix=a.color_fix,
        tile_diffusion=a.tile_diffusion, tile_diffusion_size=a.tile_diffusion_size,
        tile_diffusion_stride=a.tile_diffusion_stride, tile_vae=a.tile_vae,
        tile_vae_decoder_size=a.tile_vae_decoder_size, tile_vae_encoder_size=a.tile_vae_encoder_size,
        prompt=a.prompt, negative_prompt=a.negative_prompt, cfg_scale=a.cfg_scale,
        controlnet_weight=a.controlnet_weight, size_mode=a.size_mode,
        process_size=a.process_size, start_point=a.start_point, start_steps=a.start_steps,
    ).validate()


def with_model_defaults(params: UpscaleParams, a: argparse.Namespace, descriptor) -> UpscaleParams:  # type: ignore[no-untyped-def]
    """The model's defaults (or ``--preset``) for every parameter the command line did not spell out."""
    if a.preset and a.preset not in descriptor.presets:
        known = ", ".join(descriptor.presets) or "none"
        raise CLIError(f"--preset: {descriptor.name} has no preset {a.preset!r} (its presets: {known})")
    base = descriptor.presets[a.preset] if a.preset else descriptor.defaults
    given = getattr(a, "given_flags", set())
    return params.replace(**{k: v for k, v in base.items() if "--" + k.replace("_", "-") not in given}).validate()


def load_pipeline(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ccsr.pipeline import CCSRPipeline

    if getattr(a, "tokenizer", None):
        os.environ["CCSR_TOKENIZER"] = a.tokenizer
    from ccsr.pipeline import parse_bytes

    try:
        max_memory = parse_bytes(a.max_memory) if getattr(a, "max_memory", None) else None
    except ValueError as e:
        raise CLIError(f"--max-memory: {e}") from None
    return CCSRPipeline.from_single_file(a.weights, config=a.config, device=a.device,
                                         dtype=None if a.dtype == "auto" else a.dtype, max_memory=max_memory)


# -- upscale ---------------------------------------------------------------------------------------------------


def _advance(bar, done: int, total: int) -> None:  # type: ignore[no-untyped-def]
    if bar.total != total:  # the first call, or an out-of-memory retry that re-planned with more tiles
        bar.reset(total)
    bar.update(done - bar.n)


def _collect_inputs(inputs: Sequence[str]) -> list[tuple[Path, Path]]:
    """(file, path relative to its input root) for every image named or found (recursively) in a folder."""
    found: list[tuple[Path, Path]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((f, f.relative_to(path)))
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise CLIError(f"input not found: {raw}")
    if not found:
        raise CLIError("no input images found")
    return found


def _plan_outputs(files: list[tuple[Path, Path]], out: str, fmt: str | None) -> list[tuple[Path, Path]]:
    out_path = Path(out)
    single_file = len(files) == 1 and out_path.suffix.lower() in OUTPUT_FORMATS and not out_path.is_dir()
    if single_file:
        return [(files[0][0], out_path)]
    ext = "." + (fmt or "png").lower()
    return [(src, out_path / rel.with_suffix(ext)) for src, rel in files]


def cmd_upscale(a: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from ccsr import imaging
    from ccsr.jobs.chain import upscale_encode

    params = params_from_args(a)
    jobs = _plan_outputs(_collect_inputs(a.inputs), a.output, a.format)
    if a.save_float and len(jobs) != 1:
        raise CLIError("--save-float needs exactly one input image")
    todo = [(s, d) for s, d in jobs if a.overwrite or not d.exists()]
    for s, d in jobs:
        if (s, d) not in todo:
            print(f"skip {s} ({d} exists; --overwrite to redo)", file=sys.stderr)
    limits = imaging.Limits(max_output_side=a.max_output_side) if a.max_output_side else imaging.Limits()
    failures = 0
    readable = []
    for src, dst in todo:  # a cheap look at the header first: no model load for a folder of non-images
        with src.open("rb") as f:
            fmt = imaging.sniff_format(f.read(64))
        if fmt not in limits.formats:
            print(f"ccsr: error: {src}: not a supported image (accepted: {', '.join(sorted(limits.formats))})",
                  file=sys.stderr)
            failures += 1
        else:
            readable.append((src, dst))
    if not readable:
        return 1 if failures else 0
    pipe = load_pipeline(a)
    params = with_model_defaults(params, a, pipe.descriptor)
    for src, dst in readable:
        try:
            decoded = imaging.decode(src.read_bytes(), limits)
        except imaging.ImageError as exc:
            print(f"ccsr: error: {src}: {exc.message}", file=sys.stderr)
            failures += 1
            continue
        bar = tqdm(total=None, desc=src.name, unit="eval", leave=True, disable=a.quiet)  # total: at the first call
        t0 = time.perf_counter()
        fmt = OUTPUT_FORMATS.get(dst.suffix.lower(), "PNG")
        options = imaging.EncodeOptions(format=fmt, quality=a.quality, keep_metadata=not a.strip_metadata)
        encoded, out = upscale_encode(
            pipe, decoded, params, options, quantize="reference" if a.exact else "round",
            keep_float=bool(a.save_float), progress=lambda done, t, bar=bar: _advance(bar, done, t),
            log=None if a.quiet else bar.write,
        )
        bar.close()
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        tmp.write_bytes(encoded.data)
        tmp.replace(dst)
        if a.save_float:
            np.save(a.save_float, out.processed)
        if not a.quiet:
            print(f"{src} -> {dst} {encoded.width}x{encoded.height} seed={out.seed} "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 1 if failures else 0


# -- convert ---------------------------------------------------------------------------------------------------


def cmd_convert(a: argparse.Namespace) -> int:
    import torch

    from ccsr.model import convert

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[a.dtype]
    convert(a.weights, a.output, config=a.config, dtype=dtype, log=lambda m: print(m, file=sys.stderr))
    return 0


# -- entry -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ccsr", description="CCSR diffusion upscaler: library, CLI and server.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = sub.add_parser("upscale", help="upscale image files or folders")
    up.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    up.add_argument("-o", "--output", required=True,
                    help="output folder, or an output file name when there is one input")
    up.add_argument("--format", choices=["png", "jpg", "webp", "tiff"], help="output format in folder mode")
    up.add_argument("--quality", type=int, default=95, help="JPG/WEBP quality 20-99 (default 95)")
    up.add_argument("--strip-metadata", action="store_true", help="drop EXIF/XMP (the colour profile is kept)")
    up.add_argument("--exact", action="store_true",
                    help="quantise 8-bit output exactly as the reference code (truncation); default rounds")
    up.add_argument("--max-output-side", type=int, help="shrink the input so the output fits (default 4096)")
    up.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")
    up.add_argument("--save-float", metavar="FILE.npy",
                    help="also save the clamped float sampler output at the processing size (HWC float32)")
    up.add_argument("-q", "--quiet", action="store_true")
    _model_args(up)
    add_upscale_params(up)
    up.set_defaults(func=cmd_upscale)

    cv = sub.add_parser("convert", help="write a fast-loading safetensors folder from a checkpoint")
    cv.add_argument("output", help="output folder")
    cv.add_argument("--weights", help="source checkpoint (default: the released CCSR-v1)")
    cv.add_argument("--config", help="LDM yaml of the checkpoint")
    cv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    cv.set_defaults(func=cmd_convert)

    try:
        from ccsr.api import serve as serve_mod
    except ImportError:  # the server extra is not installed
        serve_mod = None
    if serve_mod is not None:
        sv = sub.add_parser("serve", help="run the Runware/fal-compatible HTTP server")
        serve_mod.add_arguments(sv)
        sv.set_defaults(func=serve_mod.run)

    from ccsr import worker as worker_mod

    wk = sub.add_parser("worker", help="run a GPU worker of the distributed backend (Celery + Redis)")
    worker_mod.add_arguments(wk)
    wk.set_defaults(func=worker_mod.run)

    from ccsr import bench as bench_mod

    bench_mod.add_commands(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    from ccsr.model import CheckpointKeyError, ConfigError, WeightsError
    from ccsr.model.text import TokenizerError

    errors: list[type[BaseException]] = [CLIError, ParamError, WeightsError, ConfigError, CheckpointKeyError,
                                         TokenizerError, FileNotFoundError, PermissionError, IsADirectoryError]
    try:
        from ccsr.imaging import ImageError

        errors.append(ImageError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given_flags = {s.split("=")[0] for s in (sys.argv[1:] if argv is None else argv) if s.startswith("--")}
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ccsr: interrupted", file=sys.stderr)
        return 130
    except _known_errors() as exc:
        msg = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        print(f"ccsr: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
