"""The CCSR-v2 sampler: one unguided prediction at ``start_steps``, a jump to t_max, a few guided DDPM steps.

``sample_ccsr_v2`` is a pure function of an epsilon model, the starting latents, the DDPM ``alphas_cumprod`` and
two random streams, reproducing the reference (``pipelines/pipeline_ccsr.py`` of CCSR-v2) draw for draw:

* the **explicit** stream (``noise``): one DDPM noise per loop step with t > 0 (x_T is drawn before, by the caller);
* the **global** stream (``rng``, a CPU generator seeded like ``torch.manual_seed(seed)``, after the caller drew the
  condition latent's posterior noise from it): ``randint(start_steps, start_steps + 1)`` once for the start point
  ``lr`` and once before the initial evaluation (constants, but they advance the stream), then ``noise_tao``.
  Under CFG with start ``lr`` the reference's latent is channels_last (from the batch-2 VAE encode) and torch draws
  ``randn_like`` of such a tensor element by element in NHWC order: ``tao_channels_last`` reproduces that.

The reference's crashes are given a meaning (:func:`v2_schedule`): with t_min > 0 and ``round(N * t_min) == 0``
no step is cut off; an empty loop (N = 1, or t_min cutting every step) returns the initial x0; with t_max = 1 and
nothing to loop over, the initial evaluation runs anyway. Arithmetic follows diffusers' DDPMScheduler on float32
0-dim tensors, in the reference's order, so that a CPU float32 run reproduces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ccsr.sampling.ccsr_v1 import Tiling
from ccsr.sampling.tiles import Window

Tensor = torch.Tensor
EpsModelV2 = Callable[[Tensor, int, bool, Window | None], Tensor]
"""``eps_model(x, t, guided, window)``: raw noise prediction (before CFG). ``guided=False``: batch 1 with the first
context row and condition row (the negative prompt under CFG: the reference's initial step); ``guided=True``: the
CFG batch (``[uncond, cond]`` under CFG, else the positive prompt alone) for ``x`` of batch 1."""
NoiseSource = Callable[[], Tensor]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class V2Schedule:
    """Which timesteps the reference visits for N steps and a t range."""

    timesteps: tuple[int, ...]  # (0..N-1) * (1000 // N), reversed, + 1
    step_ratio: int  # 1000 // N: prev_t = t - step_ratio
    tao: int  # t_tao: where the initial x0 is re-noised to
    initial: bool  # the unguided evaluation at start_steps runs
    loop: tuple[int, ...]  # guided DDPM steps
    x0_result: bool  # the result is x0 of the last step (t_min > 0) or of the initial one (no loop), not x_prev

    @property
    def evaluations(self) -> int:
        return int(self.initial) + len(self.loop)


def v2_schedule(steps: int, t_max: float, t_min: float, num_train_timesteps: int = 1000) -> V2Schedule:
    ratio = num_train_timesteps // steps
    timesteps = tuple(i * ratio + 1 for i in reversed(range(steps)))
    n_max, n_min = round(steps * t_max), round(steps * t_min)
    loop = timesteps[-n_max:]  # n_max == 0 keeps them all, as Python's slice does in the reference
    if t_min > 0 and n_min > 0:
        loop = loop[:-n_min]
    if steps == 1:
        loop = ()  # the reference returns x0_T for N = 1 whatever the range
    initial = t_max != 1 or not loop
    return V2Schedule(timesteps, ratio, timesteps[-n_max], initial, loop, x0_result=t_min > 0 or not loop)


@dataclass
class StepRecordV2:
    """What one evaluation produced (for parity tests and debugging); k = 0 is the initial step."""

    k: int
    timestep: int
    sample: Tensor  # the latent the model saw (before CFG batching)
    eps: Tensor  # guided (the initial step: unguided)
    x0: Tensor
    x_next: Tensor | None  # x_tao for k = 0, x_prev for loop steps
    noise: Tensor | None = None  # noise_tao, or the step's explicit draw


def _fused(model: EpsModelV2, x: Tensor, t: int, guided: bool, tiling: Tiling | None,
           tick: Callable[[], None]) -> Tensor:
    """One raw evaluation; with tiling, gaussian-weighted tiles accumulated in float32 (float64 products)."""
    if tiling is None:
        eps = model(x, t, guided, None)
        tick()
        return eps
    acc: Tensor | None = None
    count = torch.zeros(x.shape[1:], dtype=torch.float32, device=x.device)
    for win in tiling.windows:
        rows, cols = win.latent()
        eps = model(x[:, :, rows, cols], t, guided, win)
        if acc is None:
            acc = torch.zeros((eps.shape[0], *x.shape[1:]), dtype=torch.float32, device=x.device)
        w = tiling.weights(win, x.device)
        acc[:, :, rows, cols] += eps * w
        count[:, rows, cols] += w
        tick()
    assert acc is not None
    return acc.div_(count).to(x.dtype)


def _tensor(value: Tensor, like: Tensor) -> Tensor:
    return value.to(like.device)


def x0_from_eps(alphas_cumprod: Tensor, x: Tensor, t: int, eps: Tensor) -> Tensor:
    a = _tensor(alphas_cumprod[t], x)
    return (x - (1 - a) ** 0.5 * eps) / a**0.5


def add_noise(alphas_cumprod: Tensor, x0: Tensor, noise: Tensor, t: int) -> Tensor:
    a = _tensor(alphas_cumprod[t], x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def ddpm_step(alphas_cumprod: Tensor, x: Tensor, t: int, prev_t: int, eps: Tensor, noise: NoiseSource
              ) -> tuple[Tensor, Tensor, Tensor | None]:
    """diffusers' DDPMScheduler.step (epsilon, fixed_small, no clipping): (x0, x_prev, the noise drawn)."""
    a_t = _tensor(alphas_cumprod[t], x)
    a_prev = _tensor(alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0), x)
    beta_t, beta_prev = 1 - a_t, 1 - a_prev
    alpha_cur = a_t / a_prev
    beta_cur = 1 - alpha_cur
    x0 = (x - beta_t**0.5 * eps) / a_t**0.5
    mean = (a_prev**0.5 * beta_cur) / beta_t * x0 + alpha_cur**0.5 * beta_prev / beta_t * x
    if t <= 0:
        return x0, mean, None
    n = noise()
    var = torch.clamp((1 - a_prev) / (1 - a_t) * beta_cur, min=1e-20)
    return x0, mean + var**0.5 * n, n


def draw_tao_noise(rng: torch.Generator, shape: tuple[int, ...], channels_last: bool) -> Tensor:
    """``randn_like`` of the reference's latent: per element in NHWC order when that latent is channels_last."""
    if channels_last:
        return torch.empty(shape, dtype=torch.float32).to(memory_format=torch.channels_last).normal_(generator=rng)
    return torch.randn(shape, generator=rng, dtype=torch.float32)


def sample_ccsr_v2(
    model: EpsModelV2,
    x_T: Tensor,
    z0: Tensor,
    alphas_cumprod: Tensor,
    schedule: V2Schedule,
    rng: torch.Generator,
    noise: NoiseSource,
    *,
    cfg_scale: float = 1.0,
    start_point: str = "lr",
    start_steps: int = 999,
    tao_channels_last: bool = False,
    tiling: Tiling | None = None,
    progress: Progress | None = None,
    on_step: Callable[[StepRecordV2], None] | None = None,
) -> Tensor:
    """Return the latent to decode (scaled: the decoder gets it divided by the VAE's scaling factor).

    ``z0``: the first row of the condition latent (the start point ``lr`` diffuses it to ``start_steps``).
    """
    n_tiles = 1 if tiling is None else len(tiling.windows)
    total, done = n_tiles * schedule.evaluations, 0
    guided_cfg = cfg_scale > 1.0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    def global_randint() -> int:
        return int(torch.randint(start_steps, start_steps + 1, (1,), generator=rng))

    x = add_noise(alphas_cumprod, z0, x_T, global_randint()) if start_point == "lr" else x_T
    x0: Tensor | None = None
    if schedule.initial:
        t = global_randint()
        eps = _fused(model, x, t, False, tiling, tick)
        x0 = x0_from_eps(alphas_cumprod, x, t, eps)
        tao_noise = draw_tao_noise(rng, tuple(x.shape), tao_channels_last and start_point == "lr")
        x_tao = add_noise(alphas_cumprod, x0, tao_noise.to(x.device, x.dtype), schedule.tao)
        if on_step is not None:
            on_step(StepRecordV2(0, t, x, eps, x0, x_tao, tao_noise))
        if schedule.loop:
            x = x_tao
    for k, t in enumerate(schedule.loop, start=1):
        eps = _fused(model, x, t, True, tiling, tick)
        if guided_cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + cfg_scale * (cond - uncond)
        x0, x_prev, n = ddpm_step(alphas_cumprod, x, t, t - schedule.step_ratio, eps, noise)
        if on_step is not None:
            on_step(StepRecordV2(k, t, x, eps, x0, x_prev, n))
        x = x_prev
    if schedule.x0_result:
        assert x0 is not None
        return x0
    return x
