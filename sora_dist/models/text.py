"""Text encoder wrapper: transformers T5EncoderModel + its tokenizer, from a local folder.

Production uses T5-v1.1-XXL (D=4096) like Open-Sora/PixArt; tests and demos use
`build_tiny_text_encoder`, a tiny random T5 plus a real BPE tokenizer trained locally on a
word list (no hub access anywhere). The tokenizer follows T5's conventions: pad=0, eos=1,
unk=2, and every caption ends with </s>.
"""
from __future__ import annotations

import os
import shutil
import string

import torch

# Words the tiny tokenizer is trained on: enough to give real sub-word merges for the demo
# captions; characters outside the words still tokenize through the single-letter alphabet.
_WORDS = """a an the of on in at to with and or from over under into by for is are moving
red green blue yellow white black orange purple pink gray square circle triangle ball box
shape shapes dot dots line lines left right up down slowly quickly fast slow bouncing
rotating sliding growing shrinking background foreground camera pans zooms video clip
scene small large big tiny bright dark sky sea grass city street car dog cat person
walking running flying jumping water fire light night day sunset sunrise""".split()


class TextEncoder:
    """captions -> (emb float32 (B, L, D), mask bool (B, L)), L <= max_length."""

    def __init__(self, model, tokenizer, max_length: int = 120,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if max_length < 2:
            raise ValueError(f"text max_length={max_length} must be >= 2 (one token + </s>)")
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length, self.device = max_length, torch.device(device)
        self.dim = int(model.config.d_model)

    @classmethod
    def load(cls, local_dir: str, max_length: int = 120, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "TextEncoder":
        from transformers import AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per rank per load is noise in job logs
        if not os.path.isfile(os.path.join(local_dir, "config.json")):
            raise FileNotFoundError(
                f"text encoder folder {local_dir!r} has no config.json; point text_encoder_path at a "
                "save_pretrained() folder (build one with sora_dist.models.text.build_tiny_text_encoder)")
        tok = AutoTokenizer.from_pretrained(local_dir)
        model = T5EncoderModel.from_pretrained(local_dir, dtype=dtype)
        return cls(model, tok, max_length, device, dtype)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise TypeError("encode() takes a list of captions, not a single string")
        batch = self.tokenizer(list(captions), padding="longest", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        # Padded positions carry garbage activations; zero them so consumers can ignore the mask.
        emb = emb * mask[..., None]
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


def build_tiny_text_encoder(save_dir: str, d_model: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Tiny random T5 encoder + local tokenizer, saved together (temp folder, then rename)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = build_tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=max(4, d_model // 4), num_heads=4,
                   d_ff=2 * d_model, num_layers=num_layers, dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=False)
    model = T5EncoderModel(cfg)
    save_dir = os.path.abspath(save_dir)
    tmp = f"{save_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(save_dir):
        shutil.rmtree(save_dir)
    os.replace(tmp, save_dir)
    return save_dir
