"""TextEncoder: tiny random T5 + locally trained tokenizer; masks and padding."""
import pytest
import torch

from sora_dist.models.text import TextEncoder, build_tiny_text_encoder


@pytest.fixture(scope="module")
def te(tmp_path_factory):
    return TextEncoder.load(build_tiny_text_encoder(str(tmp_path_factory.mktemp("t") / "t5")), max_length=10)


def test_encode_shapes_mask_and_zero_padding(te):
    emb, mask = te.encode(["a red ball", "a blue square moving left on a gray background"])
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool
    assert emb.shape == (2, 10, 32) and mask.shape == (2, 10)  # second caption truncated to 10
    assert mask[0].sum() == 4 and mask[1].all()  # 3 words + </s>
    assert emb[0, 4:].abs().max() == 0 and emb[0, :4].abs().min() > 0


def test_padding_does_not_change_embeddings(te):
    alone, m = te.encode(["blue square"])
    both, _ = te.encode(["blue square", "a large yellow circle moving right"])
    n = int(m.sum())
    torch.testing.assert_close(both[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_tokenizer_is_real_and_reloads(te, tmp_path):
    ids = te.tokenizer("a red ball bouncing")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids  # ends with </s>, no <unk> for known words
    different = te.encode(["red"])[0][0, 0] - te.encode(["blue"])[0][0, 0]
    assert different.abs().max() > 1e-4


def test_single_string_rejected(te):
    with pytest.raises(TypeError):
        te.encode("a caption")


# ---- umT5 (Wan's text encoder) and the choice by config.json model_type ------------------------

@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    return build_tiny_text_encoder(str(tmp_path_factory.mktemp("u") / "umt5"), kind="umt5")


def _wan_embeds(model_dir, captions, max_length):
    """diffusers' own WanPipeline._get_t5_prompt_embeds on the same folder (tiny parts, no VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(model_dir),
                       text_encoder=UMT5EncoderModel.from_pretrained(model_dir).eval(),
                       vae=None, scheduler=FlowMatchEulerDiscreteScheduler())
    with torch.no_grad():
        return pipe._get_t5_prompt_embeds(captions, max_sequence_length=max_length,
                                          device=torch.device("cpu"), dtype=torch.float32)


CAPTIONS = ["a red ball", "a blue square moving left on a gray background", "sunset"]


def test_umt5_is_chosen_from_config_and_defaults_to_wan_layout(umt5_dir):
    from transformers import UMT5EncoderModel

    te = TextEncoder.load(umt5_dir)
    assert type(te.model) is UMT5EncoderModel and te.model_type == "umt5"
    assert (te.max_length, te.pad_to_max) == (512, True)  # Wan: 512 tokens, zero-padded to 512
    t5 = TextEncoder.load(build_tiny_text_encoder(umt5_dir + "-t5"))
    assert t5.model_type == "t5" and (t5.max_length, t5.pad_to_max) == (120, False)  # unchanged for T5


@pytest.mark.parametrize("max_length", [512, 7])  # Wan's length; and one that truncates a caption
def test_umt5_equals_wan_pipeline_prompt_embeds(umt5_dir, max_length):
    te = TextEncoder.load(umt5_dir, max_length=max_length)
    emb, mask = te.encode(CAPTIONS)
    ref = _wan_embeds(umt5_dir, CAPTIONS, max_length)
    assert emb.shape == ref.shape == (3, max_length, 32)
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    lens = mask.sum(1)
    assert lens.tolist() == [4, min(10, max_length), 2]
    for i, n in enumerate(lens.tolist()):
        assert torch.all(emb[i, n:] == 0) and not mask[i, n:].any()  # exactly zero past the mask
        assert emb[i, :n].abs().amax(-1).min() > 0


def test_umt5_pad_to_max_off_pads_to_the_longest(umt5_dir):
    emb, mask = TextEncoder.load(umt5_dir, pad_to_max=False).encode(CAPTIONS[:1])
    assert emb.shape == (1, 4, 32) and mask.all()
    full, _ = TextEncoder.load(umt5_dir).encode(CAPTIONS[:1])
    torch.testing.assert_close(full[:, :4], emb, atol=1e-5, rtol=1e-5)


def test_diffusers_pipeline_layout_finds_the_sibling_tokenizer(umt5_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    root = tmp_path / "Wan-Diffusers"
    shutil.copytree(umt5_dir, root / "text_encoder")
    AutoTokenizer.from_pretrained(umt5_dir).save_pretrained(root / "tokenizer")
    for f in (root / "text_encoder").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    emb, _ = TextEncoder.load(str(root / "text_encoder")).encode(CAPTIONS)
    torch.testing.assert_close(emb, TextEncoder.load(umt5_dir).encode(CAPTIONS)[0])


def test_unknown_model_type_is_one_clear_error(umt5_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bert"
    shutil.copytree(umt5_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    with pytest.raises(ValueError, match=r"bert.*model_type='bert'.*supported text encoders: t5, umt5"):
        TextEncoder.load(str(bad))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TextEncoder.load(str(tmp_path))
    with pytest.raises(ValueError, match="kind='bert'"):
        build_tiny_text_encoder(str(tmp_path / "x"), kind="bert")
