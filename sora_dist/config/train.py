"""The training run: steps, precision, checkpoints, logging."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# train.activation_checkpointing values, by rising recompute cost (the planner ranks them so).
ACTIVATION_CHECKPOINTING = ("none", "op", "selective", "full")
# train.device (and the encode/sample jobs' device): "auto" takes CUDA when one is visible.
DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISIONS = ("bf16", "fp32")


@dataclass
class TrainConfig:
    # Optimizer steps to run (the LR schedule ends here).
    steps: int = 20
    # Global seed: init, noise and timesteps are functions of (seed, step, dp rank).
    seed: int = 0
    # Run folder: resolved config, checkpoints, logs, wandb. Relative paths are under the CWD.
    run_dir: str = "runs/default"
    # "auto" (cuda if available), "cpu" or "cuda".
    device: str = "auto"
    # Autocast dtype on GPU: "bf16" or "fp32". CPU always runs fp32.
    mixed_precision: str = "bf16"
    # Activation checkpointing: "none", "full" (every block), "selective" (every other block) or
    # "op" (every block, keeping matmul and attention-kernel outputs, recomputing the rest; not
    # with the zero-bubble PP schedules or transformer-engine attention).
    activation_checkpointing: str = "none"
    # torch.compile each block.
    compile: bool = False
    # Build the model on the meta device and allocate only each rank's shards, initialised after
    # parallelize (no rank ever holds the full fp32 model: needed for 7B/30B); with PP each rank
    # allocates only its stages. Multi-process only; FP8 with torchao (not te). The init draw
    # differs from a one-process init.
    meta_init: bool = False
    # EMA decay of the weights (0 = no EMA).
    ema_decay: float = 0.999
    # Save a checkpoint every N steps (0 = only at the end).
    ckpt_every: int = 10
    # Keep the newest N complete checkpoints.
    ckpt_keep: int = 2
    # Write checkpoints in a background thread (torch DCP async_save): the step loop waits only
    # for the copy to CPU memory. One save in flight at a time; its COMPLETE marker is written
    # once every rank has finished it (next save, preemption or the end of training).
    async_checkpoint: bool = False
    # Resume from the newest complete checkpoint in run_dir/checkpoints when present.
    resume: bool = True
    # Load weights (model only) from this checkpoint dir at start when not resuming.
    init_from: Optional[str] = None
    # Stop after this many consecutive non-finite losses (each one is skipped).
    max_nonfinite_streak: int = 3


@dataclass
class LoggingConfig:
    # Console/metrics every N steps.
    log_every: int = 1
    # Also print other libraries' import-time warnings (torchao, diffusers, transformers), which
    # are filtered by default (sora_dist/console.py).
    verbose: bool = False
    # wandb: "offline" (default, files in run_dir/wandb), "online" (needs WANDB_API_KEY) or "disabled".
    wandb_mode: str = "offline"
    wandb_project: str = "sora_dist"
    # Also write TensorBoard event files in run_dir/tb.
    tensorboard: bool = False
    # Dense bf16 peak TFLOP/s of one device for MFU; 0 = known GPUs (H100/H200 989, A100 312),
    # no MFU on unknown devices or CPU.
    peak_tflops: float = 0.0
    # Every N steps (0 = never), rank 0 samples `sample_prompts` from the checkpoint just saved
    # (VAE/text encoder from the shard manifest, so data.source=shards) to run_dir/samples/
    # step_XXXXXXXX/*.mp4 and logs them to wandb as videos.
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["a red square moving right"])
    # Sampler steps and video size (frames, height, width in pixels) of those samples.
    sample_steps: int = 20
    sample_num_frames: int = 17
    sample_height: int = 64
    sample_width: int = 64
