"""The CCSR-v1 sampler: one prediction at T, a jump to t_max, a few ancestral steps, and x0 of the last step.

``sample_ccsr_v1`` is a pure function of an epsilon model, the initial noise, a schedule/plan and a noise source;
tiling only changes how one network evaluation is fused from tiles. Every formula rounds its float64 coefficient to
float32 first, as the reference does, so that a seeded CPU fp32 run reproduces it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ccsr.sampling.schedule import SpacedSchedule, TruncatedPlan
from ccsr.sampling.tiles import Window, gaussian_weights

Tensor = torch.Tensor
EpsModel = Callable[[Tensor, int, Window | None], Tensor]
"""``eps_model(x, timestep, window)``: noise prediction for ``x`` (the tile at ``window``, or the whole latent)."""
NoiseSource = Callable[[], Tensor]
"""Returns the next standard normal draw with the full latent's shape, already on the latent's device."""
Progress = Callable[[int, int], None]
"""``progress(done, total)`` after every network evaluation (tiles x steps)."""


@dataclass(frozen=True)
class Tiling:
    windows: list[Window]
    blend: Literal["mix", "gaussian"]

    def weights(self, window: Window, device: torch.device) -> Tensor:
        return _weights_on(window.bottom - window.top, window.right - window.left, device)


@functools.lru_cache(maxsize=16)
def _weights_on(height: int, width: int, device: torch.device) -> Tensor:
    """Gaussian tile weights already on ``device`` (copied once, not once per window and step)."""
    w = gaussian_weights(height, width)
    return w.to(device, torch.float32 if device.type == "mps" else torch.float64)  # MPS has no float64


@dataclass
class StepRecord:
    """What one evaluation produced (for parity tests and debugging)."""

    k: int
    timestep: int
    index: int
    eps: Tensor
    pred_x0: Tensor
    x_next: Tensor | None
    posterior_mean: Tensor | None = None


def _eps(model: EpsModel, x: Tensor, t: int, tiling: Tiling | None, tick: Callable[[], None]) -> Tensor:
    """One fused network evaluation over the whole latent."""
    if tiling is None:
        eps = model(x, t, None)
        tick()
        return eps
    acc = torch.zeros_like(x)
    if tiling.blend == "gaussian":
        count = torch.zeros_like(x)
    else:
        count = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    for win in tiling.windows:
        rows, cols = win.latent()
        eps = model(x[:, :, rows, cols], t, win)
        if tiling.blend == "gaussian":
            w = tiling.weights(win, x.device)  # float64: the products are rounded to float32 on accumulation
            acc[:, :, rows, cols] += eps * w
            count[:, :, rows, cols] += w
        else:
            acc[:, :, rows, cols] += eps
            count[:, :, rows, cols] += 1
        tick()
    return acc.div_(count)


def _f32(a: np.ndarray, i: int) -> float:
    return float(np.float32(a[i]))


def pred_x0(s: SpacedSchedule, x: Tensor, i: int, eps: Tensor) -> Tensor:
    return _f32(s.sqrt_recip_alphas_cumprod, i) * x - _f32(s.sqrt_recipm1_alphas_cumprod, i) * eps


def q_sample(s: SpacedSchedule, x0: Tensor, i: int, noise: Tensor) -> Tensor:
    return _f32(s.sqrt_alphas_cumprod, i) * x0 + _f32(s.sqrt_one_minus_alphas_cumprod, i) * noise


def posterior_mean(s: SpacedSchedule, x0: Tensor, x: Tensor, i: int) -> Tensor:
    return _f32(s.posterior_mean_coef1, i) * x0 + _f32(s.posterior_mean_coef2, i) * x


def posterior_std(s: SpacedSchedule, i: int) -> float:
    return float(np.sqrt(np.float32(s.posterior_variance[i])))


def noise_draws(plan: TruncatedPlan, tiled: bool) -> int:
    """How many times :func:`sample_ccsr_v1` calls its noise source after ``x_T``: the jump to t_max, one per loop
    step, and (untiled) the draw the reference drops."""
    return 1 + len(plan.loop) + (0 if tiled else 1)


def sample_ccsr_v1(
    model: EpsModel,
    x_T: Tensor,
    schedule: SpacedSchedule,
    plan: TruncatedPlan,
    noise: NoiseSource,
    *,
    tiling: Tiling | None = None,
    progress: Progress | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> Tensor:
    """Return the clean latent x0 (unscaled by the VAE factor: it is what the decoder gets after / scale)."""
    n_tiles = 1 if tiling is None else len(tiling.windows)
    total = n_tiles * plan.evaluations
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    # Stage 1a: predict x0 from pure noise at T, then re-noise it to t_max.
    eps = _eps(model, x_T, plan.first_timestep, tiling, tick)
    x0 = pred_x0(schedule, x_T, plan.first_index, eps)
    if tiling is None:
        noise()  # the reference draws (and drops) one tensor here in the untiled sampler
    x = q_sample(schedule, x0, plan.tao_index, noise())
    if on_step is not None:
        on_step(StepRecord(0, plan.first_timestep, plan.first_index, eps, x0, x))

    # Stage 1b: ancestral steps from t_max down to t_min; the result is the last predicted x0.
    for k, (t, i) in enumerate(plan.loop, start=1):
        eps = _eps(model, x, t, tiling, tick)
        x0 = pred_x0(schedule, x, i, eps)
        mean = posterior_mean(schedule, x0, x, i)
        step_noise = noise()  # drawn even when unused, to keep the reference's RNG order
        x = mean + posterior_std(schedule, i) * step_noise if i != 0 else mean
        if on_step is not None:
            on_step(StepRecord(k, t, i, eps, x0, x, mean))
    return x0
