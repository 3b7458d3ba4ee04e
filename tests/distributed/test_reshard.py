"""A checkpoint saved under one parallel layout loads bit-exactly under another.

Layout A trains one step (so AdamW has state) and saves with sora_dist.training.checkpoint;
layout B builds a differently seeded model, loads A, saves again; layout C loads B. The full
(unsharded) model and optimizer tensors must be identical in A, B and C.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sora_dist.parallel.dims import ParallelDims
from sora_dist.testing import run_distributed

from sora_dist.models import VideoDiT
from test_parallel_equivalence import B_LOCAL, global_batch, make_cfg, tiny_args

pytestmark = pytest.mark.distributed


def _full_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {f"model.{k}": v for k, v in get_model_state_dict(model, options=opts).items()}
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    for fqn, st in osd.get("state", {}).items():  # only rank 0 holds full tensors
        for k, v in st.items():
            out[f"optim.{fqn}.{k}"] = torch.as_tensor(v)
    return out


def reshard_worker(rank: int, world: int, layout: dict, seed: int, load_from, save_root) -> dict:
    from sora_dist.parallel.parallelize import parallelize_dit
    from sora_dist.parallel.grad import clip_grad_norm_
    from sora_dist.training import checkpoint as ckpt
    from sora_dist.training.optim import build_optimizer

    args = tiny_args()
    cfg = make_cfg(**layout)
    pdims = ParallelDims.from_config(cfg.parallel, world)
    pdims.build_mesh("cpu")
    part = parallelize_dit(_seeded_model(args, seed), pdims, cfg)
    model = part.module
    optimizer = build_optimizer(model, cfg.optim)
    if load_from is None:
        dp_rank = pdims.coords(rank)["dp"]
        batch = [v[dp_rank * B_LOCAL:(dp_rank + 1) * B_LOCAL] for v in global_batch(pdims.dp, args)]
        F.mse_loss(model(*batch[:5]), batch[5]).backward()
        part.finalize_grads()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    else:
        ckpt.load(load_from, model, optimizer)
    saved = ckpt.save(save_root, 1, model, optimizer) if save_root is not None else None
    return {"state": _full_state(model, optimizer), "path": saved}


def _seeded_model(args, seed: int) -> VideoDiT:
    torch.manual_seed(seed)
    model = VideoDiT(args)
    model.init_weights(zero_init=False)
    return model


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {set(a) ^ set(b)}"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: not bit-exact: {bad[:5]}"


# (layout A, world A) -> (layout B, world B) -> (layout C, world C)
CHAINS = {
    "tp2sp-dp2fsdp-single": [(2, dict(tp=2, sequence_parallel=True)), (2, dict(fsdp=True)), (1, dict())],
    "tp2dp2-dp4-tp4": [(4, dict(tp=2, sequence_parallel=True)), (4, dict(fsdp=True)),
                       (4, dict(tp=4, sequence_parallel=False))],
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_checkpoint_reshards_bit_exact(name, tmp_path):
    (wa, la), (wb, lb), (wc, lc) = CHAINS[name]
    ra = run_distributed(reshard_worker, wa, la, 0, None, str(tmp_path / "a"))
    rb = run_distributed(reshard_worker, wb, lb, 1, ra["path"], str(tmp_path / "b"))
    rc = run_distributed(reshard_worker, wc, lc, 2, rb["path"], None)
    assert any(k.startswith("optim.") for k in ra["state"]), "optimizer state missing"
    _assert_same(ra["state"], rb["state"], f"{name}: A -> B")
    _assert_same(ra["state"], rc["state"], f"{name}: A -> B -> C")
    assert os.path.exists(os.path.join(ra["path"], "COMPLETE"))
