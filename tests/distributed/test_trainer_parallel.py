"""The real trainer under parallel layouts vs one process: same loss sequence and the same
final parameters; a checkpoint saved under one layout resumes under another and continues the
same sequence to the same parameters.

The equivalence runs use model.zero_init=False (adaLN gates and final layer random, so the
loss depends on self-attention and the MLP from step 0) and optim.lr=1e-3 (weights move by
~1e-3 per step), so a wrong ring / TP / pipeline wiring changes both losses and parameters.
Tolerances (fp32 on CPU): losses rel 1e-5; every parameter ||got - ref|| <= 1e-3 * ||ref - init||
(Frobenius, relative to how far 4 steps moved it; measured <= 1.1e-4 for a correct layout. A
ring skipping one K/V block gives 0.9, one TP/PP rank's MLP output scaled by 1.01 gives
0.04-0.11, a resume without the optimizer state 0.12-0.16: the latter two leave losses within
or just above 1e-5, the parameters catch them by 40-900x)."""
import math

import pytest
import torch

from sora_dist.config import JobConfig
from sora_dist.config.model import DiTArgs
from sora_dist.testing import run_distributed
from sora_dist.training.optim import named_params
from sora_dist.training.trainer import Trainer

from init_rule import init_violations, reference_init

STEPS = 4
PARAM_REL = 1e-3


def make_cfg(run_dir, **parallel):
    cfg = JobConfig()
    cfg.train.run_dir = str(run_dir)
    cfg.train.steps = STEPS
    cfg.train.ckpt_every = 2
    cfg.logging.wandb_mode = "disabled"
    cfg.data.synthetic_buckets = [[3, 7, 9], [2, 6, 10]]  # odd shapes: padding in every layout
    cfg.model.zero_init = False  # every weight matters from step 0
    cfg.optim.lr = 1e-3
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def full_params(model) -> dict:
    """Whole fp32 tensors of every parameter, FQNs without wrapper prefixes. Collective under
    a process group: DTensors are gathered and the per-rank dicts (a PP rank holds only its
    stages) merged; where ranks hold copies, the first is kept and "_replica_err" records the
    largest difference between copies."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in named_params(model).items():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[n] = t.detach().float().cpu().clone()
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return out
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, out)
    merged, err = {}, 0.0
    for part in parts:
        for n, t in part.items():
            if n in merged:
                err = max(err, float((merged[n] - t).abs().max()))
            else:
                merged[n] = t
    merged["_replica_err"] = torch.tensor(err)
    return merged


def params_close(got: dict, ref: dict, init: dict, rel=PARAM_REL):
    """Per parameter: ||got - ref|| <= rel * ||ref - init|| (Frobenius; relative to how far
    training moved it, since Adam turns rounding-level gradient differences of elements with
    near-zero gradients into update differences far above fp32 rounding of the weights)."""
    got = dict(got)
    assert float(got.pop("_replica_err", 0.0)) <= 1e-6, "ranks disagree on a replicated parameter"
    assert got.keys() == ref.keys() == init.keys(), sorted(set(got) ^ set(ref))
    bad = {}
    for n, r in ref.items():
        err = float((got[n] - r).norm())
        moved = float((r - init[n]).norm())
        if not err <= rel * moved + 1e-9:
            bad[n] = (err, moved)
    assert not bad, bad


def train(cfg, stop_at=None, params=False):
    """Losses of the run; with params=True (losses, final params), and with params="init"
    (losses, final params, initial params)."""
    tr = Trainer(cfg)
    try:
        init = full_params(tr.model) if params == "init" else None
        losses = tr.train(stop_at=stop_at)
        if not params:
            return losses
        return (losses, full_params(tr.model)) + ((init,) if init is not None else ())
    finally:
        tr.close()


def _worker(rank, world, run_dir, parallel, stop_at, params=False, ckpt_every=2):
    cfg = make_cfg(run_dir, **parallel)
    cfg.train.ckpt_every = ckpt_every
    return train(cfg, stop_at, params)


def close(a, b, rel=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


@pytest.mark.parametrize("world, parallel", [
    (2, {"tp": 2, "sequence_parallel": True}),
    (2, {"cp": 2, "cp_mode": "ring"}),
])
def test_trainer_layout_matches_single_process(tmp_path, world, parallel):
    ref, ref_params, init = train(make_cfg(tmp_path / "ref"), params="init")
    got, got_params = run_distributed(_worker, world, str(tmp_path / "par"), parallel, None, True)
    close(got, ref)
    params_close(got_params, ref_params, init)


def test_checkpoint_from_tp2_resumes_in_one_process(tmp_path):
    ref, ref_params, init = train(make_cfg(tmp_path / "ref"), params="init")
    # ckpt_every=3: the TP2 run saves at its stop step 3, the one-process run resumes there.
    first = run_distributed(_worker, 2, str(tmp_path / "run"), {"tp": 2}, 3, False, 3)
    cfg = make_cfg(tmp_path / "run")
    cfg.train.ckpt_every = 3
    second, params = train(cfg, params=True)                                    # resumes, tp=1
    assert len(first) == 3 and len(second) == 1
    close(first + second, ref)
    params_close(params, ref_params, init)


def test_dp2_checkpoint_resumes_in_one_process_with_the_data_stream_carried_over(tmp_path):
    """A DP size change continues the data stream instead of restarting it: the synthetic
    stream exactly at the next global sample (the shard loader at shard granularity, see
    tests/unit/test_loader.py)."""
    run_distributed(_worker, 2, str(tmp_path / "run"), {"dp": 2}, 2)  # saves step 2
    cfg = make_cfg(tmp_path / "run")
    tr = Trainer(cfg)  # resumes with dp=1
    try:
        assert tr.step == 2
        ids = next(tr.loader)["ids"]
    finally:
        tr.close()
    B = cfg.data.batch_size
    assert ids == list(range(2 * B * 2, 2 * B * 2 + B))


@pytest.mark.parametrize("parallel", [
    {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2},
    {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_microbatches": 2, "pp_virtual_stages": 2},
])
def test_trainer_pipeline_matches_single_process(tmp_path, parallel):
    def cfg_depth(run_dir, **par):
        c = make_cfg(run_dir, **par)
        c.model.depth = 4
        return c
    ref, ref_params, init = train(cfg_depth(tmp_path / "ref"), params="init")
    got, got_params = run_distributed(_pp_worker, 2, str(tmp_path / "pp"), parallel)
    close(got, ref)
    params_close(got_params, ref_params, init)  # every stage's parameters, merged over PP ranks


def _pp_worker(rank, world, run_dir, parallel):
    cfg = make_cfg(run_dir, **parallel)
    cfg.model.depth = 4
    return train(cfg, params=True)


def wan_cfg(run_dir, **parallel):
    """A tiny WanDiT trained the Wan way: flow matching with a timestep shift."""
    c = make_cfg(run_dir, **parallel)
    c.model.arch, c.model.depth, c.model.ffn_dim = "wan", 4, 48
    c.diffusion.objective, c.diffusion.sampler, c.diffusion.shift = "flow", "euler", 3.0
    return c


def _wan_worker(rank, world, run_dir, parallel):
    return train(wan_cfg(run_dir, **parallel), params=True)


@pytest.mark.parametrize("world, parallel", [
    (2, {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2}),
    (4, {"tp": 2, "sequence_parallel": True, "cp": 2, "cp_mode": "ring"}),
], ids=["pp2_1f1b", "tp2_sp_cp2_ring"])
def test_trainer_wan_matches_single_process(tmp_path, world, parallel):
    ref, ref_params, init = train(wan_cfg(tmp_path / "ref"), params="init")
    got, got_params = run_distributed(_wan_worker, world, str(tmp_path / "par"), parallel)
    close(got, ref)
    params_close(got_params, ref_params, init)


def _pp_stop_worker(rank, world, run_dir, parallel, stop_at):
    cfg = make_cfg(run_dir, **parallel)
    cfg.model.depth = 4
    cfg.train.ckpt_every = 3  # a checkpoint at the stop step
    return train(cfg, stop_at)


def test_pp2_checkpoint_resumes_in_pp1(tmp_path):
    def cfg4(run_dir):
        c = make_cfg(run_dir)
        c.model.depth = 4
        c.train.ckpt_every = 3
        return c
    ref, ref_params, init = train(cfg4(tmp_path / "ref"), params="init")
    first = run_distributed(_pp_stop_worker, 2, str(tmp_path / "run"),
                            {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2}, 3)
    second, params = train(cfg4(tmp_path / "run"), params=True)  # one process holds every stage's FQNs
    assert len(first) == 3 and len(second) == 1
    close(first + second, ref)
    params_close(params, ref_params, init)


COLUMN_PARALLEL = (".wq.weight", ".wk.weight", ".wv.weight", ".fc1.weight")


def _init_report(tr) -> dict:
    """Right after the trainer's meta init: every parameter whole (merged over ranks), and
    whether the TP ranks' local shards of each column-parallel weight all differ."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    shards = {n: p.to_local().detach().clone() for n, p in tr.model.named_parameters()
              if isinstance(p, DTensor) and n.endswith(COLUMN_PARALLEL)}
    tp_group = tr.pdims.meshes["tp"].get_group() if tr.pdims.tp > 1 else None
    differ, checked = True, 0
    if tp_group is not None:
        peers = [None] * dist.get_world_size(tp_group)
        dist.all_gather_object(peers, shards, group=tp_group)
        for n in shards:
            for i in range(len(peers)):
                for j in range(i + 1, len(peers)):
                    checked += 1
                    differ &= not torch.equal(peers[i][n], peers[j][n])
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, (differ, checked))
    return {"init": full_params(tr.model), "tp_shards_differ": all(f[0] for f in flags),
            "tp_shards_checked": sum(f[1] for f in flags),
            "on_meta": any(p.is_meta for p in tr.model.parameters())}


def _meta_worker(rank, world, run_dir, parallel):
    import torch.distributed as dist

    cfg = make_cfg(run_dir, **parallel)  # zero_init=False: adaLN and final layer random too
    cfg.train.meta_init = True
    tr = Trainer(cfg)
    report = _init_report(tr)
    losses = tr.train()
    tr.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, losses)
    return {"losses": losses, "same_on_all_ranks": all(g == losses for g in gathered), **report}


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"dp": 2}], ids=["tp2", "dp2_fsdp"])
def test_meta_init_trains_without_a_full_model_copy(tmp_path, parallel):
    """Meta init (TP2; DP2 with FSDP: every parameter a Shard(0) DTensor): each rank
    initialises only its shards, yet every weight is the whole-tensor init from the seed
    (exactly what init_weights gives a plain model), so the TP shards of a column-parallel
    weight differ (no repeated draw) and the init does not depend on the layout."""
    out = run_distributed(_meta_worker, 2, str(tmp_path / "meta"), parallel)
    assert not out["on_meta"] and out["same_on_all_ranks"]
    assert all(x == x and x < 10 for x in out["losses"])  # finite
    if "tp" in parallel:
        # 2 blocks x (attn wq/wk/wv, cross_attn wq/wk/wv, fc1) on both ranks
        assert out["tp_shards_checked"] == 2 * 2 * 7 and out["tp_shards_differ"]
    init = dict(out["init"])
    assert float(init.pop("_replica_err")) == 0
    cfg = make_cfg(tmp_path / "unused")
    assert not init_violations(init, DiTArgs.from_config(cfg.model))
    ref = reference_init(cfg.model, cfg.train.seed)
    assert init.keys() == ref.keys()
    assert all(torch.equal(init[n], ref[n]) for n in ref), [n for n in ref if not torch.equal(init[n], ref[n])]


def test_meta_init_in_one_process_takes_the_same_path(tmp_path):
    """One build path for every world size: train.meta_init in one process is materialised by
    parallelize like any layout, to the same weights as the 2-rank layouts above (exactly what
    init_weights gives from the seed), and trains."""
    cfg = make_cfg(tmp_path / "meta1")
    cfg.train.meta_init = True
    tr = Trainer(cfg)
    try:
        init = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        assert not init_violations(init, DiTArgs.from_config(cfg.model))
        ref = reference_init(cfg.model, cfg.train.seed)
        assert init.keys() == ref.keys()
        assert all(torch.equal(init[n], ref[n]) for n in ref)
        losses = tr.train()
    finally:
        tr.close()
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)


def _meta_pp_worker(rank, world, run_dir, parallel, fp8, zero_init):
    cfg = make_cfg(run_dir, **parallel)
    cfg.model.depth = 4
    cfg.model.fp8_linears = fp8
    cfg.model.zero_init = zero_init
    cfg.train.meta_init = True
    tr = Trainer(cfg)
    report = _init_report(tr)
    final_zero = all(float(p.abs().sum()) == 0 for n, p in tr.model.named_parameters()
                     if n.startswith("final_layer."))
    losses = tr.train()
    tr.close()
    return {"losses": losses, "final_zero": final_zero, **report}


@pytest.mark.parametrize("parallel, fp8, zero_init", [
    ({"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2}, "none", True),
    ({"pp": 2, "pp_schedule": "zbv", "pp_microbatches": 2, "tp": 2}, "torchao", True),
    ({"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2}, "none", False),
])
def test_meta_init_with_pipeline_stages(tmp_path, parallel, fp8, zero_init):
    """Each PP rank allocates and initialises only its stages (torchao FP8 linears converted
    on the meta device), each stage from its own seed: per-parameter init statistics hold on
    every stage, stages do not repeat one another's weights, TP shards differ, and each stage
    is exactly the reference init of that stage. With adaLN-Zero the first output is exactly
    zero whatever the other weights, so step 0's loss equals the eager run's."""
    from sora_dist.parallel.pipeline import split_blocks

    def cfg4(run_dir):
        c = make_cfg(run_dir)
        c.model.depth = 4
        c.model.zero_init = zero_init
        return c
    world = 2 * parallel.get("tp", 1)
    out = run_distributed(_meta_pp_worker, world, str(tmp_path / "meta"), parallel, fp8, zero_init)
    assert not out["on_meta"]
    assert all(x == x and x < 10 for x in out["losses"])  # finite
    init = dict(out["init"])
    assert float(init.pop("_replica_err")) == 0
    ref_cfg = cfg4(tmp_path / "unused")
    assert not init_violations(init, DiTArgs.from_config(ref_cfg.model))
    final = [init[n] for n in init if n.startswith("final_layer.") and n.endswith(".weight")]
    assert len(final) == 2 and all((torch.count_nonzero(w) == 0) == zero_init for w in final)
    # Stages draw from their own seeds: the first blocks of any two stages (which would take
    # the same draws from one seed) differ.
    n_stages = 4 if parallel["pp_schedule"] == "zbv" else 2
    firsts = [r[0] for r in split_blocks(4, n_stages)]
    for name in ("attn.wq.weight", "mlp.fc1.weight", "adaLN_modulation.1.weight"):
        if not zero_init or "adaLN" not in name:
            for i, a in enumerate(firsts):
                for b in firsts[i + 1:]:
                    same = torch.equal(init[f"blocks.{a}.{name}"], init[f"blocks.{b}.{name}"])
                    assert not same, (name, a, b)
    if parallel.get("tp", 1) > 1:
        assert out["tp_shards_checked"] > 0 and out["tp_shards_differ"]
    ref_init = reference_init(ref_cfg.model, ref_cfg.train.seed, n_stages)
    assert init.keys() == ref_init.keys()
    assert all(torch.equal(init[n], ref_init[n]) for n in ref_init), \
        [n for n in ref_init if not torch.equal(init[n], ref_init[n])]
    if zero_init:
        assert out["final_zero"]
        ref = train(cfg4(tmp_path / "ref"))
        close(out["losses"][:1], ref[:1])


def _wan_meta_worker(rank, world, run_dir, parallel):
    cfg = wan_cfg(run_dir, **parallel)
    cfg.model.fp8_linears = "torchao"
    cfg.train.meta_init = True
    tr = Trainer(cfg)
    report = _init_report(tr)
    losses = tr.train()
    tr.close()
    return {"losses": losses, **report}


def test_wan_meta_init_with_tp_pp_and_fp8(tmp_path):
    """WanDiT through meta init + TP2 (its across-heads q/k norms sharded) + PP2 + torchao FP8
    linears: each stage is exactly the plain model's init of that stage, TP shards differ,
    the Wan tables are random (N(0, 1/D)), and it trains."""
    parallel = {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2, "tp": 2}
    out = run_distributed(_wan_meta_worker, 4, str(tmp_path / "meta"), parallel)
    assert not out["on_meta"] and all(math.isfinite(x) for x in out["losses"])
    assert out["tp_shards_checked"] > 0 and out["tp_shards_differ"]
    init = dict(out["init"])
    assert float(init.pop("_replica_err")) == 0
    ref_cfg = wan_cfg(tmp_path / "unused")
    ref = reference_init(ref_cfg.model, ref_cfg.train.seed, 2)
    assert init.keys() == ref.keys() and "blocks.0.attn.q_norm.weight" in ref
    assert all(torch.equal(init[n], ref[n]) for n in ref), [n for n in ref if not torch.equal(init[n], ref[n])]
    table = init["blocks.3.modulation.scale_shift_table"]
    assert abs(float(table.std()) - 64 ** -0.5) < 0.03


# ---- packing: mixed sizes, one token-budget pack per DP rank (data.packing) -------------------

PACK_BUCKETS = [[1, 8, 8], [3, 4, 6], [2, 6, 4], [5, 2, 2], [1, 4, 10], [3, 2, 6]]


def pack_cfg(run_dir, **parallel):
    c = make_cfg(run_dir, **parallel)
    c.data.packing, c.data.tokens_per_rank, c.data.pack_window = True, 90, 8
    c.data.synthetic_buckets = PACK_BUCKETS
    c.diffusion.caption_dropout = 0.3
    return c


def _pack_worker(rank, world, run_dir, parallel, stop_at=None, params=True):
    return train(pack_cfg(run_dir, **parallel), stop_at, params)


def test_trainer_packing_resumes_exactly(tmp_path):
    """Resume mid-epoch with packing: the same packs, the same loss sequence, the same weights."""
    ref, ref_params, init = train(pack_cfg(tmp_path / "ref"), params="init")
    first = train(pack_cfg(tmp_path / "run"), stop_at=2)
    second, params = train(pack_cfg(tmp_path / "run"), params=True)
    assert len(first) == 2 and len(second) == STEPS - 2
    assert first + second == ref  # bit for bit
    params_close(params, ref_params, init, rel=1e-6)


@pytest.mark.parametrize("world, parallel", [
    (4, {"tp": 2, "sequence_parallel": True, "cp": 2, "cp_mode": "ring"}),
    (2, {"cp": 2, "cp_mode": "ulysses"}),
], ids=["tp2_sp_cp2_ring", "cp2_ulysses"])
def test_trainer_packing_layout_matches_single_process(tmp_path, world, parallel):
    ref, ref_params, init = train(pack_cfg(tmp_path / "ref"), params="init")
    got, got_params = run_distributed(_pack_worker, world, str(tmp_path / "par"), parallel)
    close(got, ref)
    params_close(got_params, ref_params, init)


def _pack_balance_worker(rank, world, run_dir, stop_at, steps):
    cfg = pack_cfg(run_dir, dp=2)
    cfg.train.steps, cfg.train.ckpt_every, cfg.data.tokens_per_rank = steps, 3, 120
    tr = Trainer(cfg)
    try:
        assert tr.loader.balance is not None and "pack_balance=flops" in tr.loader.layout_note
        return tr.train(stop_at=stop_at), tr.loader.state_dict()["window"]
    finally:
        tr.close()


def _pack_balance_keys_worker(rank, world, run_dir):
    cfg = pack_cfg(run_dir, dp=2)
    cfg.data.tokens_per_rank = 120
    tr = Trainer(cfg)
    try:
        first = next(tr.loader)
        logged = tr.train_step(first)  # its tokens: both ranks' (their packs differ in size)
        return [first["keys"]] + [next(tr.loader)["keys"] for _ in range(5)], logged["tokens"], first["tokens"]
    finally:
        tr.close()


def test_trainer_dp2_packs_are_the_balanced_packs_of_both_ranks(tmp_path):
    """The trainer's exchange really gathers both DP ranks: each rank's packs equal the balanced
    packs computed in one process from both ranks' streams (and differ from token-only packs)."""
    from sora_dist.config.model import DiTArgs
    from sora_dist.data.packing import pack_ranks, sample_flops
    from sora_dist.data.synthetic import SyntheticLatents
    got = run_distributed(_pack_balance_keys_worker, 2, str(tmp_path / "keys"), all_ranks=True)
    cfg = pack_cfg(tmp_path / "ref", dp=2)
    cfg.data.tokens_per_rank = 120

    def packs(cost):
        lds = [SyntheticLatents(cfg.data, cfg.model.in_channels, cfg.model.text_dim, r, 2) for r in range(2)]
        steps = [pack_ranks([ld.packer for ld in lds], [ld._pull for ld in lds], cost) for _ in range(6)]
        return [[[it["key"] for it in st[r]] for st in steps] for r in range(2)]
    want = packs(sample_flops(DiTArgs.from_config(cfg.model), cfg.data.text_len))
    assert [keys for keys, _, _ in got] == want and want != packs(None)
    assert got[0][1] == got[1][1] == got[0][2] + got[1][2] and got[0][2] != got[1][2]


def test_trainer_dp2_flops_balanced_packs_resume_exactly(tmp_path):
    """DP2 with data.pack_balance=flops (the default): the ranks agree on each step's cost through
    the gloo all-gather; a run stopped at step 3 and resumed continues the same loss sequence
    and ends with the same packer windows as the uninterrupted run."""
    ref = run_distributed(_pack_balance_worker, 2, str(tmp_path / "ref"), None, 6, all_ranks=True)
    first = run_distributed(_pack_balance_worker, 2, str(tmp_path / "run"), 3, 6, all_ranks=True)
    second = run_distributed(_pack_balance_worker, 2, str(tmp_path / "run"), None, 6, all_ranks=True)
    assert len(ref[0][0]) == 6 and first[0][0] + second[0][0] == ref[0][0]  # bit for bit
    assert [w for _, w in second] == [w for _, w in ref]


def test_trainer_packing_dp2_to_one_process_carries_the_stream_over(tmp_path):
    """DP2 with packing (each rank fills its own budget) saves at step 2; one process resumes it
    (the carry-over rule itself, nothing lost or repeated, is tests/unit/test_packing.py's)."""
    run_distributed(_pack_worker, 2, str(tmp_path / "run"), {"dp": 2}, 2, False)
    tr = Trainer(pack_cfg(tmp_path / "run"))
    try:
        assert tr.step == 2
        batch = next(tr.loader)
        assert batch["packed"] and 0 < batch["tokens"] <= 90
        losses = tr.train()
    finally:
        tr.close()
    assert len(losses) == STEPS - 2 and all(math.isfinite(x) for x in losses)


def pack_pp_cfg(run_dir, arch, **parallel):
    c = pack_cfg(run_dir, **parallel)
    c.model.depth = 4
    if arch == "wan":
        c.model.arch, c.model.ffn_dim = "wan", 48
        c.diffusion.objective, c.diffusion.sampler, c.diffusion.shift = "flow", "euler", 3.0
    return c


def _pack_pp_worker(rank, world, run_dir, parallel, arch):
    return train(pack_pp_cfg(run_dir, arch, **parallel), params=True)


@pytest.mark.parametrize("arch, world, parallel", [
    ("dit", 2, {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 2}),
    ("dit", 4, {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2, "pp_microbatches": 3,
                "tp": 2, "sequence_parallel": True}),
    pytest.param("wan", 2, {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 2}, marks=pytest.mark.slow),
], ids=["pp2_1f1b", "pp2_interleaved_3mb_tp2_sp", "wan_pp2_gpipe"])
def test_trainer_packing_pipeline_matches_single_process(tmp_path, arch, world, parallel):
    """Each step's pack dealt to the pipeline microbatches (padded to one shape per step; with 3
    microbatches step 3's differs, a second schedule): the same loss sequence and final
    parameters as one process."""
    ref, ref_params, init = train(pack_pp_cfg(tmp_path / "ref", arch), params="init")
    got, got_params = run_distributed(_pack_pp_worker, world, str(tmp_path / "pp"), parallel, arch)
    close(got, ref)
    params_close(got_params, ref_params, init)
