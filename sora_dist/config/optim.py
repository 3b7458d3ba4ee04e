"""Optimizer and LR schedule."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimConfig:
    # AdamW learning rate (peak, after warmup).
    lr: float = 1e-4
    # AdamW betas and epsilon.
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # Decoupled weight decay (not applied to norms, biases, embeddings of shape 1-D).
    weight_decay: float = 0.0
    # Linear warmup steps from 0 to lr.
    warmup_steps: int = 0
    # After warmup: "cosine" down to min_lr_ratio*lr at train.steps, or "constant".
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    # Global grad-norm clip (0 = off); computed across every parallel group.
    grad_clip: float = 1.0
