"""The model's output owns its storage, so FSDP2's pre-backward hook on it survives an in-place op.

FSDP2 registers its root pre-backward hook on the tensors the wrapped model returns. On a view,
an in-place op rebases the autograd graph past that hook and FSDP silently skips its
pre-backward (and warns "returned a view tensor" at every forward). unpatchify's crop used to
return such a view; these checks pin that it no longer does, under DP (FSDP) and CP.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from sora_dist.parallel.dims import ParallelDims
from sora_dist.testing import run_distributed
from sora_dist.training.optim import clean_fqn

from test_parallel_equivalence import build_model, full_grad, global_batch, make_cfg, tiny_args

pytestmark = pytest.mark.distributed


def test_single_process_output_is_not_a_view():
    """One process takes no FSDP, but a caller may still modify the output in place; the
    padded-latent crop (5x9 latents with 2x2 patches) and the uncropped case both own storage."""
    args = tiny_args()
    model = build_model(args)
    for shape in [(3, 5, 9), (3, 6, 10)]:
        x, t, text, mask, drop, _ = global_batch(1, args)
        x = torch.randn(x.shape[0], x.shape[1], *shape)
        out = model(x, t, text, mask, drop)
        is_view = out._base is not None
        assert not is_view and out.shape == x.shape, (shape, out.shape, is_view)


def inplace_worker(rank: int, world: int, layout: dict) -> dict:
    """Forward/backward twice on identical FSDP-wrapped models, the second with an in-place op on
    the output before the loss; record FSDP's view warnings and compare every gradient."""
    from sora_dist.parallel.parallelize import parallelize_dit

    args = tiny_args()
    cfg = make_cfg(**layout)
    pdims = ParallelDims.from_config(cfg.parallel, world)
    pdims.build_mesh("cpu")
    x, t, text, mask, drop, target = global_batch(1, args)
    grads, fsdp = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for inplace in (False, True):
            part = parallelize_dit(build_model(args), pdims, cfg)
            fsdp.append(part.fsdp)
            out = part.module(x, t, text, mask, drop)
            if inplace:
                out.mul_(1.0)  # exact: the gradient is unchanged if autograd still sees it all
            F.mse_loss(out, target).backward()
            part.finalize_grads()
            grads.append({clean_fqn(n): None if p.grad is None else full_grad(p).detach().clone()
                          for n, p in part.module.named_parameters()})
    view_warnings = [str(w.message) for w in caught if "view tensor" in str(w.message)]
    differ = sorted(n for n, g in grads[0].items()
                    if g is None or grads[1][n] is None or not torch.equal(g, grads[1][n]))
    return {"fsdp": all(fsdp), "view_warnings": view_warnings, "differ": differ,
            "nonzero": sum(int(g is not None and g.abs().sum() > 0) for g in grads[0].values()),
            "params": len(grads[0])}


@pytest.mark.parametrize("layout", [dict(fsdp=True), dict(cp=2, cp_mode="ulysses", fsdp=True)],
                         ids=["dp2_fsdp", "cp2_fsdp"])
def test_inplace_on_output_keeps_fsdp_gradients(layout):
    for rank, r in enumerate(run_distributed(inplace_worker, 2, layout, all_ranks=True)):
        assert r["fsdp"], (rank, "layout did not take the FSDP path")
        assert not r["view_warnings"], (rank, r["view_warnings"])
        assert r["nonzero"] == r["params"], (rank, "some reference grads are zero or missing")
        assert not r["differ"], (rank, "an in-place op on the output changed these grads", r["differ"])
