"""adaLN modulation from a small table of rows, one row per token group.

A block's shift/scale/gate are usually one vector per sample, broadcast over its tokens. When
tokens of one sample need different conditioning (Wan2.2 TI2V: the clean conditioning frame
has timestep 0, the rest the sampled t; later, packed samples), the vectors form a table
(B, K, D) and each token names its row (`rows_S`). Indexing the table per token would keep
(B, S, D) copies of every shift/scale/gate alive for backward, six per block; these functions
save only the table and the row ids and gather again in backward, so their memory stays that
of the per-sample case.
"""
from __future__ import annotations

from typing import Optional

import torch


def _rows(table_BKD: torch.Tensor, rows_S: torch.Tensor) -> torch.Tensor:
    """table[:, rows] as index_select: the same values, ~8x faster than advanced indexing on CPU
    (measured: 3 vs 24 us for a (1, 3, 128) table and 576 rows; advanced indexing goes through
    the general index kernel)."""
    return table_BKD.index_select(1, rows_S)


class _ModulateRows(torch.autograd.Function):
    """x * (1 + scale[:, rows]) + shift[:, rows]"""

    @staticmethod
    def forward(ctx, x_BSD, shift_BKD, scale_BKD, rows_S):
        ctx.save_for_backward(x_BSD, scale_BKD, rows_S)
        return torch.addcmul(_rows(shift_BKD, rows_S), x_BSD, _rows(1 + scale_BKD, rows_S))

    @staticmethod
    def backward(ctx, g_BSD):
        x_BSD, scale_BKD, rows_S = ctx.saved_tensors
        g_shift = torch.zeros_like(scale_BKD).index_add_(1, rows_S, g_BSD.to(scale_BKD.dtype))
        g_scale = torch.zeros_like(scale_BKD).index_add_(1, rows_S, (g_BSD * x_BSD).to(scale_BKD.dtype))
        return g_BSD * _rows(1 + scale_BKD, rows_S), g_shift, g_scale, None


class _GateRows(torch.autograd.Function):
    """x + y * gate[:, rows]"""

    @staticmethod
    def forward(ctx, x_BSD, y_BSD, gate_BKD, rows_S):
        ctx.save_for_backward(y_BSD, gate_BKD, rows_S)
        return torch.addcmul(x_BSD, y_BSD, _rows(gate_BKD, rows_S))

    @staticmethod
    def backward(ctx, g_BSD):
        y_BSD, gate_BKD, rows_S = ctx.saved_tensors
        g_gate = torch.zeros_like(gate_BKD).index_add_(1, rows_S, (g_BSD * y_BSD).to(gate_BKD.dtype))
        return g_BSD, g_BSD * _rows(gate_BKD, rows_S), g_gate, None


def modulate(x_BSD: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
             rows_S: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x * (1 + scale) + shift with per-sample (B, D) vectors, or per-row (B, K, D) tables and
    the row of each token (rows_S, int64 (S,))."""
    if rows_S is None:
        return x_BSD * (1 + scale[:, None]) + shift[:, None]
    return _ModulateRows.apply(x_BSD, shift, scale, rows_S)


def gated_add(x_BSD: torch.Tensor, y_BSD: torch.Tensor, gate: torch.Tensor,
              rows_S: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x + y * gate (the residual add of a gated branch), per sample or per row as above."""
    if rows_S is None:
        return x_BSD + y_BSD * gate[:, None]
    return _GateRows.apply(x_BSD, y_BSD, gate, rows_S)
