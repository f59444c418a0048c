"""The documented parameter sets of each model, importable without torch: the model describes itself with them
(``ModelDescriptor.defaults`` / ``presets``) and the API replicas, which load no model, fill requests from them."""

from __future__ import annotations

V2_PROMPT = "clean, high-resolution, 8k"  # the reference's added prompt
V2_NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"

V2_PRESETS: dict[str, dict[str, object]] = {
    # the reference's one-step script (scripts/test/test_ccsr_onestep.sh): t_max stays its argparse default
    "one-step": {"steps": 1, "t_max": 0.6666, "t_min": 0.0, "cfg_scale": 1.0, "scale": 4.0, "process_size": 512,
                 "start_point": "lr", "start_steps": 999, "color_fix": "adain",
                 "prompt": V2_PROMPT, "negative_prompt": V2_NEGATIVE_PROMPT},
    # its multi-step script (scripts/test/test_ccsr_multistep.sh): 6 spaced steps of which 2 run
    "two-step": {"steps": 6, "t_max": 0.6667, "t_min": 0.5, "cfg_scale": 4.5, "scale": 4.0, "process_size": 512,
                 "start_point": "lr", "start_steps": 999, "color_fix": "adain",
                 "prompt": V2_PROMPT, "negative_prompt": V2_NEGATIVE_PROMPT},
}
V2_DEFAULT_PRESET = "one-step"
