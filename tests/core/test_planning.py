"""Automatic tiling: chosen from free memory, exact when everything fits, retried smaller after out-of-memory."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccsr.geometry import quantise_into, unit
from ccsr.params import UpscaleParams
from ccsr.pipeline import CCSRPipeline, Condition, parse_bytes
from ccsr.planning import MemoryBudgetError, balanced_windows, free_memory, is_out_of_memory

# pad mode: processing size = target rounded up to 64, so the sizes below are easy to reason about
P = UpscaleParams(scale=6, steps=3, seed=3, size_mode="pad")


@pytest.fixture(scope="module")
def lq(fixtures) -> Image.Image:
    return Image.open(fixtures / "inputs" / "lq_48x40.png").convert("RGB")  # -> 288x240, processed 320x256


def pipe_with(tiny_pipeline, max_memory: int | None) -> CCSRPipeline:
    return CCSRPipeline(tiny_pipeline.model, device="cpu", max_memory=max_memory)


def estimates(pipe: CCSRPipeline, size, p: UpscaleParams) -> tuple[int, int]:
    """(smallest untiled working set, working set of the smallest automatic plan) for this request."""
    untiled = pipe.planner.plan(size, p.replace(tile_diffusion="none"), budget=1)
    small = pipe.planner.plan(size, p, budget=1)
    return untiled.estimate, small.estimate


def test_auto_is_the_exact_untiled_path_when_it_fits(tiny_pipeline, lq):
    plan = tiny_pipeline.plan(lq.size, P)
    assert (plan.params.tile_diffusion, plan.decode, plan.windows) == ("none", "whole", 1)
    assert plan.params.tile_vae is False
    auto = tiny_pipeline.run(lq, P)
    explicit = tiny_pipeline.run(lq, P.replace(tile_diffusion="none", tile_vae=False))
    assert np.array_equal(auto.processed, explicit.processed)
    assert auto.plan is not None and auto.plan.params.tile_diffusion == "none"


def test_short_memory_gives_mix_tiles_that_run_like_explicit_ones(tiny_pipeline, lq):
    untiled, smallest = estimates(tiny_pipeline, lq.size, P)
    assert smallest < untiled
    pipe = pipe_with(tiny_pipeline, (untiled + smallest) // 2)
    plan = pipe.plan(lq.size, P)
    assert plan.params.tile_diffusion == "mix" and plan.windows > 1
    assert plan.estimate <= plan.budget
    size, stride = plan.params.tile_diffusion_size, plan.params.tile_diffusion_stride
    assert size // 8 <= stride < size  # windows overlap (by at least an eighth)
    out = pipe.run(lq, P)
    ref = tiny_pipeline.run(lq, plan.params)  # the same tiling, given explicitly
    assert np.array_equal(out.processed, ref.processed)
    assert out.evaluations == plan.evaluations


def test_large_outputs_are_tiled_even_with_memory_to_spare(tiny_pipeline):
    """Beyond twice the native size one window costs more than tiles (attention is quadratic)."""
    plan = pipe_with(tiny_pipeline, 2**40).planner.plan((300, 300), P.replace(scale=4), budget=2**40)
    assert plan.params.tile_diffusion == "mix"
    assert plan.params.tile_diffusion_size == tiny_pipeline.descriptor.native_size


@pytest.mark.parametrize("side", [1024, 1088, 1536, 2048, 2600, 3072, 4096])
def test_planned_windows_cost_the_same_per_pixel_at_every_size(tiny_pipeline, side):
    """Window area / image area stays ~1.56 (1.25 per axis) from 1 to 16 MP, so time per MP is flat (a fixed
    512/384 layout would cover 2.25x at 1 MP and 1.56x at 4 MP)."""
    plan = tiny_pipeline.planner.plan((side // 4, side // 4), P.replace(scale=4, tile_diffusion="mix"), budget=2**40)
    w, h = plan.geometry.process
    tile = plan.params.tile_diffusion_size
    assert plan.params.tile_diffusion == "mix" and 384 <= tile <= 640
    coverage = plan.windows * tile * tile / (w * h)
    assert 1.45 <= coverage <= 1.65, coverage


def test_balanced_windows_edge_cases():
    assert balanced_windows(40, 64, 80, 32) == (40, 40)  # fits one window
    tile, stride = balanced_windows(512, 64, 48, 32)  # the cap binds: more windows, still overlapping
    assert tile == 48 and stride <= tile - tile // 8 and math.ceil((512 - tile) / stride) * stride >= 512 - tile


def test_whole_decode_that_does_not_fit_is_tiled_with_estimated_statistics(tiny_pipeline, lq):
    p = P.replace(scale=8, tile_diffusion="none")  # 384x320: larger than one padded decoder tile
    planner = tiny_pipeline.planner
    whole = planner.plan(lq.size, p, budget=2**40)
    bounded = planner.plan(lq.size, p, budget=1)
    assert (whole.decode, bounded.decode) == ("whole", "estimate")
    assert bounded.estimate < whole.estimate
    pipe = pipe_with(tiny_pipeline, (whole.estimate + bounded.estimate) // 2)
    out = pipe.run(lq, p)
    assert out.plan is not None and out.plan.decode == "estimate" and out.plan.params.tile_vae
    ref = tiny_pipeline.run(lq, p)
    assert np.isfinite(out.processed).all()
    # the same latent, decoded with estimated GroupNorm statistics: close, not identical
    assert 0 < np.abs(out.processed - ref.processed).mean() < 0.1


def test_explicit_settings_that_cannot_fit_are_refused(tiny_pipeline, lq):
    pipe = pipe_with(tiny_pipeline, 1024)
    with pytest.raises(MemoryBudgetError) as e:
        pipe.plan(lq.size, P.replace(tile_diffusion="none", tile_vae=False))
    assert e.value.field in ("tile_vae", "tile_diffusion") and "GiB" in e.value.message


def test_out_of_memory_is_retried_with_smaller_tiles(tiny_pipeline, lq):
    """A device that fails above a latent size (fault injection on the real UNet): the run is planned again."""
    pipe = pipe_with(tiny_pipeline, None)
    plan = pipe.plan(lq.size, P)
    assert plan.params.tile_diffusion == "none"
    limit = max(plan.geometry.process) // 8 - 1  # the untiled latent is too big, tiles are not

    def fail_if_large(module, args):
        if max(args[0].shape[-2:]) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    handle = pipe.model.unet.register_forward_pre_hook(fail_if_large)
    logs: list[str] = []
    progress: list[tuple[int, int]] = []
    try:
        out = pipe.run(lq, P, log=logs.append, progress=lambda d, t: progress.append((d, t)))
    finally:
        handle.remove()
    assert out.plan is not None and out.plan.params.tile_diffusion == "mix"
    assert any("out of memory" in m for m in logs)
    assert progress[-1][0] == progress[-1][1] == out.evaluations  # the new total was reported
    ref = tiny_pipeline.run(lq, out.plan.params)
    assert np.array_equal(out.processed, ref.processed)


def test_other_errors_are_not_retried(tiny_pipeline, lq):
    pipe = pipe_with(tiny_pipeline, None)
    calls = []

    def broken(module, args):
        calls.append(1)
        raise RuntimeError("something else")

    handle = pipe.model.unet.register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="something else"):
            pipe.run(lq, P)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_out_of_memory_classification():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 1099511627776 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_free_memory_of_the_host_is_plausible():
    free = free_memory(torch.device("cpu"))
    lines = Path("/proc/meminfo").read_text().splitlines()
    total = next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemTotal"))
    assert 0 < free <= total


@pytest.mark.parametrize(("text", "value"), [("6G", 6 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", 3 * 2**29),
                                             ("1000", 1000), ("2k", 2048)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_bytes_refuses_nonsense():
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


def test_condition_windows_convert_exactly_as_the_reference():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    cond = Condition(pixels, torch.device("cpu"), 8)
    whole = cond.window(None)[0].permute(1, 2, 0).numpy()
    assert whole.dtype == np.float32 and np.array_equal(whole, unit(pixels))
    assert np.array_equal(whole, (pixels / 255.0).astype(np.float32))


def quantised(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, np.uint8)
    quantise_into(out, x)
    return out


def test_quantise_matches_the_reference_formula():
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.2, 1.2, (1500, 700, 3)).astype(np.float32)  # several row blocks
    assert np.array_equal(quantised(x), (x * np.float32(255)).clip(0, 255).astype(np.uint8))


def test_quantise_image_matches_fromarray_of_quantise():
    from ccsr.geometry import quantise_image

    x = np.random.default_rng(2).uniform(-0.1, 1.1, (700, 530, 3)).astype(np.float32)
    assert np.array_equal(np.asarray(quantise_image(x)), quantised(x))


def test_host_memory_trim_runs():
    from ccsr import hostmemory

    assert hostmemory.trim() is True  # glibc on Linux: the call is made, not skipped


def test_working_memory_comes_from_the_argument_then_the_environment(monkeypatch, tiny_pipeline):
    from ccsr.pipeline import CCSRPipeline, working_memory

    monkeypatch.delenv("CCSR_MAX_MEMORY", raising=False)
    assert working_memory(None) is None
    monkeypatch.setenv("CCSR_MAX_MEMORY", "1.5G")
    assert working_memory(None) == int(1.5 * 2**30) and working_memory(123) == 123
    assert CCSRPipeline(tiny_pipeline.model, device="cpu").planner.max_memory == int(1.5 * 2**30)
