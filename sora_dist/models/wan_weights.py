"""The one place where WanDiT's parameter names meet diffusers' `WanTransformer3DModel` names
and config (loading `model.init_from`, and `sora-export`).

Loading is sharding-aware: `check_init_from` checks a folder from its config.json and
safetensors headers alone (validate() runs it before any process group or run_dir exists);
`load_diffusers_weights` then fills an already parallelized model, each rank reading only the
slices its DTensor shards hold.

Every WanDiT parameter maps to exactly one diffusers key with the same shape; the rules below
are applied in order, first match wins, and a name no rule matches is an error (never a
silent partial load).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from sora_dist.config.model import DiTArgs

# (sora_dist regex, diffusers template): per block ("blocks.N.") and outside the blocks.
_RULES: list[tuple[str, str]] = [
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embedding.\1"),
    (r"t_embedder\.mlp\.0\.(weight|bias)", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"t_embedder\.mlp\.2\.(weight|bias)", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"t_embedder\.proj\.1\.(weight|bias)", r"condition_embedder.time_proj.\1"),
    (r"y_embedder\.0\.(weight|bias)", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"y_embedder\.2\.(weight|bias)", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"blocks\.(\d+)\.attn\.w([qkv])\.(weight|bias)", r"blocks.\1.attn1.to_\2.\3"),
    (r"blocks\.(\d+)\.attn\.wo\.(weight|bias)", r"blocks.\1.attn1.to_out.0.\2"),
    (r"blocks\.(\d+)\.attn\.([qk])_norm\.weight", r"blocks.\1.attn1.norm_\2.weight"),
    (r"blocks\.(\d+)\.cross_attn\.w([qkv])\.(weight|bias)", r"blocks.\1.attn2.to_\2.\3"),
    (r"blocks\.(\d+)\.cross_attn\.wo\.(weight|bias)", r"blocks.\1.attn2.to_out.0.\2"),
    (r"blocks\.(\d+)\.cross_attn\.([qk])_norm\.weight", r"blocks.\1.attn2.norm_\2.weight"),
    (r"blocks\.(\d+)\.norm_cross\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.ffn.net.0.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.ffn.net.2.\2"),
    (r"blocks\.(\d+)\.modulation\.scale_shift_table", r"blocks.\1.scale_shift_table"),
    (r"final_layer\.linear\.(weight|bias)", r"proj_out.\1"),
    (r"final_layer\.modulation\.scale_shift_table", r"scale_shift_table"),
]
_TO = [(re.compile(a + "$"), b) for a, b in _RULES]


def _inverse(template: str) -> str:
    pat = re.escape(template)
    for g in ("1", "2", "3"):
        pat = pat.replace(re.escape("\\" + g), r"([^.]+)")
    return pat


_FROM = [(re.compile(_inverse(b) + "$"), re.sub(r"\\\.", ".", re.sub(r"\(.*?\)", "{}", a))) for a, b in _RULES]


def to_diffusers_key(name: str) -> str:
    """WanDiT parameter name -> diffusers key (KeyError naming it when no rule applies)."""
    for pat, tmpl in _TO:
        if pat.match(name):
            return pat.sub(tmpl, name)
    raise KeyError(f"WanDiT parameter {name!r} has no diffusers name (models/wan_weights.py rules)")


def from_diffusers_key(key: str) -> str:
    """diffusers key -> WanDiT parameter name (KeyError naming it when no rule applies)."""
    for pat, tmpl in _FROM:
        m = pat.match(key)
        if m:
            name = tmpl.format(*m.groups())
            try:  # the inverse patterns are looser than the rules: confirm by the forward rule
                if to_diffusers_key(name) == key:
                    return name
            except KeyError:
                pass
    raise KeyError(f"diffusers key {key!r} is not part of a WanTransformer3DModel this loader knows "
                   f"(models/wan_weights.py rules)")


def diffusers_config(a: DiTArgs) -> dict:
    """The config.json of a WanTransformer3DModel with WanDiT `a`'s architecture."""
    return {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(a.patch_size),
        "num_attention_heads": a.num_heads,
        "attention_head_dim": a.head_dim,
        "in_channels": a.in_channels,
        "out_channels": a.in_channels,
        "text_dim": a.text_dim,
        "freq_dim": 256,
        "ffn_dim": a.mlp_width,
        "num_layers": a.depth,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads" if a.qk_norm else None,
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def args_from_diffusers_config(cfg: dict) -> dict:
    """DiTArgs fields of a WanTransformer3DModel config.json (ValueError naming the field for
    what WanDiT does not implement: image cross-attention (Wan2.1 I2V), cross_attn_norm off,
    out_channels != in_channels)."""
    unsupported = [
        (cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None,
         "image_dim/added_kv_proj_dim (Wan2.1 I2V's CLIP image cross-attention)"),
        (not cfg.get("cross_attn_norm", True), "cross_attn_norm=false"),
        (cfg.get("out_channels") not in (None, cfg.get("in_channels", 16)), "out_channels != in_channels"),
        (cfg.get("freq_dim", 256) != 256, "freq_dim != 256"),
        (cfg.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", None),
         f"qk_norm={cfg.get('qk_norm')!r}"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ValueError(f"WanTransformer3DModel config with {what} is not supported by WanDiT")
    heads = int(cfg.get("num_attention_heads", 40))
    return dict(
        arch="wan", hidden_size=heads * int(cfg.get("attention_head_dim", 128)), num_heads=heads,
        depth=int(cfg.get("num_layers", 40)), ffn_dim=int(cfg.get("ffn_dim", 13824)),
        in_channels=int(cfg.get("in_channels", 16)), text_dim=int(cfg.get("text_dim", 4096)),
        patch_size=tuple(int(p) for p in cfg.get("patch_size", (1, 2, 2))),
        qk_norm=cfg.get("qk_norm", "rms_norm_across_heads") is not None,
    )


def from_diffusers_state_dict(sd: dict) -> dict:
    """A whole diffusers state dict renamed to WanDiT names (tensors shared, not copied)."""
    return {from_diffusers_key(k): v for k, v in sd.items()}


def to_diffusers_state_dict(sd: dict) -> dict:
    """A whole WanDiT state dict renamed to diffusers keys (tensors shared, not copied)."""
    return {to_diffusers_key(k): v for k, v in sd.items()}


# ---- model.init_from: a diffusers transformer folder -> this rank's shards ----------------------
# What a folder may hold, in the order looked for: diffusers names its files
# diffusion_pytorch_model*.safetensors, other tools model*.safetensors; sharded saves add an
# .index.json mapping each key to its shard file.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
                "model.safetensors.index.json", "model.safetensors")
# safetensors dtype -> bytes per element (the float types a checkpoint of WanDiT can hold).
_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}
# (diffusers config field, ModelConfig field, DiTArgs attribute): the architecture a folder must match.
_ARCH_FIELDS = [("num_layers", "depth", "depth"), ("num_attention_heads", "num_heads", "num_heads"),
                ("num_attention_heads*attention_head_dim", "hidden_size", "hidden_size"),
                ("ffn_dim", "ffn_dim", "mlp_width"), ("in_channels", "in_channels", "in_channels"),
                ("text_dim", "text_dim", "text_dim"), ("patch_size", "patch_size", "patch_size"),
                ("qk_norm", "qk_norm", "qk_norm")]


class WeightsError(ValueError):
    """A diffusers folder that cannot initialise the model; one line naming the file and key/field."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a folder lives: its file, dtype and shape (from the header only)."""
    file: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE.get(self.dtype, 0)


def read_safetensors_header(path: str) -> dict[str, TensorEntry]:
    """The tensors a .safetensors file declares, checked against its size: a file cut short (a
    partial download or copy) is caught here from the header's data offsets, without reading
    the data."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                raise WeightsError(f"{path} is truncated or not a safetensors file (header of {n} bytes, "
                                   f"file of {size}); download it again")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{path} is unreadable or corrupt ({type(e).__name__}: {e}); download it again") from None
    out, end = {}, 0
    for key, v in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(o) for o in v["data_offsets"])
            entry = TensorEntry(path, str(v["dtype"]), tuple(int(s) for s in v["shape"]))
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt header entry for key {key!r}; download it again") from None
        if entry.dtype not in _ITEMSIZE:
            raise WeightsError(f"{path}: key {key!r} has dtype {entry.dtype}, not a float type WanDiT can load")
        if stop - begin != entry.nbytes:
            raise WeightsError(f"{path}: key {key!r} spans {stop - begin} bytes but its {entry.dtype} shape "
                               f"{list(entry.shape)} needs {entry.nbytes}; the file is corrupt")
        out[key], end = entry, max(end, stop)
    if 8 + n + end > size:
        raise WeightsError(f"{path} is truncated: its header declares {8 + n + end} bytes, the file holds "
                           f"{size}; download it again")
    return out


def weight_index(folder: str) -> dict[str, TensorEntry]:
    """Every tensor of a diffusers folder (single file or sharded via an index), headers only."""
    name = next((n for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if name is None:
        raise WeightsError(f"{folder} holds none of {', '.join(WEIGHT_FILES)}; point model.init_from at a "
                           f"diffusers transformer folder")
    path = os.path.join(folder, name)
    if not name.endswith(".index.json"):
        return read_safetensors_header(path)
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{path} is not a safetensors index ({type(e).__name__}: {e})") from None
    headers = {}
    for fname in files:
        shard = os.path.join(folder, fname)
        if not os.path.isfile(shard):
            key = next(k for k, v in weight_map.items() if v == fname)
            raise WeightsError(f"{path} names {fname} (for key {key!r} and others), which is missing from {folder}")
        headers[fname] = read_safetensors_header(shard)
    out = {}
    for key, fname in weight_map.items():
        if key not in headers[fname]:
            raise WeightsError(f"{path} puts key {key!r} in {fname}, which does not hold it")
        out[key] = headers[fname][key]
    return out


def check_diffusers_config(folder: str, a: DiTArgs) -> None:
    """config.json is a WanTransformer3DModel with exactly the run's architecture."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    cls = cfg.get("_class_name") if isinstance(cfg, dict) else None
    if cls != "WanTransformer3DModel":
        raise WeightsError(f"{path} has _class_name={cls!r}, not 'WanTransformer3DModel'; point model.init_from "
                           f"at the transformer folder of a Wan diffusers model")
    try:
        theirs = DiTArgs(**args_from_diffusers_config(cfg))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: {e}") from None
    for diffusers_field, model_field, attr in _ARCH_FIELDS:
        got, want = (_plain(getattr(x, attr)) for x in (theirs, a))
        if got != want:
            raise WeightsError(f"{diffusers_field}={got} in {path} but model.{model_field}={want}; set "
                               f"model.{model_field} (or the matching flavor) to the folder's architecture")


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def expected_shapes(a: DiTArgs) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape of every WanDiT parameter (built on the meta device: no memory)."""
    import torch

    from sora_dist.models.wan import WanDiT
    with torch.device("meta"):
        model = WanDiT(a)
    return {to_diffusers_key(n): tuple(p.shape) for n, p in model.named_parameters()}


def check_init_from(folder: str, a: DiTArgs) -> dict[str, TensorEntry]:
    """The whole check of a model.init_from folder before anything is built or written: config,
    files, headers (truncation), and keys/shapes one to one with the model. Returns the index."""
    check_diffusers_config(folder, a)
    index = weight_index(folder)
    want = expected_shapes(a)
    for key, entry in index.items():
        if key not in want:
            raise WeightsError(f"{entry.file} holds key {key!r}, which WanDiT has no parameter for "
                               f"(not a WanTransformer3DModel of this architecture)")
        if entry.shape != want[key]:
            raise WeightsError(f"{entry.file}: key {key!r} has shape {list(entry.shape)} but the model expects "
                               f"{list(want[key])}")
    missing = sorted(set(want) - set(index))
    if missing:
        raise WeightsError(f"{folder}: key {missing[0]!r} is missing from its safetensors files"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return index


def init_from_problems(folder: str, a: DiTArgs) -> list[str]:
    """validate()'s form of check_init_from: [] when the folder loads into the model."""
    try:
        check_init_from(folder, a)
    except WeightsError as e:
        return [f"model.init_from: {e}"]
    return []


def _local_box(p) -> tuple[Any, tuple[int, ...], tuple[int, ...]]:
    """(tensor to fill, its shape, its offset in the global tensor) of a parameter: the local
    shard of a DTensor (TP, FSDP2 incl. uneven and empty shards, HSDP, 2D), else the whole."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    if not isinstance(p, DTensor):
        return p, tuple(p.shape), (0,) * p.ndim
    local = p.to_local()  # under no_grad: the shard's storage itself (FSDP2: a view of its padded buffer)
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return local, tuple(shape), tuple(offset)


def load_diffusers_weights(model, folder: str) -> dict:
    """Fill a WanDiT, parallelized or not, from a diffusers folder in place: each parameter
    present on this rank (pipeline stages hold a subset; pruned blocks are never read) gets
    exactly its local shard, read as a slice of the safetensors tensor (memory-mapped: only
    those bytes are touched). Returns {"bytes_read", "bytes_total", "tensors"}.
    Run check_init_from first for the full one-to-one check (validate() does)."""
    import torch
    from safetensors import safe_open
    from torch.distributed.tensor import distribute_tensor

    index = weight_index(folder)
    by_file: dict[str, list] = {}
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")  # wrappers
        key = to_diffusers_key(name)
        entry = index.get(key)
        if entry is None:
            raise WeightsError(f"{folder}: key {key!r} (parameter {name}) is missing from its safetensors files")
        if entry.shape != tuple(p.shape):
            raise WeightsError(f"{entry.file}: key {key!r} has shape {list(entry.shape)} but the model expects "
                               f"{list(p.shape)}")
        by_file.setdefault(entry.file, []).append((key, p))
    stats = {"bytes_read": 0, "bytes_total": sum(e.nbytes for e in index.values()), "tensors": 0}
    with torch.no_grad():
        for path, params in by_file.items():
            with safe_open(path, framework="pt", device="cpu") as f:
                for key, p in params:
                    local, shape, offset = _local_box(p)
                    if local.numel() == 0:  # an empty FSDP shard (dim 0 smaller than the group)
                        continue
                    if tuple(local.shape) != shape:  # a placement without a box: split the whole
                        full = f.get_tensor(key)
                        stats["bytes_read"] += full.numel() * full.element_size()
                        local.copy_(distribute_tensor(full.to(local.dtype), p.device_mesh, p.placements,
                                                      src_data_rank=None).to_local())
                    else:
                        t = f.get_slice(key)[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
                        stats["bytes_read"] += t.numel() * t.element_size()
                        local.copy_(t.to(local.dtype))
                    stats["tensors"] += 1
    return stats
