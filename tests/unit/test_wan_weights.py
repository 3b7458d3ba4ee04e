"""model.init_from: a diffusers WanTransformer3DModel folder (single file or sharded) loads into
WanDiT, one process and sharded (TP/SP + meta init, FSDP, PP: each rank reads only its slices);
every broken folder is one config error naming the file and key/field, before run_dir exists."""
import json
import os
import shutil

import pytest
import torch

from sora_dist.config import ConfigError, JobConfig, validate
from sora_dist.config.model import DiTArgs
from sora_dist.models.wan import WanDiT
from sora_dist.models.wan_weights import (
    WeightsError, check_init_from, diffusers_config, from_diffusers_state_dict, load_diffusers_weights,
    to_diffusers_key,
)
from sora_dist.testing import run_distributed

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import load_file  # noqa: E402

# Odd sizes on purpose: 3 latent channels and a (1, 6, D) table give uneven and empty FSDP shards.
ARGS = DiTArgs(arch="wan", hidden_size=48, num_heads=4, depth=4, ffn_dim=72, in_channels=3, text_dim=24)


def save_reference(folder, a=ARGS, seed=0, max_shard_size=None):
    """A random diffusers WanTransformer3DModel saved with save_pretrained (no downloads)."""
    cfg = {k: v for k, v in diffusers_config(a).items() if not k.startswith("_")}
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    ref.save_pretrained(str(folder), safe_serialization=True, **kw)
    return ref


def wan_cfg(run_dir, init_from, a=ARGS):
    cfg = JobConfig()
    cfg.model.flavor = "tiny"
    cfg.model.arch = "wan"
    for k in ("hidden_size", "num_heads", "depth", "ffn_dim", "in_channels", "text_dim"):
        setattr(cfg.model, k, getattr(a, k))
    cfg.model.init_from = str(init_from) if init_from else None
    cfg.diffusion.objective, cfg.diffusion.sampler = "flow", "euler"
    cfg.train.run_dir = str(run_dir)
    cfg.train.device = "cpu"
    cfg.train.steps = 1
    cfg.train.ema_decay = 0.0
    cfg.logging.wandb_mode = "disabled"
    cfg.data.text_len = 5
    cfg.data.synthetic_buckets = [[2, 4, 4]]
    return cfg


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    ref = save_reference(root / "single")
    save_reference(root / "sharded", max_shard_size="20KB")
    return root, ref


def test_sharded_save_has_an_index(folders):
    root, _ = folders
    assert os.path.isfile(root / "sharded" / "diffusion_pytorch_model.safetensors.index.json")
    assert len([n for n in os.listdir(root / "sharded") if n.endswith(".safetensors")]) > 2
    assert os.path.isfile(root / "single" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("kind", ["single", "sharded", "model_names"])
def test_loaded_forward_equals_diffusers(folders, tmp_path, kind):
    root, ref = folders
    folder = root / ("sharded" if kind == "sharded" else "single")
    if kind == "model_names":  # the plain naming scheme: model.safetensors
        folder = tmp_path / "plain"
        folder.mkdir()
        shutil.copy(root / "single" / "config.json", folder / "config.json")
        shutil.copy(root / "single" / "diffusion_pytorch_model.safetensors", folder / "model.safetensors")
    check_init_from(str(folder), ARGS)
    torch.manual_seed(123)
    ours = WanDiT(ARGS).eval()
    stats = load_diffusers_weights(ours, str(folder))
    assert stats["tensors"] == len(list(ours.parameters()))
    assert stats["bytes_read"] == stats["bytes_total"] == 4 * sum(p.numel() for p in ours.parameters())
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 3, 6, 4, generator=g), torch.rand(2, generator=g) * 1000
    text, mask = torch.randn(2, 5, ARGS.text_dim, generator=g), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        want = ref(x, t, text, return_dict=False)[0]
        got = ours(x, t, text, mask)
        fresh = WanDiT(ARGS).eval()(x, t, text, mask)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert ((fresh - want).norm() / want.norm()).item() > 1e-2  # without the load it differs


def test_trainer_loads_init_from(folders, tmp_path):
    from sora_dist.training.trainer import Trainer
    root, ref = folders
    tr = Trainer(wan_cfg(tmp_path / "run", root / "sharded"))
    try:
        got = {to_diffusers_key(n): p for n, p in tr.model.named_parameters()}
        want = ref.state_dict()
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(got[k].detach(), v), k
    finally:
        tr.close()


def test_resume_does_not_reload_init_from(folders, tmp_path, monkeypatch):
    import sora_dist.training.trainer as trainer_mod
    from trainer_runs import run_trainer
    root, _ = folders
    calls = []
    real = trainer_mod.load_diffusers_weights
    monkeypatch.setattr(trainer_mod, "load_diffusers_weights", lambda *a: calls.append(1) or real(*a))
    cfg = wan_cfg(tmp_path / "run", root / "single")
    run_trainer(cfg)
    assert calls == [1]
    cfg.train.steps = 2
    losses, _ = run_trainer(cfg)  # resumes from step 1: the checkpoint wins
    assert calls == [1] and len(losses) == 1


def _rewrite_header(src, dst, edit):
    """Copy a safetensors file with its JSON header changed by edit(header) (data kept)."""
    import struct
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header, data = json.loads(f.read(n)), f.read()
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _break(folder, case):
    """Damage a copy of a good folder; returns the text the error must contain."""
    st = folder / "diffusion_pytorch_model.safetensors"
    if case == "missing_file":
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        victim = sorted(set(index["weight_map"].values()))[1]
        os.remove(folder / victim)
        return victim
    if case == "no_weights":
        os.remove(st)
        return "diffusion_pytorch_model.safetensors"
    if case == "wrong_class":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["_class_name"] = "UNet2DConditionModel"
        (folder / "config.json").write_text(json.dumps(cfg))
        return "_class_name='UNet2DConditionModel'"
    if case == "arch_mismatch":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["num_layers"] = 30
        (folder / "config.json").write_text(json.dumps(cfg))
        return "num_layers=30 in " + str(folder / "config.json") + " but model.depth=4"
    if case == "truncated":
        size = os.path.getsize(st)
        with open(st, "r+b") as f:
            f.truncate(size - 100)
        return "diffusion_pytorch_model.safetensors is truncated"
    if case == "corrupt_header":
        with open(st, "r+b") as f:
            f.seek(8)
            f.write(b"\x00garbage")
        return "diffusion_pytorch_model.safetensors is unreadable or corrupt"

    def edit(h):
        if case == "missing_key":
            del h["blocks.1.ffn.net.2.weight"]
        elif case == "unexpected_key":
            h["blocks.7.attn1.to_q.weight"] = h["blocks.1.attn1.to_q.weight"]
        elif case == "wrong_shape":  # same byte count, other shape
            h["blocks.0.attn1.to_q.weight"]["shape"] = [24, 96]
    _rewrite_header(st, st, edit)
    return {"missing_key": "'blocks.1.ffn.net.2.weight' is missing",
            "unexpected_key": "'blocks.7.attn1.to_q.weight', which WanDiT has no parameter for",
            "wrong_shape": "'blocks.0.attn1.to_q.weight' has shape [24, 96] but the model expects [48, 48]"}[case]


BAD = ["missing_file", "no_weights", "wrong_class", "arch_mismatch", "truncated", "corrupt_header",
       "missing_key", "unexpected_key", "wrong_shape"]


@pytest.mark.parametrize("case", BAD)
def test_bad_folder_is_one_error_before_run_dir(folders, tmp_path, case):
    from sora_dist.training.trainer import Trainer
    root, _ = folders
    folder = tmp_path / "bad"
    shutil.copytree(root / ("sharded" if case == "missing_file" else "single"), folder)
    check_init_from(str(folder), ARGS)  # good before the damage
    must = _break(folder, case)
    cfg = wan_cfg(tmp_path / "run", folder)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=1)
    msg = str(e.value)
    assert must in msg and "\n" not in msg, msg
    assert str(folder) in msg, msg  # names the folder or the file in it
    with pytest.raises(ConfigError):
        Trainer(cfg)
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_loader_refuses_a_mismatched_model(folders):
    """load_diffusers_weights on its own (no validate) still refuses wrong shapes."""
    root, _ = folders
    other = DiTArgs(arch="wan", hidden_size=48, num_heads=4, depth=4, ffn_dim=64, in_channels=3, text_dim=24)
    with pytest.raises(WeightsError, match="blocks.0.ffn.net.0.proj.weight' has shape"):
        load_diffusers_weights(WanDiT(other), str(root / "single"))


def test_init_from_needs_wan_and_one_source(folders, tmp_path):
    root, _ = folders
    cfg = wan_cfg(tmp_path / "run", root / "single")
    cfg.train.init_from = str(tmp_path / "other_run")
    with pytest.raises(ConfigError, match="both set the initial weights"):
        validate(cfg)


# ---- sharded loads (gloo) ---------------------------------------------------------------------

LAYOUTS = {
    "tp2_sp_meta": (2, dict(tp=2, sequence_parallel=True), True),
    "dp2_fsdp": (2, dict(fsdp=True), False),
    "pp2": (2, dict(pp=2, pp_microbatches=2), False),
    "dp2_tp2_fsdp_meta": (4, dict(tp=2, sequence_parallel=True, fsdp=True), True),
}


def _load_worker(rank, world, folder, run_dir, parallel, meta):
    """Build, parallelize (as the trainer does), load; return this rank's parameters as whole
    tensors gathered from every rank's local shard, and the bytes this rank read."""
    from torch.distributed.tensor import DTensor

    from sora_dist.diffusion import build_diffusion
    from sora_dist.models import build_model
    from sora_dist.parallel.dims import ParallelDims
    from sora_dist.parallel.parallelize import parallelize
    from sora_dist.training.optim import named_params
    cfg = wan_cfg(run_dir, folder)
    cfg.train.meta_init = meta
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    pdims = ParallelDims.from_config(cfg.parallel, world)
    pdims.build_mesh("cpu")
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            model = build_model(cfg.model)
    else:
        model = build_model(cfg.model)
    pm = parallelize(model, pdims, cfg, torch.device("cpu"), build_diffusion(cfg.diffusion).loss)
    stats = load_diffusers_weights(pm.model, folder)
    out = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
           for n, p in named_params(pm.model).items()}
    return {"params": out, "stats": stats}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sharded_load_reads_only_local_slices(folders, tmp_path, layout):
    """Every rank's parameters (gathered from the shards, so each local shard is checked in its
    place) equal the folder's tensors; each rank read a fraction of the bytes, together all."""
    root, _ = folders
    world, parallel, meta = LAYOUTS[layout]
    folder = str(root / "sharded")
    full = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            full.update(load_file(os.path.join(folder, name)))
    want = from_diffusers_state_dict(full)
    results = run_distributed(_load_worker, world, folder, str(tmp_path / "run"), parallel, meta, all_ranks=True)
    seen = set()
    for r, res in enumerate(results):
        for n, whole in res["params"].items():
            assert torch.equal(whole, want[n]), (r, n)
            seen.add(n)
        s = res["stats"]
        # A layout that shards (or splits stages) reads well under the whole file per rank.
        assert s["bytes_read"] < 0.75 * s["bytes_total"], (r, s)
    assert seen == set(want)  # together the ranks hold (and read) every tensor
    assert sum(res["stats"]["bytes_read"] for res in results) >= results[0]["stats"]["bytes_total"]
    if layout == "pp2":  # a stage holds (and read) only its own blocks
        stages = [{n.split(".")[1] for n in res["params"] if n.startswith("blocks.")} for res in results]
        assert stages == [{"0", "1"}, {"2", "3"}], stages
