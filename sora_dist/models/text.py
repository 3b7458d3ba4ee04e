"""Text encoder wrapper: a transformers T5 or umT5 encoder + its tokenizer, from a local folder.

The encoder class is chosen from the folder's config.json `model_type` (ENCODERS below):
T5-v1.1-XXL (D=4096, 120 tokens) as in Open-Sora/PixArt, or umT5-XXL (D=4096) as Wan uses it:
up to 512 tokens, embeddings zeroed past the attention mask and the sequence padded with zeros
to the full 512 (diffusers WanPipeline._get_t5_prompt_embeds). Tests and demos use
`build_tiny_text_encoder(kind=...)`, a tiny random model plus a real BPE tokenizer trained
locally on a word list (no hub access anywhere). The tokenizer follows T5's conventions: pad=0,
eos=1, unk=2, and every caption ends with </s>.
"""
from __future__ import annotations

import json
import os
import shutil
import string
from dataclasses import dataclass

import torch

from sora_dist.fsutil import replace_dir

# Words the tiny tokenizer is trained on: enough to give real sub-word merges for the demo
# captions; characters outside the words still tokenize through the single-letter alphabet.
_WORDS = """a an the of on in at to with and or from over under into by for is are moving
red green blue yellow white black orange purple pink gray square circle triangle ball box
shape shapes dot dots line lines left right up down slowly quickly fast slow bouncing
rotating sliding growing shrinking background foreground camera pans zooms video clip
scene small large big tiny bright dark sky sea grass city street car dog cat person
walking running flying jumping water fire light night day sunset sunrise""".split()


@dataclass(frozen=True)
class EncoderKind:
    """How one text-encoder family is loaded and how its captions are cut and padded."""
    model_class: str   # transformers class holding just the encoder stack
    max_length: int    # default caption tokens kept
    pad_to_max: bool   # default: pad every caption with zeros to max_length (Wan) vs to the batch's longest


# config.json model_type -> kind. T5 keeps this codebase's historical 120 tokens padded per
# batch; umT5 follows Wan (512 tokens, always padded to 512: Wan's DiT was trained on that layout).
ENCODERS = {
    "t5": EncoderKind("T5EncoderModel", max_length=120, pad_to_max=False),
    "umt5": EncoderKind("UMT5EncoderModel", max_length=512, pad_to_max=True),
}


def read_model_type(model_dir: str) -> str:
    """The folder's config.json model_type, checked against ENCODERS (one error naming all three)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"text encoder folder {model_dir!r} has no config.json; point text_encoder_path at a "
            "save_pretrained() folder (build one with sora_dist.models.text.build_tiny_text_encoder)")
    with open(path) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ENCODERS:
        raise ValueError(f"text encoder folder {model_dir!r} has model_type={model_type!r} in its config.json; "
                         f"supported text encoders: {', '.join(sorted(ENCODERS))} (T5EncoderModel / UMT5EncoderModel)")
    return model_type


def _tokenizer_dir(model_dir: str) -> str:
    """The folder itself, or (diffusers pipeline layout, e.g. Wan2.1-*-Diffusers/text_encoder) its
    sibling tokenizer/ folder when the model folder holds no tokenizer files."""
    names = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
    if any(os.path.isfile(os.path.join(model_dir, n)) for n in names):
        return model_dir
    sibling = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "tokenizer")
    return sibling if os.path.isdir(sibling) else model_dir


class TextEncoder:
    """captions -> (emb float32 (B, L, D), mask bool (B, L)).

    L = the batch's longest caption (<= max_length), or exactly max_length with pad_to_max.
    Embeddings are zero wherever the mask is False, in both cases."""

    def __init__(self, model, tokenizer, max_length: int = 120, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, pad_to_max: bool = False):
        if max_length < 2:
            raise ValueError(f"text max_length={max_length} must be >= 2 (one token + </s>)")
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length, self.pad_to_max, self.device = max_length, pad_to_max, torch.device(device)
        self.dim = int(model.config.d_model)
        self.model_type = str(model.config.model_type)

    @classmethod
    def load(cls, local_dir: str, max_length: int | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, pad_to_max: bool | None = None) -> "TextEncoder":
        """max_length / pad_to_max None = the encoder family's default (ENCODERS)."""
        import transformers
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per rank per load is noise in job logs
        kind = ENCODERS[read_model_type(local_dir)]
        tok = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(local_dir))
        model = getattr(transformers, kind.model_class).from_pretrained(local_dir, dtype=dtype)
        return cls(model, tok, kind.max_length if max_length is None else max_length, device, dtype,
                   kind.pad_to_max if pad_to_max is None else pad_to_max)

    def describe(self, path: str) -> dict:
        """What shard manifests record about the encoder that made them."""
        return {"model_type": self.model_type, "class": type(self.model).__name__,
                "name": os.path.basename(os.path.normpath(path)), "path": os.path.abspath(path),
                "text_dim": self.dim, "max_length": self.max_length, "pad_to_max": self.pad_to_max}

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not a single string")
        # Tokenize to the longest caption even with pad_to_max: masked keys get zero attention
        # weight, so the real tokens come out the same as from a full max_length pass (what Wan
        # runs) at a fraction of the encoder cost; the zero tail is appended below.
        batch = self.tokenizer(list(captions), padding="longest", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        # Padded positions carry garbage activations; zero them so consumers can ignore the mask
        # (Wan: `[u[:v] for u, v in zip(prompt_embeds, seq_lens)]`, then zeros).
        emb = emb * mask[..., None]
        if self.pad_to_max and emb.shape[1] < self.max_length:
            pad = self.max_length - emb.shape[1]
            emb = torch.nn.functional.pad(emb, (0, 0, 0, pad))
            mask = torch.nn.functional.pad(mask, (0, pad))
        return emb.cpu(), mask.cpu()


def build_tokenizer(vocab_size: int = 400):
    """A real BPE tokenizer trained locally on _WORDS + the printable alphabet."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=list(string.ascii_lowercase + string.digits + string.punctuation),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(_WORDS)] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def build_tiny_text_encoder(save_dir: str, d_model: int = 32, num_layers: int = 2, seed: int = 0,
                            kind: str = "t5") -> str:
    """Tiny random T5 (kind="t5") or umT5 (kind="umt5", Wan's encoder) + local tokenizer, saved
    together (temp folder, then rename)."""
    import transformers

    if kind not in ENCODERS:
        raise ValueError(f"kind={kind!r}: use one of {sorted(ENCODERS)}")
    torch.manual_seed(seed)
    tok = build_tokenizer()
    config_cls = {"t5": transformers.T5Config, "umt5": transformers.UMT5Config}[kind]
    cfg = config_cls(vocab_size=len(tok), d_model=d_model, d_kv=max(4, d_model // 4), num_heads=4,
                     d_ff=2 * d_model, num_layers=num_layers, dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
    model = getattr(transformers, ENCODERS[kind].model_class)(cfg)
    save_dir = os.path.abspath(save_dir)
    tmp = f"{save_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    replace_dir(tmp, save_dir)
    return save_dir
