"""VideoDiT's init rule (models/dit.py:init_dit_weights) checked on whole weights, shared by the
meta-init tests (tests/distributed/test_parallel_equivalence.py, test_trainer_parallel.py)."""
import math

import torch
import torch.nn as nn

from sora_dist.config.model import DiTArgs
from sora_dist.models import build_model
from sora_dist.models.dit import RMSNorm, VideoDiT
from sora_dist.parallel.pipeline import DiTStage, split_blocks
from sora_dist.parallel.rng import mix_seed


def init_violations(full: dict, args: DiTArgs, std_rel: float = 0.07) -> list:
    """What breaks the init rule in these whole weights, recomputed from each parameter's module
    type and GLOBAL shape: Linear/Conv3d weights xavier uniform with fans (out, in * kernel),
    i.e. bound sqrt(3) * std, std = sqrt(2 / (fan_in + fan_out)), the largest |w| within
    [0.9, 1] x bound (a fan taken from a TP shard moves the bound by >= 15%); timestep-MLP
    weights and the null caption N(0, 0.02); every bias zero; norm weights one; adaLN gates and
    the final layer zero under adaLN-Zero (args.zero_init). A sample std may miss by
    max(std_rel, 5 standard errors), a mean by 5 standard errors; a parameter with no rule fails."""
    with torch.device("meta"):
        layout = VideoDiT(args)  # module types and names only
    modules = dict(layout.named_modules())
    zeroed = set()
    if args.zero_init:
        for i in range(args.depth):
            zeroed |= {f"blocks.{i}.adaLN_modulation.1.{a}" for a in ("weight", "bias")}
        zeroed |= {f"final_layer.{m}.{a}" for m in ("adaLN_modulation.1", "linear") for a in ("weight", "bias")}
    bad = []
    expected = {n for n, _ in layout.named_parameters()}
    if set(full) != expected:
        return [f"parameter names differ: {sorted(set(full) ^ expected)}"]

    def check_std(name, t, std, kurt):
        n = t.numel()
        tol = max(std_rel, 5 * math.sqrt((kurt - 1) / (4 * n)))  # SE of a sample std
        if not abs(t.std().item() / std - 1) <= tol:
            bad.append(f"{name}: std {t.std().item():.4g} vs {std:.4g} (tol {tol:.2f})")
        if not abs(t.mean().item()) <= 5 * std / math.sqrt(n):
            bad.append(f"{name}: mean {t.mean().item():.3g}")

    for name, t in sorted(full.items()):
        mod_name, _, attr = name.rpartition(".")
        mod = modules.get(mod_name)
        if not torch.isfinite(t).all():
            bad.append(f"{name}: not finite")
        elif name in zeroed or attr == "bias":
            if not torch.equal(t, torch.zeros_like(t)):
                bad.append(f"{name}: not zero")
        elif isinstance(mod, (nn.LayerNorm, RMSNorm)):
            if not torch.equal(t, torch.ones_like(t)):
                bad.append(f"{name}: norm weight not one")
        elif name == "null_text" or name.startswith("t_embedder."):
            check_std(name, t, 0.02, 3.0)
        elif isinstance(mod, (nn.Linear, nn.Conv3d)) and attr == "weight":
            fan_out, fan_in = t.shape[0], t[0].numel()
            std = math.sqrt(2.0 / (fan_in + fan_out))
            bound, top = math.sqrt(3.0) * std, t.abs().max().item()
            if not 0.9 * bound <= top <= bound * (1 + 1e-6):
                bad.append(f"{name}: max |w| {top:.4g} vs xavier bound {bound:.4g}")
            check_std(name, t, std, 1.8)
        else:
            bad.append(f"{name}: no init rule for {type(mod).__name__}")
    return bad


def reference_init(model_cfg, seed: int, n_stages: int = 1) -> dict:
    """What meta init must give whatever the layout: a plain model (or each pipeline stage)
    allocated from the meta device and initialised by init_weights() from the seed (a stage not
    starting at block 0 from mix_seed(seed, first block))."""
    with torch.device("meta"):
        model = build_model(model_cfg)
    ranges = split_blocks(model.args.depth, n_stages)
    parts = [model] if n_stages == 1 else [DiTStage(model, r, s == 0, s == n_stages - 1)
                                           for s, r in enumerate(ranges)]
    out = {}
    with torch.random.fork_rng():
        for part in parts:
            part.to_empty(device="cpu")
            first = min(int(k) for k in part.blocks)
            torch.manual_seed(seed if first == 0 else mix_seed(seed, first))
            part.init_weights()
            out.update({n: p.detach().clone() for n, p in part.named_parameters()})
    return out
