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
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not Exception
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)

from sora_dist.fsutil import atomic_write_text, replace_dir

log = logging.getLogger("sora_dist")

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
    tmp = _begin(root, step, rank_state)
    dcp.save(_states(model, optimizer, ema), checkpoint_id=tmp)
    return _commit(root, step, keep, meta)


def _begin(root: str, step: int, rank_state: Optional[dict]) -> str:
    """Collective: a fresh temp folder for `step` holding this rank's rank_state."""
    tmp = step_dir(root, step) + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
        os.makedirs(os.path.join(tmp, "rank_state"), exist_ok=True)
    _barrier()
    if rank_state is not None:
        os.makedirs(os.path.join(tmp, "rank_state"), exist_ok=True)
        atomic_write_text(os.path.join(tmp, "rank_state", f"rank{_rank():05d}.json"), json.dumps(rank_state))
    return tmp


def _commit(root: str, step: int, keep: int, meta: Optional[dict] = None) -> str:
    """Collective, once every rank's shards are written: the marker, then the rename that makes
    the checkpoint complete, then pruning to the newest `keep`."""
    final = step_dir(root, step)
    tmp = final + ".tmp"
    _barrier()
    if _rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        atomic_write_text(os.path.join(tmp, MARKER), json.dumps({"step": step, "world_size": world, **(meta or {})}))
        replace_dir(tmp, final)  # re-saving a step moves the old one aside, never deletes first
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
            # collective): CheckpointManager._saved_data_states, the rank-0 read of every rank_state,
            # reports it to all ranks.
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


@dataclass
class TrainState:
    """The loop's own counters: saved per rank with the data position."""
    step: int = 0
    skipped: int = 0  # non-finite steps skipped so far


class CheckpointManager:
    """Owns what a training checkpoint holds (torchtitan's CheckpointManager): the model, optimizer
    and EMA as DCP shards (any layout), and per rank the loader position and the TrainState.

    The data position belongs to a DP rank, not a global rank: a new layout (other tp/cp/pp) maps
    global ranks differently, so it is looked up by DP coordinate; another DP size carries the
    stream over from every old DP rank's position (loader.load_elastic_state).

    With `async_save` the step loop blocks only while DCP stages the state to CPU memory; a
    background thread writes the files. One save is pending at most: the next save, `wait()`,
    preemption and the end of training first finish it on every rank, and only then is its
    COMPLETE marker written, so a crash mid-write leaves the previous checkpoint the newest
    complete one."""

    def __init__(self, folder: str, model, optimizer, ema, loader, state: TrainState,
                 dp_rank: int, dp_size: int, keep: int, async_save: bool = False):
        self.folder, self.model, self.optimizer, self.ema = folder, model, optimizer, ema
        self.loader, self.state, self.dp_rank, self.dp_size, self.keep = loader, state, dp_rank, dp_size, keep
        self.async_save = async_save
        self.last_stall_s = 0.0  # how long the last save() blocked its caller
        self._pending: Optional[tuple] = None  # (future, step) of the save being written
        # The background writer's collectives get their own group, so they never interleave
        # with the training step's collectives on the default one.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(self) -> str:
        """Checkpoint the current step (collective). Returns its folder, which is complete at
        return unless async_save (then after the next save / wait())."""
        t0 = time.perf_counter()
        self.wait()
        step = self.state.step
        rank_state = {"data": self.loader.state_dict(), "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                      "step": step, "skipped": self.state.skipped}
        if self.async_save:
            tmp = _begin(self.folder, step, rank_state)
            future = dcp.async_save(_states(self.model, self.optimizer, self.ema), checkpoint_id=tmp,
                                    process_group=self._group)
            self._pending = (future, step)
            path = step_dir(self.folder, step)
            log.info("checkpoint %s being written in the background", path)
        else:
            path = save(self.folder, step, self.model, self.optimizer, self.ema,
                        rank_state=rank_state, keep=self.keep)
            log.info("saved checkpoint %s", path)
        self.last_stall_s = time.perf_counter() - t0
        return path

    def wait(self) -> None:
        """Finish the pending background save on every rank and mark it complete (collective)."""
        if self._pending is None:
            return
        future, step = self._pending
        self._pending = None
        future.result()
        path = _commit(self.folder, step, self.keep)
        log.info("saved checkpoint %s", path)

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any, into everything this manager owns."""
        found = latest(self.folder)
        if found is None:
            return False
        step, path = found
        saved = load(path, self.model, self.optimizer, self.ema)
        by_dp, old_size = self._saved_data_states(path)
        if old_size == self.dp_size:
            self.loader.load_state_dict(by_dp[self.dp_rank])
        elif by_dp:
            log.info("%s", self.loader.load_elastic_state(list(by_dp.values())))
        else:
            raise CheckpointError(f"{path} holds no data position (rank_state/ missing); "
                                  "restore the folder or start with train.init_from")
        self.state.step, self.state.skipped = step, saved.get("skipped", 0)
        log.info("resumed from %s (step %d)", path, step)
        return True

    def load_weights(self, path: str) -> None:
        """Model weights only (train.init_from: fine-tuning from another run's checkpoint); the
        optimizer, EMA and data position start fresh."""
        load_model_only(path, self.model)
        log.info("initialised weights from %s", path)

    def _saved_data_states(self, path: str) -> tuple[dict, int]:
        """({dp_rank: loader state}, saved DP size) of a checkpoint. Rank 0 reads the per-rank
        files once and broadcasts (every DP rank's state is saved by all its TP/CP/PP peers:
        one is kept per DP rank), so a restart of N ranks reads N small files, not N^2."""
        out = [None]
        if _rank() == 0:
            by_dp, sizes, err = {}, set(), ""
            try:  # any failure is broadcast, so no rank is left waiting in the collective
                for s in rank_states(path):
                    if "data" in s:
                        by_dp[int(s["dp_rank"])] = s["data"]
                        sizes.add(int(s["dp_size"]))
            except (OSError, ValueError, KeyError, TypeError) as e:
                err = f"{path}/rank_state is unreadable ({type(e).__name__}: {e})"
            if not err and len(sizes) > 1:
                err = f"{path}: rank states from DP sizes {sorted(sizes)}; the folder mixes two runs"
            elif not err and sizes and sorted(by_dp) != list(range(max(sizes))):
                err = (f"{path}: data positions of DP ranks {sorted(by_dp)} of {max(sizes)}; "
                       "rank_state/ is incomplete")
            if err:
                err += "; delete this step folder to resume from the previous checkpoint"
            out = [(by_dp, max(sizes, default=0), err)]
        if dist.is_initialized():  # every rank raises together, none is left waiting
            dist.broadcast_object_list(out, src=0)
        by_dp, size, err = out[0]
        if err:
            raise CheckpointError(err)
        return by_dp, size
