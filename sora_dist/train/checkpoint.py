"""Distributed checkpoints with torch.distributed.checkpoint (DCP).

Layout of one checkpoint (a folder per step):
  step_00000100/            DCP shards of {model, optim, ema}: FQN-keyed, layout-free, so a
                            checkpoint saved under one (tp, cp, pp, dp) loads under another
  step_00000100/rank_state/ per-rank JSON (data-loader position, RNG) — small and safe to read
  step_00000100/COMPLETE    marker written last, inside the temp folder, before the rename

It is written to `step_XXXXXXXX.tmp` and renamed when complete, so a kill mid-save leaves the
previous checkpoint as the newest complete one. Nothing is unpickled on load.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not Exception
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)

from sora_dist.fsutil import atomic_write_text  # noqa: F401,E402  (used by the trainer too)

MARKER = "COMPLETE"
# One process without a process group is a supported layout, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class CheckpointError(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def list_complete(root: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step_") and not name.endswith(".tmp") and os.path.exists(os.path.join(path, MARKER)):
            out.append((int(name[5:]), path))
    return sorted(out)


def _states(model, optimizer, ema) -> dict:
    opts = StateDictOptions(full_state_dict=False)
    sd = {"model": get_model_state_dict(model, options=opts)}
    if optimizer is not None:
        sd["optim"] = get_optimizer_state_dict(model, optimizer, options=opts)
    if ema is not None:
        sd["ema"] = ema.state_dict()
    return sd


def save(root: str, step: int, model, optimizer=None, ema=None, rank_state: Optional[dict] = None,
         keep: int = 2, meta: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the final folder."""
    final = step_dir(root, step)
    tmp = final + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        os.makedirs(os.path.join(tmp, "rank_state"), exist_ok=True)
    _barrier()
    dcp.save(_states(model, optimizer, ema), checkpoint_id=tmp)
    if rank_state is not None:
        os.makedirs(os.path.join(tmp, "rank_state"), exist_ok=True)
        atomic_write_text(os.path.join(tmp, "rank_state", f"rank{_rank():05d}.json"), json.dumps(rank_state))
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        atomic_write_text(os.path.join(tmp, MARKER), json.dumps({"step": step, "world_size": world, **(meta or {})}))
        if os.path.exists(final):  # re-saving a step: move the old one aside, never delete first
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        for _, old in list_complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str, model, optimizer=None, ema=None, strict: bool = True) -> dict:
    """Load into the (possibly parallelized) model/optimizer/EMA in place; any layout.
    Returns this rank's rank_state (or {} when the saved world had no such rank)."""
    if not os.path.exists(os.path.join(path, MARKER)):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker); "
                              "pick another step or delete it")
    sd = _states(model, optimizer, ema)
    try:
        dcp.load(sd, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # corrupt or truncated shard files
        raise CheckpointError(f"failed to read checkpoint {path}: {type(e).__name__}: {e}. "
                              "The files are damaged or from another model; delete this step "
                              "folder to resume from the previous checkpoint") from e
    opts = StateDictOptions(full_state_dict=False, strict=strict)
    set_model_state_dict(model, sd["model"], options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, sd["optim"], options=opts)
    if ema is not None:
        ema.load_state_dict(sd["ema"])
    rs_path = os.path.join(path, "rank_state", f"rank{_rank():05d}.json")
    if os.path.exists(rs_path):
        try:
            with open(rs_path) as f:
                return json.load(f)
        except ValueError:
            # Not raised here, on this rank alone (the others would wait in their next
            # collective): the trainer's rank-0 read of every rank_state reports it to all ranks.
            return {}
    return {}


def rank_states(path: str) -> list[dict]:
    """Every saved per-rank state of a checkpoint, in file order."""
    folder = os.path.join(path, "rank_state")
    out = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, name)) as f:
            out.append(json.load(f))
    return out


def load_model_only(path: str, model) -> None:
    """Weights only (fine-tuning / sampling): the optimizer and EMA entries are skipped."""
    load(path, model, None, None)


def latest(root: str) -> Optional[tuple[int, str]]:
    done = list_complete(root)
    return done[-1] if done else None
