"""Tensor parallel (+ Megatron sequence parallel) for VideoDiT and WanDiT with DTensor.

Column-parallel q/k/v and MLP fc1, row-parallel wo and fc2 (split by heads / MLP width).
Every other parameter becomes a Replicate DTensor on the TP mesh, so all parameters live on
one mesh (grad-norm and FSDP2 see one layout) and DTensor's autograd reduces the partial
gradients that replicated weights pick up from sharded activations.

Sequence parallel (SP) keeps the residual stream sharded by tokens (Shard(1)) between the
parallel linears: the Prepare* styles all-gather it before q/k/v and fc1, the row-parallel
wo/fc2 reduce-scatter back to token shards. Outside the parallel linears activations are
plain local tensors; each style below states the layout it assumes at its boundary, because
that layout decides how the backward pass reduces.

The one parameter used outside any submodule (`null_text`, read directly in `embed()`) is a
Replicate DTensor too, so EMA/optimizer foreach kernels never mix meshes; `embed()` runs under
`local_params()`, which hands it the local tensor. Its gradient is identical on all TP ranks
(the caption projection's input gradient is all-reduced), so Replicate is its true layout.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch.nn as nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from sora_dist.config.parallel import layout_problems


class ReplicateCompute(ParallelStyle):
    """Parameters replicated over TP; the module runs on replicated (local) inputs.

    `grad_partial`: the module's output is consumed by token-sharded computation (SP), so each
    rank's output gradient is only its tokens' share. Marking it Partial makes DTensor sum it
    over TP (weights' grads reduce, and the input's grad is all-reduced back to Replicate).
    `input_layout=Shard(d)`: the input is sharded on dim d (q/k norms on head-sharded q/k),
    the module is elementwise along d, so its weight's grad is Partial and gets reduced.
    """

    def __init__(self, *, grad_partial: bool = False, input_layout=None):
        super().__init__()
        self.grad_partial = grad_partial
        self.input_layout = input_layout or Replicate()

    def _prepare_input(self, mod, inputs, mesh):
        return tuple(
            DTensor.from_local(x, mesh, (self.input_layout,), run_check=False)
            if not isinstance(x, DTensor) and hasattr(x, "shape") else x
            for x in inputs
        )

    def _prepare_output(self, mod, out, mesh):
        grad = (Partial(),) if self.grad_partial else None  # None: same as forward placement
        return out.to_local(grad_placements=grad)

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, self._prepare_input, self._prepare_output)


class ShardedAcrossHeadsNorm(ParallelStyle):
    """An RMSNorm over all heads together (Wan's q/k norm) on head-sharded q/k (B, S, D/tp): its
    weight is split like the heads (Shard(0)) and the input is Shard(2) DTensor, so the mean
    of squares reduces over the TP group and the weight's grad stays per shard."""

    def _partition(self, name, module, mesh):
        for n, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(n, nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)]),
                                                      p.requires_grad))

    def _prepare_input(self, mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, (Shard(2),), run_check=False)
                     if not isinstance(x, DTensor) and hasattr(x, "shape") else x for x in inputs)

    def _prepare_output(self, mod, out, mesh):
        return out.to_local()

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._partition, self._prepare_input,
                                 self._prepare_output)


def check_tp_divisible(num_heads: int, mlp_hidden: int, tp: int) -> None:
    """validate()'s rule (config.parallel.layout_problems), for direct use of apply_tp."""
    problems = layout_problems(heads=num_heads, mlp_width=mlp_hidden, depth=1, tp=tp)
    if problems:
        raise ValueError(f"tensor parallel: {problems[0]}")


def block_plan(sequence_parallel: bool, qk_norm: bool, arch: str = "dit") -> dict[str, ParallelStyle]:
    """TP plan of one block (DiTBlock, or WanBlock for arch "wan": same submodule names but its
    modulation is a table and its q/k norms span all heads); the residual stream is Shard(1)
    (SP) or Replicate between styles."""
    sp = sequence_parallel
    seq = Shard(1) if sp else Replicate()
    if arch == "wan":
        head_norm = ShardedAcrossHeadsNorm  # (B, S, D/tp): the norm spans every head
    else:
        head_norm = partial(ReplicateCompute, input_layout=Shard(2))  # (B, S, heads, head_dim)
    plan: dict[str, ParallelStyle] = {
        # c_BD is replicated; under SP its shift/scale/gate multiply token shards.
        ("modulation" if arch == "wan" else "adaLN_modulation"): ReplicateCompute(grad_partial=sp),
        "norm_cross": SequenceParallel(use_local_output=True) if sp else ReplicateCompute(),
        # args (x, rope, token_mask, doc, doc_runs): gather tokens once; RoPE, mask and the packed
        # samples' ids cover the whole (CP-local) sequence already because attention runs on all of it.
        "attn": PrepareModuleInput(input_layouts=(seq, None, None, None, None),
                                   desired_input_layouts=(Replicate(), None, None, None, None)),
        # args (x, text, text_mask, doc, doc_runs): the caption is replicated over TP.
        "cross_attn": PrepareModuleInput(input_layouts=(seq, Replicate(), None, None, None),
                                         desired_input_layouts=(Replicate(), Replicate(), None, None, None)),
        "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
        "mlp.fc1": ColwiseParallel(),
        "mlp.fc2": RowwiseParallel(output_layouts=seq),
    }
    for a in ("attn", "cross_attn"):
        plan.update({f"{a}.wq": ColwiseParallel(), f"{a}.wk": ColwiseParallel(),
                     f"{a}.wv": ColwiseParallel(), f"{a}.wo": RowwiseParallel(output_layouts=seq)})
        if qk_norm:
            plan.update({f"{a}.q_norm": head_norm(), f"{a}.k_norm": head_norm()})
    return plan


# Parameters the model reads directly (not through a submodule's forward).
DIRECT_PARAMS = ("null_text",)


def replicate_direct_params(model: nn.Module, tp_mesh) -> None:
    for name in DIRECT_PARAMS:
        p = getattr(model, name, None)
        if p is None:  # a pipeline stage without the embedders
            continue
        model.register_parameter(name, nn.Parameter(
            DTensor.from_local(p.data, tp_mesh, (Replicate(),), run_check=False), p.requires_grad))


@contextlib.contextmanager
def local_params(model: nn.Module):
    """Within the block, model.<direct param> is its local tensor (differentiable view: the
    grad flows back to the DTensor, or to FSDP's unsharded parameter, as Replicate)."""
    saved = {n: model._parameters[n] for n in DIRECT_PARAMS if model._parameters.get(n) is not None}
    try:
        for n, p in saved.items():
            if isinstance(p, DTensor):
                model._parameters[n] = p.to_local()
        yield
    finally:
        for n, p in saved.items():
            model._parameters[n] = p


def check_tp_linears(model: nn.Module) -> None:
    """DTensor TP shards torch (or torchao Float8) linears. transformer-engine's te.Linear does
    its own tensor parallelism and cannot hold DTensor weights: refuse instead of failing deep
    inside TE."""
    for name, mod in model.named_modules():
        if any(c.__module__.startswith("transformer_engine") for c in type(mod).__mro__):
            raise NotImplementedError(
                f"tensor parallel with transformer-engine linears ({name}) is not supported; "
                f"use model.fp8_linears=torchao or none with parallel.tp > 1, or parallel.tp=1")


def apply_tp(model: nn.Module, tp_mesh, sequence_parallel: bool) -> nn.Module:
    """Shard a VideoDiT over `tp_mesh` in place. The embed/head seams (local direct params,
    moving tokens between the full sequence and SP/CP shards) are installed by sequence.apply_sequence_sharding."""
    a = model.args
    check_tp_divisible(a.num_heads, a.mlp_width, tp_mesh.size())
    check_tp_linears(model)
    # Root modules run on the full, replicated sequence (the head after the SP gather).
    root = {
        "x_embedder.proj": ReplicateCompute(),
        "t_embedder.mlp": ReplicateCompute(),
        "y_embedder": ReplicateCompute(),
        "final_layer.linear": ReplicateCompute(),
    }
    if a.arch == "wan":
        root.update({"t_embedder.proj": ReplicateCompute(), "final_layer.modulation": ReplicateCompute()})
    else:
        root["final_layer.adaLN_modulation"] = ReplicateCompute()
    # Pipeline stages keep only some of these (the rest are None).
    present = {k: v for k, v in root.items() if getattr(model, k.split(".")[0], None) is not None}
    parallelize_module(model, tp_mesh, present)
    replicate_direct_params(model, tp_mesh)
    plan = block_plan(sequence_parallel, a.qk_norm, a.arch)
    for blk in model.blocks.values():
        parallelize_module(blk, tp_mesh, plan)
    return model
