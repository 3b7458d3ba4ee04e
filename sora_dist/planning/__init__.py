"""Parallel-layout planner for VideoDiT: memory per GPU, FLOPs per step, estimated step time.

Pure arithmetic (no torch at import), so `tools/plan.py` answers in milliseconds. Every formula
follows the model's actual forward (models/dit.py) and the framework's actual parallelism
(parallel/); the model is described by `DiTArgs` (config/model.py), which also counts its
parameters and FLOPs, and layouts are rejected by config validation's own rules.

  flops.py    FLOPs of a step, with recompute
  memory.py   bytes saved for backward, per tensor, and backward's working set
  layouts.py  candidate layouts, memory per GPU, step time, the pick
  measure.py  (torch; not imported here) the same quantities measured on the real model
"""
from sora_dist.config.model import DiTArgs, Flops
from sora_dist.planning.flops import RECOMPUTES, recomputed_fraction, step_flops
from sora_dist.planning.layouts import (
    CAPTION_TOKENS, GPUS_PER_NODE, LATENT_CHANNELS, PLANNER_CP_MODES, T5_XXL_DIM, GiB, Hardware, Layout, Plan,
    WAN_TEXT_TOKENS, candidate_layouts, check_layout, cp_attention_mode, estimate, flavor_model, plan_all,
    recommend, vae_stride, video_tokens,
)
from sora_dist.planning.memory import (
    PRECISIONS, BlockActs, Precision, backward_working_bytes, block_activations,
    checkpoint_input_bytes, estimate_saved_bytes, outer_activations, recompute_transient_bytes,
    sac_block_bytes, saved_bytes_parts, saved_bytes_per_microbatch,
)

__all__ = [
    "CAPTION_TOKENS", "GPUS_PER_NODE", "LATENT_CHANNELS", "PLANNER_CP_MODES", "PRECISIONS", "RECOMPUTES", "T5_XXL_DIM",
    "BlockActs", "DiTArgs", "Flops", "GiB", "Hardware", "Layout", "Plan", "Precision",
    "backward_working_bytes", "block_activations", "candidate_layouts", "check_layout",
    "checkpoint_input_bytes", "cp_attention_mode", "estimate", "estimate_saved_bytes",
    "WAN_TEXT_TOKENS", "flavor_model", "outer_activations", "vae_stride", "video_tokens", "plan_all", "recommend", "recompute_transient_bytes",
    "recomputed_fraction", "sac_block_bytes", "saved_bytes_parts", "saved_bytes_per_microbatch",
    "step_flops",
]
