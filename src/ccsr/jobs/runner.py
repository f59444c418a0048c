"""The model-backed :class:`~ccsr.jobs.engine.Runner`: bytes in, encoded bytes out, through ``ccsr.imaging``.

decode (limits) -> shrink to fit the job's output cap -> :func:`ccsr.jobs.chain.upscale_encode` (progress =
tiles x steps, cancel between evaluations; rows streamed into the output's pixels). The same chain as ``ccsr
upscale``, so a job's output is the CLI's output for the same parameters and seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ccsr.params import ParamError

from .engine import JobCancelled, JobFailed, RunOutput
from .types import DEFAULT_MODEL, ErrorCode, Job

log = logging.getLogger("ccsr.jobs.runner")

class CCSRRunner:
    """Loads each served model's pipeline once, in the worker thread, and runs a job on its ``job.model``'s.

    ``models``: model name -> weights (``ccsr-v1``: ``CCSRPipeline.from_single_file(weights, config=config)``;
    ``ccsr-v2``: a CCSR-v2 folder, which ``from_single_file`` recognises); default ``{"ccsr-v1": weights}``.
    ``pipeline``: an already built CCSR-v1 pipeline (tests, embedding)."""

    def __init__(
        self,
        weights: str | None = None,
        config: str | None = None,
        *,
        models: dict[str, str | None] | None = None,
        device: str | None = "auto",
        dtype: str | None = "auto",
        quantize: str | None = None,
        max_input_bytes: int = 64 * 1024 * 1024,
        pipeline=None,
    ):
        self.models = dict(models) if models is not None else {DEFAULT_MODEL: weights}
        self.config = config
        self.device = None if device in (None, "auto") else device
        self.dtype = None if dtype in (None, "auto") else dtype
        self.quantize = quantize or "round"
        self.max_input_bytes = max_input_bytes
        self.pipelines: dict = {DEFAULT_MODEL: pipeline} if pipeline is not None else {}

    def load(self) -> None:
        from ccsr.model import share_identical_networks
        from ccsr.pipeline import CCSRPipeline

        for name, weights in self.models.items():
            if name in self.pipelines:
                continue
            log.info("loading %s from %s", name, weights or "(default)")
            self.pipelines[name] = CCSRPipeline.from_single_file(
                weights, config=self.config if name == DEFAULT_MODEL else None, device=self.device, dtype=self.dtype
            )
            log.info("%s loaded on %s (%s)", name, self.pipelines[name].device, self.pipelines[name].dtype)
        names = list(self.pipelines)
        for net, i, j in share_identical_networks([p.model for p in self.pipelines.values()]):
            log.info("the %s of %s is identical to %s's: held once", net, names[j], names[i])

    def run(
        self,
        job: Job,
        input_bytes: bytes,
        *,
        progress: Callable[[float], None],
        should_cancel: Callable[[], bool],
        log: Callable[[str], None],
    ) -> RunOutput:
        from ccsr import imaging
        from ccsr.jobs.chain import upscale_encode
        from ccsr.pipeline import Cancelled

        pipeline = self.pipelines.get(job.model)
        if pipeline is None:  # a job queued for a model this worker does not load (the intake refuses them)
            raise JobFailed(ErrorCode.INVALID_PARAMS, f"model {job.model} is not loaded here "
                            f"(loaded: {', '.join(self.pipelines) or 'none'})")
        params = job.params
        cap = max(job.max_output) if job.max_output else 1 << 30
        limits = imaging.Limits(max_input_bytes=max(self.max_input_bytes, len(input_bytes)), max_output_side=cap)
        if job.max_output and job.max_output[0] != job.max_output[1]:
            cap = min(job.max_output)
        try:
            decoded = imaging.decode(input_bytes, limits)
            in_size = decoded.size
            fit = imaging.fit_scale(in_size, float(params.scale), limits)
            if fit.shrink is not None:
                decoded = imaging.shrink(decoded, fit.input_size)
                log(
                    f"input shrunk from {in_size[0]}x{in_size[1]} to {fit.input_size[0]}x{fit.input_size[1]}"
                    f" to keep the output within {cap}x{cap}"
                )
            expected = fit.output_size(float(params.scale))
            quality = int(job.output.quality or 95)
            enc_opts = imaging.EncodeOptions(format=job.output.format, quality=quality).validated()
        except imaging.ImageError as e:
            raise JobFailed(ErrorCode.INVALID_INPUT, e.message) from e
        log(
            f"upscaling {decoded.size[0]}x{decoded.size[1]} -> {expected[0]}x{expected[1]}"
            f" with {job.model} ({params.steps} steps, seed {params.seed})"
        )
        try:
            enc, out = upscale_encode(
                pipeline, decoded, params, enc_opts, quantize=self.quantize, expected=expected,
                progress=lambda done, total: progress(done / max(total, 1)), should_cancel=should_cancel, log=log,
            )
        except Cancelled as e:
            raise JobCancelled() from e
        except ParamError as e:  # e.g. explicit tiling that cannot fit in free memory
            raise JobFailed(ErrorCode.INVALID_INPUT, str(e)) from e
        except imaging.ImageError as e:
            code = ErrorCode.INFERENCE_FAILED if e.code == "model_output" else ErrorCode.INVALID_INPUT
            raise JobFailed(code, e.message) from e
        log("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in out.timings.items()))
        return RunOutput(
            data=enc.data,
            content_type=enc.content_type,
            extension=enc.extension,
            width=enc.width,
            height=enc.height,
            seed=out.seed,
            input_width=in_size[0],
            input_height=in_size[1],
        )
