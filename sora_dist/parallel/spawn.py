"""Run a function on N local gloo processes (tests and CPU benchmarks).

Each rank gets the default process group initialised; what rank 0 returns comes back.
Always barrier + destroy_process_group at exit so no rank leaves a peer hanging.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N ranks share few cores
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    except Exception:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's background threads can still be joinable when
    # C++ static destructors run, which aborts the process ("terminate called without an
    # active exception") after the work has succeeded.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args, attempts: int = 3) -> Any:
    """Call fn(rank, world_size, *args) on world_size gloo ranks; return rank 0's result.
    fn must be importable (module-level) for spawn. free_port() can race with another process
    taking the port before rank 0 binds it: that one failure is retried on a new port."""
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir),
                         nprocs=world_size, join=True)
            except Exception as e:
                errs = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                        if f.startswith("error")]
                text = "\n".join(errs) or str(e)
                if "address already in use" in text.lower() and attempt + 1 < attempts:
                    continue
                raise RuntimeError("distributed run failed:\n" + text) from e
            path = os.path.join(out_dir, "result.pt")
            return torch.load(path, weights_only=True) if os.path.exists(path) else None
