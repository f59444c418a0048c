"""``ccsr`` command line: upscale, convert, serve, bench, eval.

Every user error ends in one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ccsr.params import COLOR_FIXES, SIZE_MODES, START_POINTS, TILE_DIFFUSIONS, ParamError, UpscaleParams

if TYPE_CHECKING:  # the heavy imports stay lazy: `ccsr --help` and one-line errors must not wait for torch
    from ccsr import imaging
    from ccsr.cli_progress import FileProgress, FileResult
    from ccsr.model import ModelDescriptor
    from ccsr.pipeline import CCSRPipeline
    from ccsr.planning import Planner

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


class CLIError(Exception):
    """A user-facing error: printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    """The model flags, with the same ``CCSR_*`` environment variables as ``ccsr serve`` (flags win)."""
    env = os.environ.get
    g = p.add_argument_group("model (each flag defaults to its CCSR_* environment variable, as in `ccsr serve`)")
    g.add_argument("--weights", default=env("CCSR_WEIGHTS"),
                   help="checkpoint (.ckpt/.safetensors), `ccsr convert` folder, CCSR-v2 folder "
                        "(stable-diffusion-2-1-base/, controlnet/, vae/) or hf://owner/repo/file "
                        "[CCSR_WEIGHTS; default: the released CCSR-v1 checkpoint, downloaded once and cached]")
    g.add_argument("--config", default=env("CCSR_CONFIG"),
                   help="LDM yaml of the checkpoint [CCSR_CONFIG; default: the built-in CCSR-v1 SD-2.1 config]")
    g.add_argument("--device", default=env("CCSR_DEVICE"),
                   help="cpu, cuda, cuda:N or mps [CCSR_DEVICE; default: best available]")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default=env("CCSR_DTYPE") or "auto",
                   help="network precision [CCSR_DTYPE; default auto: float32 on CPU, float16 on CUDA]")
    g.add_argument("--tokenizer", help="CLIP tokenizer folder for prompts (vocab.json + merges.txt) [CCSR_TOKENIZER]")
    g.add_argument("--max-memory", help="working memory automatic tiling may plan for, e.g. 6G "
                                        "[CCSR_MAX_MEMORY; default: 80%% of what the device has free]")


def add_upscale_params(p: argparse.ArgumentParser, seed_help: str = "random seed (default: random, printed)") -> None:
    """Flags named after the fal parameters; defaults from :class:`UpscaleParams`. ``seed_help``: for commands
    that use the seed differently (``eval`` counts up from it)."""
    d = UpscaleParams()
    g = p.add_argument_group("upscale")
    g.add_argument("--scale", type=float, default=d.scale, help=f"upscale factor (default {d.scale})")
    g.add_argument("--steps", type=int, default=d.steps, help=f"spaced sampling steps S (default {d.steps})")
    g.add_argument("--t-max", type=float, default=d.t_max, help=f"truncation start (default {d.t_max})")
    g.add_argument("--t-min", type=float, default=d.t_min, help=f"truncation end (default {d.t_min})")
    g.add_argument("--seed", type=int, help=seed_help)
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


def check_device(spec: str | None) -> None:
    """Refuse a device this torch cannot use, in one line, before anything loads."""
    if spec is None:
        return
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise CLIError(f"--device {spec}: not a device (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise CLIError(f"--device {spec}: this torch ({torch.__version__}) was built without CUDA; "
                           "install a CUDA build (see CCSR_TORCH in scripts/install.sh) or use --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise CLIError(f"--device {spec}: no CUDA device is visible")
        if device.index is not None and device.index >= count:
            raise CLIError(f"--device {spec}: only {count} CUDA device(s) visible (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CLIError(f"--device {spec}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise CLIError(f"--device {spec}: unsupported device type (use cpu, cuda, cuda:N or mps)")


def check_model_args(a: argparse.Namespace) -> int | None:
    """Device, dtype and memory budget checked before any weights are read; returns ``--max-memory`` in bytes."""
    from ccsr.pipeline import parse_bytes

    if a.dtype not in DTYPE_CHOICES:  # from CCSR_DTYPE: argparse checks only what is typed
        raise CLIError(f"dtype {a.dtype!r} (CCSR_DTYPE): use one of {', '.join(DTYPE_CHOICES)}")
    check_device(a.device)
    try:
        return parse_bytes(a.max_memory) if getattr(a, "max_memory", None) else None
    except ValueError as e:
        raise CLIError(f"--max-memory: {e}") from None


def with_model_defaults(params: UpscaleParams, a: argparse.Namespace,
                        descriptor: ModelDescriptor) -> UpscaleParams:
    """The model's defaults (or ``--preset``) for every parameter the command line did not spell out."""
    if a.preset and a.preset not in descriptor.presets:
        known = ", ".join(descriptor.presets) or "none"
        raise CLIError(f"--preset: {descriptor.name} has no preset {a.preset!r} (its presets: {known})")
    base = descriptor.presets[a.preset] if a.preset else descriptor.defaults
    given = getattr(a, "given_flags", set())
    return params.replace(**{k: v for k, v in base.items() if "--" + k.replace("_", "-") not in given}).validate()


def load_pipeline(a: argparse.Namespace) -> CCSRPipeline:
    max_memory = check_model_args(a)
    from ccsr.pipeline import CCSRPipeline

    if getattr(a, "tokenizer", None):
        os.environ["CCSR_TOKENIZER"] = a.tokenizer
    return CCSRPipeline.from_single_file(a.weights, config=a.config, device=a.device,
                                         dtype=None if a.dtype == "auto" else a.dtype, max_memory=max_memory)


# -- upscale ---------------------------------------------------------------------------------------------------


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
    """(input, output) pairs. ``-o`` with an image suffix names the one output file; otherwise it is a folder
    and outputs keep their relative paths with the ``--format`` suffix (PNG by default). Refused before any
    work: a file name for several inputs, a ``--format`` that contradicts the file name, and two inputs that
    would write one output (``x.jpg`` and ``x.png``)."""
    from ccsr.imaging.formats import find

    out_path = Path(out)
    named = find(out_path.suffix)
    if named is not None and named.encode and not out_path.is_dir():
        if len(files) != 1:
            raise CLIError(f"-o {out} names one file but there are {len(files)} inputs: give a folder")
        if fmt is not None and find(fmt) != named:
            raise CLIError(f"--format {fmt} contradicts -o {out} (a {named.name} file name): drop one of them")
        return [(files[0][0], out_path)]
    ext = "." + (fmt or "png")
    jobs = [(src, out_path / rel.with_suffix(ext)) for src, rel in files]
    seen: dict[Path, Path] = {}
    for src, dst in jobs:
        if dst in seen:
            raise CLIError(f"{seen[dst]} and {src} would both write {dst}: rename one, or upscale them separately")
        seen[dst] = src
    return jobs


def _check_output_location(dst: Path) -> None:
    """The output's folder must exist or be creatable, and be writable: known before the model loads."""
    if dst.is_dir():
        raise CLIError(f"output {dst} is a folder")
    parent = dst.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"cannot write {dst}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write {dst}: {parent} is not writable")


def _model_without_weights(a: argparse.Namespace) -> tuple[ModelDescriptor, type[Planner]]:
    """The model's self-description from its config alone (networks built on the meta device, no weights read)
    and the planner of its kind. A converted folder carries its config, a CCSR-v2 folder its json configs;
    otherwise ``--config`` or the built-in one."""
    import torch

    from ccsr.model import CCSRConfig, CCSRModel, load_config
    from ccsr.model.components import build_empty
    from ccsr.model.loading import is_converted, read_converted_index
    from ccsr.model.text import TextConditioner
    from ccsr.model.v2 import describe_v2, is_v2_folder
    from ccsr.pipeline_v2 import V2Planner
    from ccsr.planning import Planner

    folder = Path(a.weights) if a.weights else None
    if folder is not None and is_v2_folder(folder):
        return describe_v2(folder), V2Planner
    if a.config is None and folder is not None and folder.is_dir() and is_converted(folder):
        cfg = CCSRConfig.from_dict(read_converted_index(folder)["config"], source=str(folder))
    else:
        cfg = load_config(a.config)
    text = TextConditioner(cfg, None, torch.empty(0, device="meta"))
    return CCSRModel(cfg, text=text, source="(config only)", **build_empty(cfg, with_text=False)).descriptor, Planner


def _dry_run(a: argparse.Namespace, params: UpscaleParams, limits: imaging.Limits,
             work: list[tuple[Path, Path, tuple[int, int]]], max_memory: int | None) -> dict:
    """The plan of every file (sizes, tiles, evaluations, memory) from the config: no weights are loaded."""
    import torch

    from ccsr import imaging
    from ccsr.pipeline import default_device, parse_dtype, working_memory
    from ccsr.planning import SAFETY, free_memory

    device = torch.device(a.device) if a.device else default_device()
    dtype = parse_dtype(None if a.dtype == "auto" else a.dtype, device)
    max_memory = working_memory(max_memory)
    descriptor, planner_kind = _model_without_weights(a)
    params = with_model_defaults(params, a, descriptor)
    if max_memory is None:  # the budget as it will be once the weights (not loaded here) take their share
        weights = descriptor.parameters * torch.finfo(dtype).bits // 8
        max_memory = max(int((free_memory(device) - weights) * SAFETY), 1)
    planner = planner_kind(descriptor, device, dtype, max_memory)
    plans = []
    for src, dst, in_size in work:
        size = imaging.fit_scale(in_size, float(params.scale), limits).input_size  # --max-output-side
        plan = planner.plan(size, params)
        entry = {"input": str(src), "output": str(dst), "input_size": list(in_size), "model_input_size": list(size),
                 "output_size": list(plan.geometry.target), "processing_size": list(plan.geometry.process),
                 "tiles": plan.windows if plan.tiles else 0, "evaluations": plan.evaluations,
                 "vae_decode": plan.decode, "memory_bytes": plan.estimate, "budget_bytes": plan.budget,
                 "plan": plan.describe()}
        plans.append(entry)
        if not a.quiet:
            shrunk = "" if size == in_size else f" (shrunk to {size[0]}x{size[1]} first)"
            print(f"{src} -> {dst}: {in_size[0]}x{in_size[1]}{shrunk} -> "
                  f"{entry['output_size'][0]}x{entry['output_size'][1]} "
                  f"(processed at {entry['processing_size'][0]}x{entry['processing_size'][1]}), "
                  f"{plan.evaluations} evaluations; {plan.describe()}", file=sys.stderr)
    if not a.quiet:
        print(f"dry run on {device} ({str(dtype).removeprefix('torch.')}), {descriptor.name}: nothing loaded or "
              "written; no time estimate (it depends on the device: `ccsr bench` measures one evaluation)",
              file=sys.stderr)
    return {"dry_run": True, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "files": plans}


def _fit(decoded: imaging.DecodedImage, scale: float, limits: imaging.Limits
         ) -> tuple[imaging.DecodedImage, tuple[int, int], str | None]:
    """The input shrunk first when ``scale`` would take the output past ``--max-output-side`` (the server's and
    Runware's rule); returns (image, expected output size, note or None)."""
    from ccsr import imaging

    fit = imaging.fit_scale(decoded.size, scale, limits)
    if fit.shrink is None:
        return decoded, fit.output_size(scale), None
    note = (f"input shrunk from {decoded.size[0]}x{decoded.size[1]} to {fit.input_size[0]}x{fit.input_size[1]} "
            f"to keep the output within {limits.max_output_side}x{limits.max_output_side}")
    return imaging.shrink(decoded, fit.input_size), fit.output_size(scale), note


def _write_json(target: str, data: dict) -> None:
    text = json.dumps(data, indent=1)
    if target == "-":
        print(text)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text + "\n")


def cmd_upscale(a: argparse.Namespace) -> int:
    """Everything a user can get wrong is refused before the model loads; then files run one by one, a failed
    file does not stop the batch, and the exit code is 1 when any failed."""
    from ccsr import imaging
    from ccsr.cli_progress import BatchReport, FileResult

    params = params_from_args(a)
    if a.max_output_side is not None and a.max_output_side < 1:
        raise CLIError("--max-output-side must be at least 1")
    limits = imaging.Limits(max_output_side=a.max_output_side or imaging.Limits().max_output_side)
    try:
        imaging.EncodeOptions(quality=a.quality).validated()
    except imaging.ImageError as e:
        raise CLIError(f"--quality: {e.message}") from None
    max_memory = check_model_args(a)
    jobs = _plan_outputs(_collect_inputs(a.inputs), a.output, a.format)
    if a.save_float and len(jobs) != 1:
        raise CLIError("--save-float needs exactly one input image")
    for _, dst in jobs:
        _check_output_location(dst)
    if a.save_float:
        _check_output_location(Path(a.save_float))

    report = BatchReport(0, quiet=a.quiet)
    work: list[tuple[Path, Path, tuple[int, int]]] = []
    for src, dst in jobs:
        if dst.exists() and not a.overwrite and not a.dry_run:
            report.end(FileResult(str(src), str(dst), "skipped", f"{dst} exists; --overwrite to redo"))
            continue
        try:  # the header only: no model load for a folder of non-images
            size = _header_size(src, limits)
        except imaging.ImageError as e:
            report.end(FileResult(str(src), str(dst), "failed", e.message))
            continue
        work.append((src, dst, size))
    if a.dry_run:
        if not work:
            raise CLIError("nothing to plan: " + "; ".join(r.error or "" for r in report.results))
        plan = _dry_run(a, params, limits, [(s, d, _oriented_size(s, limits)) for s, d, _ in work], max_memory)
        if a.json:
            _write_json(a.json, plan)
        return 0
    report.total = len(work)
    if work:
        pipe = load_pipeline(a)
        params = with_model_defaults(params, a, pipe.descriptor)
        remaining = [_output_pixels(size, params.scale, limits) for _, _, size in work]
        try:
            for i, (src, dst, _) in enumerate(work):
                progress = report.begin(i + 1, str(src), str(dst), sum(remaining[i:]))
                result = _upscale_one(a, pipe, params, limits, src, dst, progress)
                report.end(result, remaining[i])
        finally:  # Ctrl+C: the bar is cleared before the one-line message
            if report.current is not None:
                report.current.close()
    report.summary()
    if a.json:
        _write_json(a.json, report.to_json())
    return 1 if report.counts()["failed"] else 0


def _header_size(src: Path, limits: imaging.Limits) -> tuple[int, int]:
    """Width and height from the file's header (format sniffed, as the decoder will); pixels are not decoded."""
    from PIL import Image

    from ccsr import imaging

    with src.open("rb") as f:
        head = f.read(64)
    if not head:
        raise imaging.ImageError("unsupported_format", "the file is empty")
    limits.check_format(imaging.sniff_format(head))
    try:
        with Image.open(src) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise imaging.ImageError("corrupt", f"unreadable image header ({e.__class__.__name__})") from None


def _oriented_size(src: Path, limits: imaging.Limits) -> tuple[int, int]:
    """The size the model sees (EXIF orientation applied): a decode, for the dry run's exact plan."""
    from ccsr import imaging

    return imaging.decode(src.read_bytes(), limits).size


def _output_pixels(size: tuple[int, int], scale: float, limits: imaging.Limits) -> int:
    from ccsr import imaging

    w, h = imaging.fit_scale(size, scale, limits).output_size(scale)
    return w * h


def _upscale_one(a: argparse.Namespace, pipe: CCSRPipeline, params: UpscaleParams, limits: imaging.Limits,
                 src: Path, dst: Path, progress: FileProgress) -> FileResult:
    """One file, start to finish; a problem with this file (not with the setup) is its failed result."""
    import numpy as np

    from ccsr import imaging
    from ccsr.cli_progress import FileResult
    from ccsr.jobs.chain import upscale_encode
    from ccsr.planning import is_out_of_memory

    t0 = time.perf_counter()
    notes: list[str] = []
    try:
        decoded, expected, note = _fit(imaging.decode(src.read_bytes(), limits), float(params.scale), limits)
        if note:
            notes.append(note)
            progress.log(note)
        options = imaging.EncodeOptions(format=dst.suffix, quality=a.quality,
                                        keep_metadata=not a.strip_metadata).validated()
        encoded, out = upscale_encode(
            pipe, decoded, params, options, quantize="reference" if a.exact else "round", expected=expected,
            keep_float=bool(a.save_float), progress=progress.evaluations, log=progress.log,
        )
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".part")
        try:
            tmp.write_bytes(encoded.data)
            tmp.replace(dst)
        finally:
            tmp.unlink(missing_ok=True)
        if a.save_float:
            np.save(a.save_float, out.processed)
    except imaging.ImageError as e:
        return FileResult(str(src), str(dst), "failed", e.message, notes=notes)
    except (ParamError, OSError) as e:
        return FileResult(str(src), str(dst), "failed", str(e).splitlines()[0], notes=notes)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        return FileResult(str(src), str(dst), "failed", f"out of memory even with the smallest plan: {e}",
                          notes=notes)
    timings = {k: round(v, 3) for k, v in out.timings.items()}
    return FileResult(str(src), str(dst), "done", width=encoded.width, height=encoded.height, seed=out.seed,
                      seconds=round(time.perf_counter() - t0, 3), timings=timings, notes=notes)


# -- convert ---------------------------------------------------------------------------------------------------


def cmd_convert(a: argparse.Namespace) -> int:
    import torch

    from ccsr.model import convert

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[a.dtype]
    started = time.time()
    out = convert(a.weights, a.output, config=a.config, dtype=dtype, log=lambda m: print(m, file=sys.stderr))
    _umask_modes(out, since=started)
    return 0


def _umask_modes(folder: Path, since: float) -> None:
    """Give the files just written the mode of any new file (0666 less the umask): safetensors writes its
    files 0600 and the index 0644 came out of plain ``open``, so a converted folder had mixed modes."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file() and f.stat().st_mtime >= since - 1:
            f.chmod(0o666 & ~umask)


# -- entry -----------------------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ccsr {version('ccsr')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "ccsr (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ccsr", description="CCSR diffusion upscaler: library, CLI and server.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    up = sub.add_parser("upscale", help="upscale image files or folders")
    up.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    up.add_argument("-o", "--output", required=True,
                    help="output folder, or an output file name when there is one input")
    up.add_argument("--format", choices=["png", "jpg", "webp", "tiff"],
                    help="output format in folder mode (default png, also for JPEG inputs: lossless, so the "
                         "upscale is not degraded by a second lossy compression); with -o FILE the file name's "
                         "suffix decides, and a --format that contradicts it is an error")
    up.add_argument("--quality", type=int, default=95, help="JPG/WEBP quality 20-99 (default 95)")
    up.add_argument("--strip-metadata", action="store_true", help="drop EXIF/XMP (the colour profile is kept)")
    up.add_argument("--exact", action="store_true",
                    help="quantise 8-bit output exactly as the reference code (truncation); default rounds")
    up.add_argument("--max-output-side", type=int,
                    help="largest output side: a larger input is shrunk first so the output fits (default 4096)")
    up.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them)")
    up.add_argument("--save-float", metavar="FILE.npy",
                    help="also save the clamped float sampler output at the processing size (HWC float32)")
    up.add_argument("--dry-run", action="store_true",
                    help="print each file's plan (output size, tiles, evaluations, memory) without loading weights")
    up.add_argument("--json", metavar="FILE",
                    help="write per-file results and a summary (or the --dry-run plan) as JSON; - for stdout")
    up.add_argument("-q", "--quiet", action="store_true", help="only errors and the summary of a failed batch")
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


if __name__ == "__main__":  # python -m ccsr.cli: run the imported module's main, whose CLIError other modules raise
    from ccsr.cli import main as ccsr_main

    sys.exit(ccsr_main())
