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
