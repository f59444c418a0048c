"""``ccsr bench`` and ``ccsr eval``: speed and memory of the pipeline at real model size, and quality metrics.

``ccsr bench`` builds the networks from a config (default: the built-in CCSR-v1 / SD-2.1-size config) with
random weights, so nothing is downloaded: speed and memory do not depend on weight values (``--model v2``: the
released CCSR-v2 architecture and :class:`ccsr.pipeline_v2.CCSRv2Pipeline`). It runs the real
:class:`ccsr.pipeline.CCSRPipeline` on a synthetic input and reports wall time per image, time per network
evaluation (ControlNet + UNet), per hint encode (condition encoder) and per decode, peak memory and output
megapixels per second. ``ccsr eval`` lives in :mod:`ccsr.evaluate`; both are registered here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RANDOM_STD = 0.02
# --output-type values that run the CLI/server chain: rows streamed into the file's pixels, then encoded
FILE_OUTPUTS = ("png", "jpg", "webp", "tiff")  # output formats (ccsr.imaging.formats) by extension


# -- memory --------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Current resident set size of this process (MB = 2**20 bytes)."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    return peak_rss_mb()  # no /proc: the best we have


def peak_rss_mb() -> float:
    """High-water mark of the resident set size since start or the last :func:`reset_peak_rss`."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``); False if not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- machine header ------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info(device: Any, dtype: Any) -> dict[str, Any]:
    import diffusers
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gb": _mem_total_gb(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1024**3, 1)
    return info


# -- random-weight model -------------------------------------------------------------------------------------


def _randomise(module: Any, gen: Any, std: float) -> None:
    """Materialise a meta-built module on the CPU with small random weights (fast, never NaN)."""
    import torch
    from torch import nn

    module.to_empty(device="cpu")
    with torch.no_grad():
        for sub in module.modules():
            is_norm = isinstance(sub, nn.GroupNorm | nn.LayerNorm | nn.BatchNorm2d)
            for name, p in sub.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias" or p.dim() < 2:
                    p.zero_()
                else:
                    p.normal_(0.0, std, generator=gen)
            for name, b in sub.named_buffers(recurse=False):
                b.zero_() if b.is_floating_point() else b.copy_(torch.arange(b.numel()).view_as(b))
                del name
    module.eval().requires_grad_(False)


def random_model(config: str | Path | None = None, *, seed: int = 0, std: float = RANDOM_STD):  # type: ignore[no-untyped-def]
    """A :class:`ccsr.model.CCSRModel` of the config's real architecture with random weights (no download)."""
    import torch

    from ccsr.model import CCSRModel, load_config
    from ccsr.model.components import build_empty
    from ccsr.model.text import TextConditioner

    cfg = load_config(config)
    modules = build_empty(cfg, with_text=False)
    gen = torch.Generator("cpu").manual_seed(seed)
    for module in modules.values():
        _randomise(module, gen, std)
    dim = int(cfg.unet["cross_attention_dim"])
    context = torch.randn(1, cfg.text.context_length, dim, generator=gen)
    text = TextConditioner(cfg, None, context)
    return CCSRModel(
        cfg,
        text=text,
        source=f"random normal(0, {std}) from {config or 'built-in CCSR-v1 config'}",
        **modules,
    )


def random_model_v2(*, seed: int = 0, std: float = RANDOM_STD):  # type: ignore[no-untyped-def]
    """A :class:`ccsr.model.v2.CCSRv2Model` of the released CCSR-v2's real architecture (SD-2.1-base UNet and
    text encoder, the ControlNet with ``condition_conv_in``, the SD VAE) with random weights (no download). The
    tokenizer is the CLIP BPE vocabulary ccsr ships (``ccsr.model.text.load_tokenizer``)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ccsr.model import load_config
    from ccsr.model.components import CCSRControlNet, text_model_config
    from ccsr.model.text import load_tokenizer
    from ccsr.model.v2 import CCSRv2Model, PromptEncoder

    cfg = load_config(None)  # CCSR-v1's SD-2.1 networks: the same architectures as v2's
    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel(**cfg.unet), "controlnet": CCSRControlNet(**cfg.controlnet),
                   "vae": AutoencoderKL(**cfg.vae)}
    gen = torch.Generator("cpu").manual_seed(seed)
    for module in modules.values():
        _randomise(module, gen, std)

    def text_encoder() -> CLIPTextModel:  # the same random weights every time it is built again
        with torch.device("meta"):
            encoder = CLIPTextModel(text_model_config(cfg))
        _randomise(encoder, torch.Generator("cpu").manual_seed(seed + 1), std)
        return encoder

    def vae_encoder() -> tuple[Any, Any]:  # the same random weights every time it is read again
        with torch.device("meta"):
            vae = AutoencoderKL(**cfg.vae)
        half = torch.nn.ModuleDict({"encoder": vae.encoder, "quant_conv": vae.quant_conv})
        _randomise(half, torch.Generator("cpu").manual_seed(seed + 2), std)
        return half["encoder"], half["quant_conv"]

    modules["vae"].encoder, modules["vae"].quant_conv = vae_encoder()
    tokenizer = _CallableTokenizer(load_tokenizer(), cfg.text.context_length)
    schedule = DDPMScheduler(beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
                             num_train_timesteps=cfg.num_timesteps)
    text = PromptEncoder(text_encoder, tokenizer)
    with torch.device("meta"):
        n_text = sum(p.numel() for p in CLIPTextModel(text_model_config(cfg)).parameters())
    return CCSRv2Model(**modules, text=text, alphas_cumprod=schedule.alphas_cumprod.clone(), text_parameters=n_text,
                       source=f"random normal(0, {std}), CCSR-v2 (SD-2.1-base) architecture", load_encoder=vae_encoder)


class _CallableTokenizer:
    """ccsr's CLIP tokenizer behind the call :class:`ccsr.model.v2.PromptEncoder` makes of a transformers
    ``CLIPTokenizer`` (padded to the context length with id 0, truncated, ``.input_ids``)."""

    def __init__(self, tokenizer: Any, context_length: int):
        self.tokenizer, self.model_max_length = tokenizer, context_length

    def __call__(self, prompt: str, **_: Any) -> Any:
        from types import SimpleNamespace

        from ccsr.model.text import tokenize

        return SimpleNamespace(input_ids=tokenize(self.tokenizer, prompt, self.model_max_length))


# -- instrumentation -----------------------------------------------------------------------------------------


class CallTimer:
    """Wraps a method of an object (a module's ``forward`` by default) on the instance and records the wall time
    of every call."""

    def __init__(self, obj: Any, sync: Callable[[], None] = lambda: None, method: str = "forward"):
        self.calls: list[float] = []
        self.cpu: list[float] = []  # process CPU seconds (all threads) per call
        self._obj, self._method = obj, method
        self._orig = orig = getattr(obj, method)
        calls, cpu = self.calls, self.cpu

        def timed(*args: Any, **kwargs: Any) -> Any:
            sync()
            t, c = time.perf_counter(), time.process_time()
            out = orig(*args, **kwargs)
            sync()
            calls.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            return out

        setattr(obj, method, timed)

    def restore(self) -> None:
        setattr(self._obj, self._method, self._orig)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _synthetic_input(w: int, h: int, seed: int):  # type: ignore[no-untyped-def]
    """A smooth, textured RGB test picture (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for c in range(3):
        fx, fy = rng.uniform(2, 12, size=2)
        chans.append(0.5 + 0.35 * np.sin(2 * np.pi * (fx * xx / w + c / 3)) * np.cos(2 * np.pi * fy * yy / h))
    img = np.stack(chans, -1) + rng.normal(0, 0.03, size=(h, w, 3))
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        size = (int(w), int(h or w))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH (e.g. 256x256), got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def run_bench(
    pipe: Any,
    size: tuple[int, int],
    params: Any,
    *,
    repeat: int = 1,
    warmup: int = 0,
    output_type: str = "np",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time ``repeat`` upscales of a synthetic ``size`` picture; returns per-run figures and a summary.
    ``output_type``: the pipeline's ("np", "pil"), or a file format of :data:`FILE_OUTPUTS` for the whole chain
    of ``ccsr upscale`` and the server (decoded input, rows streamed into the file's pixels, encode)."""
    import numpy as np
    import torch

    device = pipe.device
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    image = _synthetic_input(*size, params.seed or 0)
    model = pipe.model
    plan = pipe.plan(size, params)  # automatic tiling resolved once, so every run does the same work
    params, g, total_evals, n_tiles = plan.params, plan.geometry, plan.evaluations, plan.windows
    if log:
        log(f"plan: {plan.describe()}")
    upscale = _upscaler(pipe, image, params, output_type)

    warmup_s = []
    for i in range(warmup):
        if log:
            log(f"warm-up {i + 1}/{warmup}")
        t = time.perf_counter()
        upscale(None)
        sync()
        warmup_s.append(time.perf_counter() - t)  # with --compile: includes the compilation

    runs = []
    for r in range(repeat):
        # CCSR-v1 encodes the condition with its own network; CCSR-v2 once with its VAE (the pipeline's timing)
        hint_net = getattr(model, "cond_encoder", None)
        timers = {name: CallTimer(getattr(model, name), sync) for name in ("unet", "controlnet")}
        if hint_net is not None:
            timers["cond_encoder"] = CallTimer(hint_net, sync)
        stamps: list[float] = []
        phase_peak: dict[str, float] = {}
        gc_collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base_alloc = torch.cuda.memory_allocated(device)
        base_rss = rss_mb()
        reset_ok = reset_peak_rss()

        def progress(done: int, total: int, stamps: list[float] = stamps, phase_peak: dict = phase_peak) -> None:
            stamps.append(time.perf_counter())
            if done == total:  # the high-water mark is monotonic: what sampling (+ hint encodes) reached
                phase_peak["sampling"] = peak_rss_mb()
            if log and (done == total or done % max(1, total // 10) == 0):
                log(f"  eval {done}/{total}")

        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            out, picture = upscale(progress)
            sync()
        finally:
            for t in timers.values():
                t.restore()
        wall = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
        peak = peak_rss_mb()
        unet, ctrl = timers["unet"].calls, timers["controlnet"].calls
        hint = timers["cond_encoder"].calls if hint_net is not None else [out.timings["condition"]]
        evals = [a + b for a, b in zip(unet, ctrl, strict=False)]
        evals_cpu = [a + b for a, b in zip(timers["unet"].cpu, timers["controlnet"].cpu, strict=False)]
        # Progress intervals after the first step: include the sampler's own work but no hint encode.
        start = t0 + out.timings.get("preprocess", 0.0) + out.timings.get("text", 0.0)
        intervals = np.diff([start, *stamps]).tolist() if stamps else []
        later = intervals[n_tiles:] if len(intervals) > n_tiles else []
        target = out.geometry.target
        run: dict[str, Any] = {
            "seed": out.seed,
            "wall_s": wall,
            # CPU seconds of this process (all threads): cpu_s / wall_s near the thread count: the run had
            # the cores to itself; much lower means other processes took them (the wall figures are inflated).
            "cpu_s": cpu_s,
            "cpu_per_wall": cpu_s / wall,
            "load_avg_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "timings": dict(out.timings),
            "evaluations": out.evaluations,
            "eval_s": _mean(evals),
            "eval_s_min": min(evals) if evals else None,
            "eval_cpu_s": _mean(evals_cpu),
            "unet_s": _mean(unet),
            "controlnet_s": _mean(ctrl),
            "eval_interval_s": _mean(later),
            "hint_encodes": len(hint),
            "hint_encode_s": _mean(hint),
            "decode_s": out.timings.get("decode"),
            "encode_s": out.timings.get("encode"),
            "output_mp_per_s": target[0] * target[1] / 1e6 / wall,
            **_output_stats(picture),
        }
        if cuda:
            run["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            run["peak_above_start_mb"] = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
            run["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        run["rss_start_mb"] = base_rss
        run["peak_rss_mb"] = peak
        run["peak_rss_is_per_run"] = reset_ok
        # Which phase set the peak: sampling (networks + hint encodes) or what follows (decode, colour fix, finish).
        run["peak_rss_sampling_mb"] = phase_peak.get("sampling")
        runs.append(run)
        if log:
            log(f"run {r + 1}/{repeat}: {wall:.2f} s, {out.evaluations} evaluations")
        del out, picture

    def avg(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    summary = {
        k: avg(k)
        for k in (
            "wall_s",
            "cpu_per_wall",
            "eval_s",
            "eval_cpu_s",
            "unet_s",
            "controlnet_s",
            "eval_interval_s",
            "hint_encode_s",
            "decode_s",
            "encode_s",
            "output_mp_per_s",
        )
    }
    summary["evaluations"] = runs[0]["evaluations"]
    summary["tiles"] = n_tiles
    summary["hint_encodes"] = runs[0]["hint_encodes"]
    summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    sampling = [r["peak_rss_sampling_mb"] for r in runs if r["peak_rss_sampling_mb"] is not None]
    summary["peak_rss_sampling_mb"] = max(sampling) if sampling else None
    if cuda:
        summary["peak_allocated_mb"] = max(r["peak_allocated_mb"] for r in runs)
    summary["finite"] = all(r["finite"] for r in runs)
    return {
        "input_size": list(size),
        "output_size": list(g.target),
        "process_size": list(g.process),
        "planned_evaluations": total_evals,
        "plan": plan.describe(),
        "warmup_s": warmup_s,
        "params": params.to_dict(),
        "runs": runs,
        "summary": summary,
    }


def _upscaler(pipe: Any, image: Any, params: Any, output_type: str) -> Callable[[Any], tuple[Any, Any]]:
    """``upscale(progress) -> (UpscaleOutput, the picture to check)`` for ``output_type``."""
    if output_type not in FILE_OUTPUTS:
        def run(progress: Any) -> tuple[Any, Any]:
            out = pipe.run(image, params, progress=progress, output_type=output_type)
            return out, out.image if out.processed is None else out.processed

        return run
    import io

    from PIL import Image

    from ccsr import imaging
    from ccsr.jobs.chain import upscale_encode

    buf = io.BytesIO()
    image.save(buf, "PNG")
    decoded = imaging.decode(buf.getvalue())
    options = imaging.EncodeOptions(output_type)

    def run_chain(progress: Any) -> tuple[Any, Any]:
        encoded, out = upscale_encode(pipe, decoded, params, options, progress=progress)
        return out, Image.open(io.BytesIO(encoded.data))  # read back after the peak was taken

    return run_chain


def _output_stats(pixels: Any) -> dict[str, Any]:
    """Finite check and standard deviation (in [0, 1]) of a float array or an 8-bit image, a block of rows at a
    time: no full-size temporaries."""
    import numpy as np

    n, total, squares, finite = 0, 0.0, 0.0, True
    width, height = (pixels.shape[1], pixels.shape[0]) if isinstance(pixels, np.ndarray) else pixels.size
    for r in range(0, height, 256):
        if isinstance(pixels, np.ndarray):
            block = pixels[r : r + 256].astype(np.float64)
        else:
            block = np.asarray(pixels.crop((0, r, width, min(r + 256, height))), dtype=np.float64) / 255.0
        finite = finite and bool(np.isfinite(block).all())
        n, total, squares = n + block.size, total + float(block.sum()), squares + float((block * block).sum())
    mean = total / max(n, 1)
    return {"finite": finite, "output_std": math.sqrt(max(squares / max(n, 1) - mean * mean, 0.0))}


def gc_collect() -> None:
    import gc

    gc.collect()


# -- commands ------------------------------------------------------------------------------------------------


def _fmt(v: float | None, unit: str = "s", digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f} {unit}"


def cmd_bench(a: argparse.Namespace) -> int:
    import torch

    from ccsr import hostmemory
    from ccsr.cli import CLIError, params_from_args
    from ccsr.pipeline import CCSRPipeline, default_device, parse_dtype

    if a.threads:
        torch.set_num_threads(a.threads)
    params = params_from_args(a)
    if params.seed is None:
        params = params.replace(seed=0)
    device = torch.device(a.device) if a.device else default_device()
    dtype = parse_dtype(None if a.dtype == "auto" else a.dtype, device)
    if a.repeat < 1:
        raise CLIError("--repeat must be at least 1")

    def log(msg: str) -> None:
        if not a.quiet:
            print(msg, file=sys.stderr, flush=True)

    rss0 = rss_mb()
    t0 = time.perf_counter()
    if a.model == "v2":
        from ccsr.cli import with_model_defaults
        from ccsr.pipeline_v2 import CCSRv2Pipeline

        if a.config or a.compile:
            raise CLIError("--model v2 builds the released CCSR-v2 architecture: no --config or --compile")
        model = random_model_v2(seed=a.weights_seed, std=RANDOM_STD)
    else:
        model = random_model(a.config, seed=a.weights_seed, std=RANDOM_STD)
    if a.channels_last:
        for m in model.networks().values():
            m.to(memory_format=torch.channels_last)
    if a.model == "v2":
        pipe = CCSRv2Pipeline(model, device=device, dtype=dtype)
        params = with_model_defaults(params, a, pipe.descriptor)
    else:
        pipe = CCSRPipeline(model, device=device, dtype=dtype, compile=a.compile)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    hostmemory.trim()  # what building freed (the VAE encoder the pipeline never runs) is not the weights' RSS
    weights_rss = rss_mb()
    build_peak = peak_rss_mb()
    header = machine_info(device, dtype)
    header.update(
        config="CCSR-v2 (SD-2.1-base size)" if a.model == "v2" else (
            str(a.config) if a.config else "built-in CCSR-v1 (SD-2.1 size)"),
        weights=model.source,
        parameters=model.descriptor.parameters,
        channels_last=bool(a.channels_last),
        output_type=a.output_type,
        compile=bool(a.compile),
    )
    log(
        f"built {header['parameters'] / 1e6:.1f} M random parameters in {build_s:.1f} s; "
        f"RSS {weights_rss:.0f} MB; running {a.size[0]}x{a.size[1]} x{params.scale}, {params.steps} steps"
    )
    result = run_bench(pipe, a.size, params, repeat=a.repeat, warmup=a.warmup, output_type=a.output_type, log=log)
    s = result["summary"]
    memory = {
        "rss_before_build_mb": rss0,
        "weights_rss_mb": weights_rss,  # after build: the weights plus the interpreter and libraries
        "build_peak_rss_mb": build_peak,
        "peak_rss_mb": s["peak_rss_mb"],
        "peak_above_weights_mb": s["peak_rss_mb"] - weights_rss,
    }
    if device.type == "cuda":
        memory["peak_allocated_mb"] = s["peak_allocated_mb"]
        memory["weights_allocated_mb"] = (
            sum(p.numel() * p.element_size() for m in model.networks().values() for p in m.parameters())
            / 2**20
        )
    report = {
        "header": header,
        "requested": params.to_dict(),
        "build_s": build_s,
        "memory": memory,
        **result,
    }
    text = _summary_text(report)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=1, default=_json_default))
    if not s["finite"]:
        print("ccsr: warning: the output contains NaN/inf (random weights too large?)", file=sys.stderr)
        return 1
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, tuple | set):
        return list(o)
    return str(o)


def _header_text(h: dict[str, Any]) -> str:
    gpu = f", gpu {h['gpu']} ({h['gpu_memory_gb']} GB)" if "gpu" in h else ""
    return (
        f"machine: {h['cpu']}, {h['cores']} cores ({h['cores_usable']} usable), {h['memory_gb']} GB RAM, "
        f"load {h['load_avg']}{gpu}\n"
        f"torch {h['torch']}, diffusers {h['diffusers']}, python {h['python']}; device {h['device']}, "
        f"dtype {h['dtype']}, threads {h['threads']}, channels_last {h['channels_last']}, "
        f"output {h['output_type']}\n"
        f"model: {h['config']}, {h['parameters'] / 1e6:.1f} M parameters, {h['weights']}"
    )


def _summary_text(r: dict[str, Any]) -> str:
    s, m, p = r["summary"], r["memory"], r["params"]
    iw, ih = r["input_size"]
    ow, oh = r["output_size"]
    pw, ph = r["process_size"]
    tiling = p["tile_diffusion"]
    tiles = (
        f"tiles {s['tiles']} ({tiling}, {p['tile_diffusion_size']}/{p['tile_diffusion_stride']} px)"
        if tiling != "none"
        else "no diffusion tiling"
    )
    lines = [
        _header_text(r["header"]),
        f"upscale {iw}x{ih} -> {ow}x{oh} (processed at {pw}x{ph}), scale {p['scale']}, steps {p['steps']}, "
        f"{tiles}, tiled VAE {'on' if p['tile_vae'] else 'off'}, runs {len(r['runs'])}",
        f"build (random weights): {r['build_s']:.1f} s",
        f"wall per image:        {_fmt(s['wall_s'], 's', 2)} (process CPU / wall {s['cpu_per_wall']:.2f} "
        f"with {r['header']['threads']} threads; load at end {r['runs'][-1]['load_avg_end']})",
        f"network evaluations:   {s['evaluations']} x {_fmt(s['eval_s'])} (UNet {_fmt(s['unet_s'])} + "
        f"ControlNet {_fmt(s['controlnet_s'])}); progress interval {_fmt(s['eval_interval_s'])}; "
        f"{_fmt(s['eval_cpu_s'], 'CPU-s')} of process CPU each",
        f"hint encode:           {s['hint_encodes']} x {_fmt(s['hint_encode_s'])}",
        f"decode (+colour fix):  {_fmt(s['decode_s'])}",
        *([f"{'encode (' + r['header']['output_type'] + '):':<23}{_fmt(s['encode_s'])}"] if s.get("encode_s") else []),
        f"output:                {_fmt(s['output_mp_per_s'], 'MP/s', 4)}",
    ]
    if "peak_allocated_mb" in m:
        lines.append(
            f"peak allocated:        {m['peak_allocated_mb']:.0f} MB "
            f"(weights {m['weights_allocated_mb']:.0f} MB)"
        )
    lines.append(
        f"peak RSS:              {m['peak_rss_mb']:.0f} MB (after build {m['weights_rss_mb']:.0f} MB, "
        f"above it {m['peak_above_weights_mb']:.0f} MB; build peak {m['build_peak_rss_mb']:.0f} MB)"
    )
    if s.get("peak_rss_sampling_mb") is not None:
        lines.append(f"  of which sampling:   {s['peak_rss_sampling_mb']:.0f} MB by the end of the last evaluation; "
                     "the rest (if higher) is decode / colour fix / finish")
    return "\n".join(lines)


def add_commands(sub: Any) -> None:
    """Register ``bench`` and ``eval`` on the CLI's subparsers."""
    from ccsr.cli import add_upscale_params

    b = sub.add_parser(
        "bench",
        help="benchmark the real-size model with random weights (no download)",
        description="Build the networks of a config (default: the real-size CCSR-v1) with random weights "
        "(no download) and time the real pipeline on a synthetic input: wall time per image, per network "
        "evaluation (ControlNet + UNet), per hint encode and decode, peak memory and output megapixels "
        "per second.",
    )
    b.add_argument(
        "--size",
        type=parse_size,
        default=(256, 256),
        metavar="WxH",
        help="input size (default 256x256; the output is scale times larger)",
    )
    b.add_argument("--config", help="LDM yaml of the architecture (default: the built-in CCSR-v1 config)")
    b.add_argument("--model", choices=["v1", "v2"], default="v1",
                   help="v1 (default): CCSR-v1; v2: CCSR-v2 at its defaults (--preset one-step|two-step)")
    b.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    b.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default="auto",
        help="network precision (default: float32 on CPU, float16 on CUDA)",
    )
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--repeat", type=int, default=1, help="timed runs (default 1)")
    b.add_argument("--warmup", type=int, default=0, help="untimed runs first (default 0; use 1 on CUDA)")
    b.add_argument("--channels-last", action="store_true", help="convert the networks to channels_last")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and ControlNet (use --warmup 1: the first run compiles)")
    b.add_argument("--output-type", choices=["np", "pil", *FILE_OUTPUTS], default="np",
                   help="np (default): the float result; pil: only the 8-bit image (no full-size float buffer); "
                   "png, jpg, webp, tiff: the chain of `ccsr upscale` and the server, encode included")
    b.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights (default 0)")
    b.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_upscale_params(b, seed_help="noise seed (default 0, so runs are comparable)")
    b.set_defaults(func=cmd_bench)

    from ccsr import evaluate

    evaluate.add_command(sub)
