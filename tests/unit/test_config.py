import pytest
from hydra import compose, initialize_config_dir

from sora_dist.config import CONFIG_DIR, FLAVORS, ConfigError, JobConfig, to_job_config, validate
from sora_dist.train import register_configs


def cfg_with(**sections):
    cfg = JobConfig()
    for sec, kv in sections.items():
        for k, v in kv.items():
            setattr(getattr(cfg, sec), k, v)
    return cfg


def test_default_is_valid():
    validate(JobConfig(), world_size=1)


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_every_flavor_validates(flavor):
    validate(cfg_with(model={"flavor": flavor}))


@pytest.mark.parametrize("sections, needle", [
    ({"model": {"flavor": "huge"}}, "model.flavor='huge' is unknown"),
    ({"model": {"hidden_size": 66}}, "not divisible by model.num_heads=4"),
    ({"model": {"patch_size": [1, 2]}}, "model.patch_size"),
    ({"parallel": {"tp": 3}}, "num_heads=4 is not divisible by tp*ulysses=3*1"),
    ({"parallel": {"cp": 8}}, "tp*ulysses=1*8"),
    ({"diffusion": {"objective": "flow", "sampler": "ddim"}}, "does not fit objective='flow'"),
    ({"diffusion": {"shift": 3.0}}, "diffusion.shift=3.0 applies to rectified flow only"),
    ({"diffusion": {"objective": "flow", "sampler": "euler", "t_range": [1.0, 0.0]}}, "diffusion.t_range=[1.0, 0.0]"),
    ({"data": {"source": "shards"}}, "data.shards=<folder"),
    ({"train": {"activation_checkpointing": "some"}}, "train.activation_checkpointing"),
    ({"optim": {"lr": -1.0}}, "optim.lr=-1.0 must be > 0"),
])
def test_bad_values_name_the_field(sections, needle):
    with pytest.raises(ConfigError, match=None) as e:
        validate(cfg_with(**sections))
    assert needle in str(e.value)


def test_shards_folder_must_exist_and_hold_a_manifest(tmp_path):
    """A missing or unfinished sora-encode folder is a config error, caught before any work."""
    def shards(path):
        return cfg_with(data={"source": "shards", "shards": str(path)})

    with pytest.raises(ConfigError) as e:
        validate(shards(tmp_path / "nope"))
    assert f"data.shards='{tmp_path / 'nope'}': no such folder" in str(e.value)
    assert "point data.shards at the folder sora-encode wrote" in str(e.value)
    partial = tmp_path / "partial"  # shards and done-lists written, rank 0 not done merging
    partial.mkdir()
    (partial / "shard-r000-000000.tar").write_bytes(b"")
    with pytest.raises(ConfigError) as e:
        validate(shards(partial))
    assert f"data.shards='{partial}': no manifest.json there" in str(e.value)
    assert "run sora-encode to completion" in str(e.value)
    (partial / "manifest.json").write_text("{}")
    validate(shards(partial))  # the folder, or the manifest inside it (as the loader takes it)
    validate(shards(partial / "manifest.json"))


def test_world_size_mismatch_message():
    with pytest.raises(ConfigError) as e:
        validate(cfg_with(parallel={"tp": 2, "cp": 2, "dp": 2}), world_size=4)
    assert "!= world size 4" in str(e.value)
    with pytest.raises(ConfigError) as e:
        validate(cfg_with(parallel={"tp": 2}), world_size=3)
    assert "not divisible by tp*cp*pp" in str(e.value)


def test_hydra_compose_with_overrides():
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        d = compose("train", overrides=["model.flavor=S", "parallel.tp=2", "train.steps=7"])
    cfg = to_job_config(d)
    assert cfg.model.resolved()["hidden_size"] == 384 and cfg.parallel.tp == 2 and cfg.train.steps == 7
    validate(cfg)


def test_hydra_rejects_unknown_field():
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        with pytest.raises(Exception, match="no_such_field"):
            compose("train", overrides=["model.no_such_field=1"])


def test_delayed_fp8_recipe_is_refused_with_pipeline_or_context_parallel():
    from sora_dist.config import ConfigError, JobConfig, validate
    cfg = JobConfig()
    cfg.model.attention_backend, cfg.model.fp8_attention, cfg.model.fp8_recipe = "te", True, "delayed"
    validate(cfg)  # one rank: fine
    cfg.parallel.cp = 2
    with pytest.raises(ConfigError, match="fp8_recipe=current"):
        validate(cfg, world_size=2)


def test_op_checkpointing_is_refused_with_zero_bubble_schedules():
    """Measured: torch raises 'Trying to backward an extra time' when ZBV splits the backward
    of an op-checkpointed block in two."""
    from sora_dist.config import ConfigError, JobConfig, validate
    cfg = JobConfig()
    cfg.model.depth = 4
    cfg.train.activation_checkpointing = "op"
    cfg.parallel.pp, cfg.parallel.pp_microbatches = 2, 2
    validate(cfg, world_size=2)  # 1f1b
    cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages = "zbv", 2
    with pytest.raises(ConfigError, match="pp_schedule=zbv"):
        validate(cfg, world_size=2)


def test_packing_validates_with_pipeline_stages():
    """Packs run through pipeline stages; data.batch_size (unused by packing) need not divide
    into the microbatches."""
    from sora_dist.config import JobConfig, validate
    cfg = JobConfig()
    cfg.model.depth = 4
    cfg.data.packing, cfg.data.tokens_per_rank = True, 4096
    cfg.data.batch_size = 2
    cfg.parallel.pp, cfg.parallel.pp_microbatches = 2, 3
    validate(cfg, world_size=2)
    cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages = "interleaved_1f1b", 2
    validate(cfg, world_size=2)


def test_op_checkpointing_with_compile_refuses_tracked_dropout_only():
    from sora_dist.config import ConfigError, JobConfig, validate
    cfg = JobConfig()
    cfg.train.activation_checkpointing, cfg.train.compile = "op", True
    validate(cfg)
    cfg.model.dropout, cfg.parallel.tp = 0.1, 2
    with pytest.raises(ConfigError, match="op with train.compile cannot replay the per-shard dropout"):
        validate(cfg, world_size=2)


@pytest.mark.parametrize("section, key, value, message", [
    ("model", "sdpa_kernel", "fast", "model.sdpa_kernel='fast': use auto, cudnn, flash, efficient or math"),
    ("model", "attention_backend", "xformers", "model.attention_backend='xformers': use 'sdpa' or 'te'"),
    ("model", "fp8_linears", "bnb", "model.fp8_linears='bnb': use 'none', 'torchao' or 'te'"),
    ("model", "fp8_recipe", "mx", "model.fp8_recipe='mx': use 'current' or 'delayed'"),
    ("parallel", "cp_mode", "star", "parallel.cp_mode='star': use ulysses, ring or hybrid"),
    ("parallel", "ring_kernel", "triton", "parallel.ring_kernel='triton': use auto, fused or math"),
    ("parallel", "pp_schedule", "dualpipe",
     "parallel.pp_schedule='dualpipe': use one of ['gpipe', '1f1b', 'interleaved_1f1b', "
     "'interleaved_zb', 'zbv']"),
])
def test_option_lists_are_checked_with_their_messages(section, key, value, message):
    """The option lists live once in config/model.py and config/parallel.py; the messages
    built from them read as they always have."""
    with pytest.raises(ConfigError) as e:
        validate(cfg_with(**{section: {key: value}}))
    assert str(e.value) == message


def test_ulysses_degree_and_virtual_stages():
    from sora_dist.config.parallel import pp_min_virtual_stages, pp_virtual_stages, ulysses_degree

    assert [ulysses_degree(m, 8, 2) for m in ("ulysses", "ring", "hybrid")] == [8, 1, 2]
    with pytest.raises(ValueError, match="cp_mode='star'"):
        ulysses_degree("star", 8, 2)
    assert pp_virtual_stages("zbv", 1) == 2 and pp_virtual_stages("interleaved_1f1b", 3) == 3
    assert [pp_min_virtual_stages(s) for s in ("gpipe", "1f1b", "interleaved_1f1b", "zbv")] == [1, 1, 2, 2]


@pytest.mark.parametrize("parallel, needle", [
    (dict(pp_schedule="1f1b", pp_virtual_stages=2), "runs one stage per rank"),
    (dict(pp_schedule="interleaved_zb", pp_virtual_stages=1), "needs parallel.pp_virtual_stages >= 2"),
    (dict(pp_schedule="zbv", pp_virtual_stages=1, pp=4, pp_microbatches=4),
     "model depth=2 < pp*pp_virtual_stages=8"),
    (dict(pp_microbatches=1), "parallel.pp_microbatches=1 must be >= parallel.pp=2"),
])
def test_pipeline_layout_rules(parallel, needle):
    from sora_dist.config.parallel import layout_problems

    kw = {"pp": 2, "pp_microbatches": 2, **parallel}
    with pytest.raises(ConfigError) as e:
        validate(cfg_with(parallel=kw))
    assert needle in str(e.value)
    # The planner's rule set is this one: the same first problem, straight from the rule.
    p = cfg_with(parallel=kw).parallel
    assert layout_problems(heads=4, mlp_width=256, depth=2, tp=p.tp, cp=p.cp, cp_mode=p.cp_mode,
                           hybrid_degree=p.ulysses_degree, pp=p.pp, pp_schedule=p.pp_schedule,
                           virtual=p.pp_virtual_stages, microbatches=p.pp_microbatches)[0] == str(e.value)


def test_dit_args_resolve_the_model_config():
    from sora_dist.config.model import DiTArgs, ModelConfig

    args = DiTArgs.from_config(ModelConfig(flavor="S", depth=3, patch_size=[1, 4, 4]))
    assert (args.hidden_size, args.depth, args.num_heads, args.patch_size) == (384, 3, 6, (1, 4, 4))
    assert (args.head_dim, args.mlp_width, args.patch_volume) == (64, 1536, 16)
    assert DiTArgs.from_flavor("S", depth=3, patch_size=(1, 4, 4), mlp_ratio=None) == args
    with pytest.raises(ValueError, match="model.flavor='huge' is unknown"):
        DiTArgs.from_flavor("huge")
