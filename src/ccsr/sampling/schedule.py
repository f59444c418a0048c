"""The respaced DDPM schedule and CCSR-v1's truncated sampling plan, in float64 exactly as the reference builds them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """IDDPM respacing with one section: ``count`` timesteps spread over ``[0, num_timesteps)``.

    The position is accumulated by repeated float addition (not ``i * stride``) because that is what the
    reference does, and it changes some values (S=45 gives 499 where ``round(22 * stride)`` gives 500).
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot take {count} steps from {num_timesteps}")
    stride = 1.0 if count <= 1 else (num_timesteps - 1) / (count - 1)
    taken, pos = [], 0.0
    for _ in range(count):
        taken.append(round(pos))
        pos += stride
    return sorted(set(taken))


def base_alphas_cumprod(linear_start: float, linear_end: float, num_timesteps: int) -> np.ndarray:
    """LDM's "linear" schedule (linear in sqrt(beta)), float64."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    return np.cumprod(1.0 - betas.numpy(), axis=0)


@dataclass(frozen=True)
class SpacedSchedule:
    """float64 coefficient arrays indexed by spaced index ``i``; ``timesteps[i]`` is what the network sees."""

    timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray

    @classmethod
    def make(cls, steps: int, linear_start: float = 0.00085, linear_end: float = 0.0120,
             num_timesteps: int = 1000) -> SpacedSchedule:
        base = base_alphas_cumprod(linear_start, linear_end, num_timesteps)
        used = space_timesteps(num_timesteps, steps)
        betas, last = [], 1.0
        for t in used:
            betas.append(1.0 - base[t] / last)
            last = base[t]
        b = np.array(betas, dtype=np.float64)
        ac = np.cumprod(1.0 - b, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        return cls(
            timesteps=np.array(used, dtype=np.int64),
            alphas_cumprod=ac,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=b * (1.0 - ac_prev) / (1.0 - ac),
            posterior_mean_coef1=b * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
        )

    def coef(self, name: str, index: int) -> float:
        """One coefficient, rounded to float32 as the reference does before using it."""
        return float(np.float32(getattr(self, name)[index]))


@dataclass(frozen=True)
class TruncatedPlan:
    """Which network evaluations CCSR-v1 makes: one at T, a jump to ``tao_index``, then the loop steps."""

    first_timestep: int
    first_index: int
    tao_index: int
    loop: tuple[tuple[int, int], ...]  # (timestep fed to the network, spaced index)

    @property
    def evaluations(self) -> int:
        return 1 + len(self.loop)

    @property
    def one_step(self) -> bool:
        """No loop step: the x0 predicted at T is the result (t_min rounds to 0)."""
        return not self.loop


def truncated_plan(schedule: SpacedSchedule, t_max: float, t_min: float) -> TruncatedPlan:
    """Reproduce the reference's index arithmetic, including its quirks.

    * ``tao_index = round_half_even(float32((S-1) * t_max))`` while the loop starts at ``round(S * t_max) - 1``:
      they disagree for some S (S=50: re-noised to index 33, first loop step at index 32). Kept as is.
    * The loop is ``rev[-L:][:-K]`` with Python slicing: K == 0 gives an empty loop (the reference crashes in
      the untiled sampler); we return a one-step plan instead.
    """
    steps = len(schedule.timesteps)
    rev = schedule.timesteps[::-1]
    first_index = steps - 1
    tao = int(torch.round(torch.tensor(first_index, dtype=torch.int64) * t_max).item())
    big_l, small_k = round(steps * t_max), round(steps * t_min)
    window = rev[-big_l:]
    used = len(window)
    loop = window[:-small_k] if small_k else window[:0]
    return TruncatedPlan(
        first_timestep=int(rev[0]),
        first_index=first_index,
        tao_index=tao,
        loop=tuple((int(t), used - 1 - i) for i, t in enumerate(loop)),
    )
