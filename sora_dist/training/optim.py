"""AdamW with decay only on matrices, and a warmup + cosine LR schedule (a pure function of step)."""
from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """cfg: OptimConfig. Params with ndim < 2 (norms, biases, null caption) get no weight decay.
    Works on FSDP2/TP DTensor params unchanged (the optimizer state is sharded like them)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             foreach=None)


def lr_factor(step: int, cfg, total_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then cosine or flat."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg, total_steps: int) -> float:
    """Set every group's LR for this step; returns it. Stateless, so resume needs only the step."""
    lr = cfg.lr * lr_factor(step, cfg, total_steps)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def clean_fqn(name: str) -> str:
    """Parameter name without activation-checkpoint / compile wrapper prefixes, i.e. the name
    torch.distributed.checkpoint's get_model_state_dict uses, so EMA keys match any layout."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def named_params(model: torch.nn.Module) -> dict:
    return {clean_fqn(n): p for n, p in model.named_parameters()}


class EMA:
    """Exponential moving average of the weights, kept in fp32 with the parameters' own
    sharding (plain tensors or DTensors), so it is checkpointed and resharded like them."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in named_params(model).items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        names = list(self.shadow)
        params = named_params(model)
        ema = [self.shadow[n] for n in names]
        cur = [params[n].detach().float() for n in names]
        torch._foreach_lerp_(ema, cur, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict) -> None:
        for n, t in self.shadow.items():
            t.copy_(sd[n])

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for n, p in named_params(model).items():
            p.copy_(self.shadow[n].to(p.dtype))
