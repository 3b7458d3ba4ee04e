"""Attention backends behind one seam.

Model code calls a `CoreAttention` module on (B, heads, S, head_dim) tensors. Context
parallelism (parallel/context_parallel/) and transformer-engine replace that module, nothing else:
the CP wrapper keeps the CoreAttention it found as `inner` and calls it on the local
(Ulysses) attention, whichever backend that is.

Mask convention: ours is True = attend (a valid key), like SDPA's boolean attn_mask.
transformer-engine's is the opposite (True = masked OUT); `te_padding_masks` converts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sora_dist.config.model import ATTENTION_BACKENDS, SDPA_KERNELS


def sdpa_attention(
    q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor,
    kv_mask_BS: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """torch SDPA; kv_mask marks valid keys (True = attend). Picks flash/cuDNN/efficient on GPU."""
    mask = None if kv_mask_BS is None else kv_mask_BS[:, None, None, :]
    return F.scaled_dot_product_attention(q_BHSD, k_BHSD, v_BHSD, attn_mask=mask)


# A packed sequence's layout: (start, end, sample id) of each run of one sample's tokens, in
# order; id -1 is padding (no sample). The Conditioning carries it (models/dit.py), so attention
# groups a pack's samples without reading the ids back from the device (a host sync per call on
# GPU). A tuple of ints: a constant to activation checkpointing's replay; a pack's attention
# runs outside torch.compile's graphs (models/dit.py self_attention), so compiled blocks never
# specialise on it.
Runs = tuple[tuple[int, int, int], ...]


def _runs(pieces) -> Runs:
    """(sample id, tokens) pieces in sequence order -> Runs: empty pieces dropped, neighbours of
    one id merged (as torch.unique_consecutive would)."""
    out, start = [], 0
    for i, n in pieces:
        if n <= 0:
            continue
        if out and out[-1][2] == i:
            out[-1] = (out[-1][0], start + n, i)
        else:
            out.append((start, start + n, i))
        start += n
    return tuple(out)


def pack_runs(counts, length: int) -> Runs:
    """Runs of a pack whose samples hold `counts` tokens, in order (0: a padding sample, no
    run), padded with id -1 to `length` tokens; from the host-side counts alone."""
    return _runs([*enumerate(counts), (-1, length - sum(counts))])


def window_runs(runs: Runs, start: int, end: int) -> Runs:
    """The runs of tokens [start, end) (a CP rank's chunk), counted from `start`; tokens past the
    end of `runs` are padding (id -1), as SequenceSharding pads the sequence."""
    stop = runs[-1][1] if runs else 0
    return _runs([(i, min(b, end) - max(a, start)) for a, b, i in runs] + [(-1, end - max(stop, start))])


def doc_runs(doc_S: torch.Tensor) -> Runs:
    """The runs of a tensor of sample ids (packed samples are contiguous). Reads the device (a
    host sync); the model's attention uses the runs its Conditioning carries instead."""
    ids, counts = torch.unique_consecutive(doc_S, return_counts=True)
    return _runs(zip(ids.tolist(), counts.tolist()))


def same_length_groups(runs) -> list[tuple[int, int, int, int]]:
    """Consecutive runs of equal length merged: (start, length, count, first id). The packer
    puts equal-size samples (images of one bucket, clips of one shape) next to each other, so a
    pack of many small samples becomes a few batched kernel calls instead of one per sample."""
    out = []
    for a, b, i in runs:
        n = b - a
        if out and out[-1][1] == n and out[-1][0] + out[-1][1] * out[-1][2] == a and out[-1][3] + out[-1][2] == i:
            s, _, c, f = out[-1]
            out[-1] = (s, n, c + 1, f)
        else:
            out.append((a, n, 1, i))
    return out


def sample_groups(runs: Optional[Runs], doc_S: Optional[torch.Tensor] = None):
    """same_length_groups of a pack: of its precomputed runs, or (runs None) of doc_S's, read from
    the device (a host sync, for callers that hold only the ids)."""
    return same_length_groups(runs if runs is not None else doc_runs(doc_S))


def _group_pieces(x_1HSD: torch.Tensor, groups) -> list[torch.Tensor]:
    """A packed (1, H, S, D) tensor cut along S into same_length_groups' groups, each as a batch
    (count, H, n, D) of its equal-size samples. One split for all groups: its backward is one
    cat, where slicing each group out would give each a zero-filled (1, H, S, D) gradient (a
    fill and a copy of the whole sequence per group: 3 ms of a 160 ms step of an 11-sample pack
    on CPU)."""
    pieces = x_1HSD.split([n * c for _, n, c, _ in groups], dim=2)
    return [p[0].unflatten(1, (c, n)).transpose(0, 1) for p, (_, n, c, _) in zip(pieces, groups)]


def _from_batch(o_CHnD: torch.Tensor) -> torch.Tensor:
    return o_CHnD.transpose(0, 1).flatten(1, 2)[None]


def document_attention(attn, q_BHSD, k_BHSD, v_BHSD, doc_S, kv_mask_BS=None, runs=None) -> torch.Tensor:
    """Self-attention of a packed sequence (B = 1): each sample's tokens attend only within the
    sample (a block-diagonal mask), one `attn` call per group of equal-size neighbouring samples
    (batched), so no S x S mask is ever built. doc_S: sample id of each token; `runs` (its runs,
    Runs) are the samples (read from doc_S when None). The groups must tile the sequence."""
    groups = sample_groups(runs, doc_S)
    outs = []
    for (a, n, c, _), q, k, v in zip(groups, *(_group_pieces(x, groups) for x in (q_BHSD, k_BHSD, v_BHSD))):
        m = None if kv_mask_BS is None else kv_mask_BS[0, a:a + n * c].view(c, n)
        outs.append(_from_batch(attn(q, k, v, m)))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def varlen_usable(q_BHSD: torch.Tensor, kv_mask_BS=None) -> bool:
    """Whether torch's varlen_attn (flash, CUDA only, fp16/bf16) can take a packed sequence's
    self-attention: a CUDA half-precision (1, H, S, D) query with no key mask, D a multiple of 8
    up to 256 (flash's head sizes)."""
    D = q_BHSD.shape[-1]
    return (q_BHSD.is_cuda and q_BHSD.dtype in (torch.float16, torch.bfloat16) and kv_mask_BS is None
            and q_BHSD.shape[0] == 1 and D % 8 == 0 and D <= 256
            and torch.cuda.get_device_capability(q_BHSD.device) >= (8, 0))  # flash: Ampere and later


def varlen_document_attention(q_BHSD, k_BHSD, v_BHSD, doc_S=None, runs=None) -> torch.Tensor:
    """Self-attention of a packed sequence (B = 1) in one kernel call: torch's varlen_attn
    (flash) with each run of `runs` (read from doc_S when None) as one sequence, so every sample
    attends within itself, as document_attention computes with one SDPA call per group. A run of
    padding tokens (id -1) is a sequence of its own, as there. The sequence boundaries go to the
    device from the host's runs (a host-to-device copy; no device read)."""
    from torch.nn.attention.varlen import varlen_attn

    bounds, longest = varlen_bounds(runs if runs is not None else doc_runs(doc_S), q_BHSD.shape[2])
    cu = torch.tensor(bounds, dtype=torch.int32, device=q_BHSD.device)
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (q_BHSD, k_BHSD, v_BHSD))  # (S, H, D)
    return varlen_attn(q, k, v, cu, cu, longest, longest).transpose(0, 1)[None]


def varlen_bounds(runs: Runs, length: int) -> tuple[list[int], int]:
    """varlen_attn's cumulative sequence bounds of a pack's runs ([0, end of run 1, ...]) and
    its longest run; the runs must tile the sequence's `length` tokens from token 0."""
    bounds = [0]
    for a, b, _ in runs:
        if a != bounds[-1] or b <= a:
            raise ValueError(f"runs {runs} do not tile the sequence from 0")
        bounds.append(b)
    if bounds[-1] != length:
        raise ValueError(f"runs {runs} cover {bounds[-1]} tokens of a sequence of {length}")
    return bounds, max(b - a for a, b, _ in runs)


def sdpa_priority(kernel: str) -> Optional[list]:
    """SDPBackend priority list for model.sdpa_kernel, or None for torch's default order. The
    chosen kernel goes first and the rest follow as fallbacks (in torch's order), so a kernel
    that cannot take a call (cuDNN or flash with a padding mask, fp32, ...) hands it on instead
    of failing. "auto" leaves torch's own choice."""
    if kernel not in SDPA_KERNELS:
        raise ValueError(f"model.sdpa_kernel={kernel!r}: use one of {SDPA_KERNELS}")
    if kernel == "auto":
        return None

    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = order.pop(kernel)
    return [first, *order.values()]


# ---- transformer-engine ------------------------------------------------------------------------

def import_te():
    """transformer_engine.pytorch, or an ImportError that says what to install instead."""
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:
        raise ImportError(
            "transformer-engine is not installed: pip install 'sora_dist[gpu]' on a CUDA machine, "
            "or use model.attention_backend=sdpa (and model.fp8_linears=none or torchao)") from e
    return te


def te_autocast(recipe):
    """TE's FP8 region: `te.autocast(recipe=...)` (TE >= 2.8), else the older `te.fp8_autocast`."""
    te = import_te()
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def te_padding_masks(kv_mask_BS: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our key mask (B, S_kv; True = valid key) -> TE's cross-attention padding masks
    ([B, 1, 1, S_q], [B, 1, 1, S_kv]; True = masked OUT). Every query counts as valid: a query
    at a padded position still attends to the valid keys, as SDPA with a key mask does (the
    head drops those rows), so both backends compute the same thing on every row."""
    kv = kv_mask_BS.bool().logical_not()[:, None, None, :]
    q = torch.zeros(kv_mask_BS.shape[0], 1, 1, q_len, dtype=torch.bool, device=kv_mask_BS.device)
    return q, kv


def is_right_padded(kv_mask_BS: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: every row's valid keys form a prefix. TE's padding masks become
    cu_seqlens (a count per row), so they can only express masks of this shape. Ours are:
    captions are right-padded, and SequenceSharding pads video tokens at the end."""
    m = kv_mask_BS.bool()
    prefix = torch.arange(m.shape[1], device=m.device) < m.sum(1, keepdim=True)
    return (m == prefix).all()


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v with an optional key-padding mask. Stateless.

    backend="te": transformer_engine.pytorch.DotProductAttention (cuDNN fused / flash kernels,
    FP8 when `fp8_recipe` is set by models/fp8.py:apply_fp8). TE fixes the head count at
    construction, and that is only known at call time (TP and Ulysses change the local heads),
    so one TE module per (heads, head_dim) is built on first use. With context parallelism the
    CP wrapper (parallel/context_parallel/attention.py) can hand TE its CP groups (`set_te_context_parallel`) and
    call `forward_te_cp` on the local sequence shard: TE's own CP attention (ring "p2p",
    Ulysses "a2a" or hierarchical "a2a+p2p") then runs, FP8 included. They are kept out of the
    module tree: they hold no parameters (vanilla softmax) and their FP8 metadata is not worth
    a checkpoint key that would differ between backends (a delayed-scaling amax history
    restarts after a resume; the default current-scaling recipe keeps none).
    """

    def __init__(self, backend: str = "sdpa", sdpa_kernel: str = "auto"):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; use {' or '.join(map(repr, ATTENTION_BACKENDS))}")
        self.backend = backend
        self.sdpa_kernel = sdpa_kernel
        self._sdpa_priority = sdpa_priority(sdpa_kernel)
        # A TE recipe with fp8_dpa=True, or None for bf16/fp16 attention.
        self.fp8_recipe = None
        if backend == "te":
            try:
                import_te()
            except ImportError as e:
                raise ImportError(f"model.attention_backend=te: {e}") from e
            self._te_cores: dict[tuple[int, int, bool], nn.Module] = {}
            # (cp_group or [a2a_group, p2p_group], cp_global_ranks, cp_stream, cp_comm_type)
            self._te_cp: Optional[tuple] = None

    def extra_repr(self) -> str:
        return (f"backend={self.backend}" + (", fp8" if self.fp8_recipe is not None else "")
                + (f", sdpa_kernel={self.sdpa_kernel}" if self.sdpa_kernel != "auto" else ""))

    def forward(self, q_BHSD, k_BHSD, v_BHSD, kv_mask_BS=None, doc_S=None, runs=None):
        """Packed sequences: doc_S, the sample of each token, and/or its runs (Runs; the
        Conditioning's, worked out on the host); attention stays within samples. On CUDA in
        fp16/bf16 with sdpa_kernel auto or flash: one varlen_attn (flash) call for the whole
        pack; elsewhere (CPU, fp32, cuDNN/efficient/math, TE, a key mask): one SDPA / TE call
        per group of equal-size neighbouring samples (document_attention)."""
        if doc_S is not None or runs is not None:
            if self.backend == "sdpa" and self.sdpa_kernel in ("auto", "flash") and varlen_usable(q_BHSD, kv_mask_BS):
                return varlen_document_attention(q_BHSD, k_BHSD, v_BHSD, doc_S, runs)
            return document_attention(self._dense, q_BHSD, k_BHSD, v_BHSD, doc_S, kv_mask_BS, runs)
        return self._dense(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS)

    def _dense(self, q_BHSD, k_BHSD, v_BHSD, kv_mask_BS=None):
        if self.backend == "sdpa":
            if self._sdpa_priority is None:
                return sdpa_attention(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS)

            with sdpa_kernel(self._sdpa_priority, set_priority=True):
                return sdpa_attention(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS)
        return self._te_forward(q_BHSD, k_BHSD, v_BHSD, kv_mask_BS)

    def set_te_context_parallel(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type: str) -> None:
        """TE's DotProductAttention.set_context_parallel_group arguments for forward_te_cp."""
        if self.backend != "te":
            raise ValueError("TE context parallelism needs model.attention_backend=te")
        self._te_cp = (cp_group, cp_global_ranks, cp_stream, cp_comm_type)
        self._te_cores = {key: c for key, c in self._te_cores.items() if not key[2]}

    def forward_te_cp(self, q_BHSD, k_BHSD, v_BHSD):
        """Full (unmasked) attention over the sequence sharded on the CP group, through TE's CP
        implementation: takes and returns this rank's contiguous shard (B, H, S/cp, D). For
        non-causal attention TE's load-balancing chunk order does not matter (keys are order-
        free, and its a2a reorders queries back), so our contiguous split is valid as is."""
        if self._te_cp is None:
            raise RuntimeError("forward_te_cp before set_te_context_parallel")
        return self._te_forward(q_BHSD, k_BHSD, v_BHSD, None, cp=True)

    def _te_core(self, heads: int, head_dim: int, cp: bool = False) -> nn.Module:
        core = self._te_cores.get((heads, head_dim, cp))
        if core is None:
            te = import_te()
            # "bshd": TE takes (B, S, H, D); our (B, H, S, D) is a transpose away.
            # attention_type="cross": padding masks then come as a (q, kv) pair, so self- and
            # cross-attention share one path (see te_padding_masks). The default mask type
            # is "causal"; ours is full attention, so "no_mask" unless a key mask is passed.
            # TE's CP path is used for self-attention only, never with a padding mask.
            core = te.DotProductAttention(
                num_attention_heads=heads, kv_channels=head_dim, qkv_format="bshd",
                attn_mask_type="no_mask", attention_type="self" if cp else "cross",
                attention_dropout=0.0)
            if cp:
                core.set_context_parallel_group(*self._te_cp)
            self._te_cores[(heads, head_dim, cp)] = core
        return core

    def _te_forward(self, q_BHSD, k_BHSD, v_BHSD, kv_mask_BS, cp: bool = False):
        B, H, Sq, D = q_BHSD.shape
        # TE wants one dtype for q/k/v; under autocast q/k can come out of the fp32 qk-norm
        # weight while v is bf16. Use the autocast dtype, as SDPA does under autocast.
        dev = q_BHSD.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else q_BHSD.dtype
        q, k, v = (t.to(dt).transpose(1, 2) for t in (q_BHSD, k_BHSD, v_BHSD))
        kw = {}
        if kv_mask_BS is not None:
            # Checked on the device: no host sync per call.
            torch._assert_async(is_right_padded(kv_mask_BS),
                                "attention_backend=te needs right-padded key masks (valid keys first)")
            kw = dict(attn_mask_type="padding", attention_mask=te_padding_masks(kv_mask_BS, Sq))
        core = self._te_core(H, D, cp)
        if self.fp8_recipe is not None:
            with te_autocast(self.fp8_recipe):
                o = core(q, k, v, **kw)
        else:
            o = core(q, k, v, **kw)
        return o.reshape(B, Sq, H, D).transpose(1, 2)
