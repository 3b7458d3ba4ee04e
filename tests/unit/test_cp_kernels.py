"""Ring attention's block kernels (parallel/context_parallel/kernels.py): which fused aten kernel
runs per device, the LSE merge of two blocks against full attention, and the CUDA ops' call
conventions on meta tensors (their numerics where a GPU is)."""
from __future__ import annotations

import math

import pytest
import torch

from sora_dist.parallel.context_parallel.kernels import (block_attention, block_attention_backward,
                                                          fused_block_kernel, resolve_block_kernel)


def test_fused_block_kernel_choice():
    assert fused_block_kernel("cpu", torch.float32, 64, True) == "cpu_flash"
    assert fused_block_kernel("cuda", torch.bfloat16, 128, False) == "cuda_flash"
    assert fused_block_kernel("cuda", torch.bfloat16, 128, True) == "cuda_efficient"
    assert fused_block_kernel("cuda", torch.float32, 64, False) == "cuda_efficient"
    assert fused_block_kernel("cuda", torch.bfloat16, 320, False) == "cuda_efficient"
    assert fused_block_kernel("xpu", torch.bfloat16, 64, False) is None
    assert fused_block_kernel("cuda", torch.bfloat16, 64, False, (7, 0)) is None  # V100: math
    assert fused_block_kernel("cuda", torch.float16, 64, False, (7, 5)) == "cuda_efficient"


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kernel,dtype,tol", [
    ("cpu_flash", torch.float32, 1e-5), ("cpu_flash", torch.bfloat16, 3e-2),
    pytest.param("cuda_efficient", torch.float32, 1e-4, marks=needs_cuda),
    pytest.param("cuda_efficient", torch.bfloat16, 3e-2, marks=needs_cuda),
    pytest.param("cuda_flash", torch.bfloat16, 3e-2, marks=needs_cuda),
])
def test_block_kernels_merge_to_full_attention(kernel, dtype, tol):
    """Two K/V blocks through a fused kernel, merged by LSE, equal full attention in both
    directions, including (with a mask) a batch row whose second block is all padding and one
    with no valid key at all (output and grads 0, nothing NaN). CUDA kernels run where a GPU is."""
    B, H, S, D = 3, 2, 6, 8
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(B, H, S if i in (0, 3) else 2 * S, D, generator=g, dtype=torch.float64)
                   for i in range(4))
    mask = torch.ones(B, 2 * S, dtype=torch.bool)
    if kernel != "cuda_flash":  # flash takes no mask
        mask[0, S - 2:] = False  # block 2 of row 0 fully masked
        mask[1, :] = False       # row 1 attends to nothing
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    s = (ref[0] @ ref[1].transpose(-1, -2) * D ** -0.5).masked_fill(~mask[:, None, None], -math.inf)
    out_ref = s.softmax(-1).nan_to_num(0.0) @ ref[2]
    out_ref.backward(do)

    dev = "cpu" if kernel.startswith("cpu") else "cuda"
    qq, kk, vv, dd = (t.to(dev, dtype) for t in (q, k, v, do))
    m_dev = None if mask.all() else mask.to(dev)
    halves = [(kk[:, :, i * S:(i + 1) * S].contiguous(), vv[:, :, i * S:(i + 1) * S].contiguous(),
               None if m_dev is None else m_dev[:, i * S:(i + 1) * S]) for i in range(2)]
    (o1, l1), (o2, l2) = (block_attention(qq, kb, vb, mb, D ** -0.5, kernel) for kb, vb, mb in halves)
    assert o1.dtype == dtype and l1.dtype == torch.float32 and l1.shape == (B, H, S, 1)
    if m_dev is not None:
        assert torch.isinf(l2[0]).all() and (o2[0] == 0).all()
    lse = torch.logaddexp(l1, l2)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    out = o1.float() * torch.exp(l1 - safe) + o2.float() * torch.exp(l2 - safe)
    scale = out_ref.abs().max().item()
    assert (out.double().cpu() - out_ref).abs().max().item() / scale < tol
    grads = [block_attention_backward(dd, qq, kb, vb, out.to(dtype), safe, mb, D ** -0.5, kernel)
             for kb, vb, mb in halves]
    dq = grads[0][0].double().cpu() + grads[1][0].double().cpu()
    dk = torch.cat([grads[0][1], grads[1][1]], 2).double().cpu()
    dv = torch.cat([grads[0][2], grads[1][2]], 2).double().cpu()
    for got, r in ((dq, ref[0].grad), (dk, ref[1].grad), (dv, ref[2].grad)):
        assert torch.isfinite(got).all()
        assert (got - r).abs().max().item() / r.abs().max().item() < tol
    if m_dev is not None:
        assert (dq[1] == 0).all()


@pytest.mark.parametrize("kernel,dtype,masked", [
    ("cuda_flash", torch.bfloat16, False),
    ("cuda_efficient", torch.bfloat16, True),
    ("cuda_efficient", torch.float32, False),
    ("cuda_efficient", torch.float32, True),
])
def test_cuda_block_kernels_call_conventions_on_meta(kernel, dtype, masked):
    """The CUDA aten ops' argument lists and output shapes (LSE padding of the efficient kernel
    included), checked through their meta implementations; the numerics are checked on a GPU
    machine by test_block_kernels_merge_to_full_attention."""
    B, H, S, D = 2, 4, 100, 64
    q, k, v = (torch.randn(B, H, S, D, device="meta", dtype=dtype) for _ in range(3))
    mask = torch.ones(B, S, dtype=torch.bool, device="meta") if masked else None
    out, lse = block_attention(q, k, v, mask, 0.125, kernel)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (B, H, S, 1) and lse.dtype == torch.float32
    dq, dk, dv = block_attention_backward(out, q, k, v, out, lse, mask, 0.125, kernel)
    assert dq.shape == dk.shape == dv.shape == q.shape and dq.dtype == dtype


def test_ring_kernel_choice_errors():
    q = torch.zeros(1, 1, 2, 8)
    assert resolve_block_kernel("auto", q, True) == "cpu_flash"
    assert resolve_block_kernel("math", q, False) == "math"
    with pytest.raises(ValueError, match="ring_kernel='flash'"):
        resolve_block_kernel("flash", q, False)
    with pytest.raises(ValueError, match="no fused attention kernel"):
        resolve_block_kernel("fused", torch.zeros(1, 1, 2, 8, device="meta"), False)
