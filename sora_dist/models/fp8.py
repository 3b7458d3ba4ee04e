"""FP8 training for the DiT's block linears: torchao Float8Linear or transformer-engine te.Linear.

`apply_fp8(model, cfg)` runs once, on the freshly built model and before parallelize_dit
(torchtitan's order: convert, then TP/FSDP), and swaps only the matmul-heavy block linears:
self/cross-attention q/k/v/o and MLP fc1/fc2. Embedders, adaLN modulation and the final layer
stay in high precision: they are a small share of the FLOPs and the most sensitive to
quantisation (adaLN scales every activation of a block; the head writes the prediction).
FP8 GEMMs (cuBLASLt / torch._scaled_mm) want both weight dims divisible by 16, so a linear whose
in/out features are not is skipped too. Parameter names (weight, bias) are kept: torchao
checkpoints are interchangeable with unconverted ones; te.Linear adds an `_extra_state` key per
layer (its FP8 metadata), so te <-> non-te checkpoints load only with strict=False.

It also hands the transformer-engine recipe to any CoreAttention(backend="te") when FP8
attention is asked for (model.fp8_attention), so the attention seam stays in attention.py.
Every optional import is lazy and names the extra to install when it is missing.
"""
from __future__ import annotations

import logging
import math
import re
import types
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sora_dist.config.model import FP8_LINEARS, FP8_RECIPES
from sora_dist.models.attention import CoreAttention, import_te, te_autocast
from sora_dist.parallel.device import device_capability

log = logging.getLogger("sora_dist")


# Leaf paths (inside one DiT block) of the linears that run in FP8; everything else is skipped.
_BLOCK_LINEAR = re.compile(r"(^|\.)blocks\.\d+\.(.+\.)?((attn|cross_attn)\.(wq|wk|wv|wo)|mlp\.(fc1|fc2))$")


def fp8_eligible(fqn: str, module: nn.Module) -> bool:
    """True for a block attention/MLP nn.Linear whose dims both divide by 16."""
    return (
        isinstance(module, nn.Linear)
        and _BLOCK_LINEAR.search(fqn) is not None
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def apply_fp8(model: nn.Module, cfg, device=None) -> nn.Module:
    """Convert the model's block linears per `cfg.model.fp8_linears` (in place; returns the
    model) and configure FP8 attention per `cfg.model.fp8_attention`. A no-op for "none".
    `device`: where the model will run, for a model still on the meta device (train.meta_init)."""
    m = cfg.model
    mode = m.fp8_linears
    if mode not in FP8_LINEARS:
        raise ValueError(f"model.fp8_linears={mode!r}: use one of {list(FP8_LINEARS)}")
    if mode == "torchao":
        n = convert_torchao(model, device)
    elif mode == "te":
        n = convert_te(model, m.fp8_recipe)
    else:
        n = 0
    if mode != "none":
        if n == 0:
            raise ValueError(
                f"model.fp8_linears={mode}: no block linear has in/out features divisible by 16; "
                f"use a hidden_size (and hidden_size*mlp_ratio) divisible by 16, or fp8_linears=none")
        log.info("fp8 (%s): %d block linears converted", mode, n)
    if m.fp8_attention:
        cores = [mod for mod in model.modules() if isinstance(mod, CoreAttention)]
        if any(c.backend != "te" for c in cores):
            raise ValueError("model.fp8_attention=true needs model.attention_backend=te "
                             "(SDPA has no FP8 path); set it or turn model.fp8_attention off")
        recipe = build_te_recipe(m.fp8_recipe, fp8_dpa=True)
        for c in cores:
            c.fp8_recipe = recipe
    return model


# ---- torchao -----------------------------------------------------------------------------------

def convert_torchao(model: nn.Module, device=None) -> int:
    """Swap eligible linears for torchao's Float8Linear (dynamic tensorwise scaling: e4m3 for
    inputs/weights, e5m2 for output grads). Returns how many were converted."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError(
            "model.fp8_linears=torchao needs torchao: pip install torchao "
            "(or use model.fp8_linears=none)") from e
    _check_cuda_fp8(model, "torchao", device)
    picked: list[str] = []

    def keep(mod: nn.Module, fqn: str) -> bool:
        ok = fp8_eligible(fqn, mod)
        if ok:
            picked.append(fqn)
        return ok

    convert_to_float8_training(model, config=Float8LinearConfig(), module_filter_fn=keep)
    return len(picked)


# ---- transformer-engine ------------------------------------------------------------------------

def build_te_recipe(name: str, fp8_dpa: bool = False):
    """TE recipe by config name. "current" (Float8CurrentScaling, TE >= 2.2) keeps no amax
    history for the linears, so activation recompute cannot skew it and checkpoints need no
    FP8 state; "delayed" (DelayedScaling) is TE's classic recipe: scales come from an amax
    history of past steps, so no extra pass over a tensor before casting it. For FP8 attention
    TE >= 2.8 takes current scaling for q/k/v/o and grads and keeps delayed scaling inside
    (softmax S, dP); older TE only has delayed scaling there."""
    if name not in FP8_RECIPES:
        raise ValueError(f"model.fp8_recipe={name!r}: use one of {list(FP8_RECIPES)}")
    import_te()
    import transformer_engine
    from transformer_engine.common import recipe

    version = tuple(int(x) for x in re.findall(r"\d+", transformer_engine.__version__)[:2])
    need = (2, 8) if fp8_dpa else (2, 2)
    if name == "current" and version < need:
        what = "FP8 attention with current scaling" if fp8_dpa else "Float8CurrentScaling"
        raise RuntimeError(
            f"{what} needs transformer-engine >= {need[0]}.{need[1]} (installed: "
            f"{transformer_engine.__version__}); upgrade it or set model.fp8_recipe=delayed")
    cls = recipe.Float8CurrentScaling if name == "current" else recipe.DelayedScaling
    # HYBRID: e4m3 forward, e5m2 gradients (the wider range the backward pass needs).
    return cls(fp8_format=recipe.Format.HYBRID, fp8_dpa=fp8_dpa)


def convert_te(model: nn.Module, recipe_name: str) -> int:
    """Swap eligible linears for te.Linear (weights copied) and run each block inside a TE FP8
    region: te.Linear only computes in FP8 within one, and per block keeps it correct when a
    pipeline stage or activation checkpointing calls blocks on their own."""
    te = import_te()
    _check_cuda_fp8(model, "te")
    recipe = build_te_recipe(recipe_name)

    linear_cls = te_row_padded_linear(te.Linear)

    def make(lin: nn.Linear) -> nn.Module:
        new = linear_cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                         params_dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            new.weight.copy_(lin.weight)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        return new

    n = _swap_linears(model, make)
    for blk in getattr(model, "blocks", {}).values():
        blk._sora_fp8_recipe = recipe
        blk.forward = types.MethodType(_forward_in_te_autocast, blk)
    return n


def te_row_padded_linear(base: type) -> type:
    """A subclass of `base` (te.Linear) whose GEMM always sees a row count divisible by 8.
    TE's FP8 GEMM asserts it, and ours vary: B * video tokens, B * caption tokens. Zero rows are
    appended and their outputs dropped; they leave every amax unchanged and add nothing to the
    weight/bias gradients (their output gradient is zero)."""

    class RowPaddedLinear(base):
        def forward(self, inp, *args, **kwargs):
            lead = inp.shape[:-1]
            n = math.prod(lead)
            pad = (-n) % 8
            if pad == 0:
                return super().forward(inp, *args, **kwargs)
            flat = F.pad(inp.reshape(n, inp.shape[-1]), (0, 0, 0, pad))
            out = super().forward(flat, *args, **kwargs)
            return out[:n].reshape(*lead, out.shape[-1])

    RowPaddedLinear.__name__ = RowPaddedLinear.__qualname__ = f"RowPadded{base.__name__}"
    return RowPaddedLinear


def _swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    targets = [(fqn, mod) for fqn, mod in model.named_modules() if fp8_eligible(fqn, mod)]
    for fqn, mod in targets:
        parent_fqn, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent_fqn), name, make(mod))
    return len(targets)


def _forward_in_te_autocast(self, *args, **kwargs):
    """A block's own forward inside a TE FP8 region. Bound per instance (types.MethodType), so
    the class and FQNs stay, and deepcopy rebinds it to the copy."""
    with te_autocast(self._sora_fp8_recipe):
        return type(self).forward(self, *args, **kwargs)


def _check_cuda_fp8(model: nn.Module, what: str, device=None) -> None:
    """FP8 GEMMs need compute capability >= 8.9 (Ada/Hopper/Blackwell); fail before the first
    step rather than inside a kernel. On CPU torchao runs torch's reference FP8 kernels;
    transformer-engine has no CPU path at all."""
    p = next(model.parameters(), None)
    where = p.device if p is not None else torch.device("cpu")
    if where.type == "meta" and device is not None:
        where = torch.device(device)
    dev = where.type
    if dev != "cuda":
        if what == "te":
            raise RuntimeError(
                f"model.fp8_linears=te needs the model on a CUDA device (it is on {dev}); "
                f"use model.fp8_linears=torchao or none")
        return
    cap = device_capability(where)
    if cap < (8, 9):
        raise RuntimeError(
            f"model.fp8_linears={what} needs a GPU with compute capability >= 8.9 "
            f"(H100/L40/B200); this one is {cap[0]}.{cap[1]}: use model.fp8_linears=none")
