"""Test and CPU-benchmark helpers (not used by the jobs): run a function on N local gloo
processes.

Each rank gets the default process group initialised; what rank 0 returns comes back, or with
all_ranks=True the list of every rank's result (so a test can check what each rank measured).
Always barrier + destroy_process_group at exit so no rank leaves a peer hanging.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
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


def _worker(rank, world_size, port, fn, args, out_dir, all_ranks=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # N ranks share few cores

    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    try:
        result = fn(rank, world_size, *args)
        if rank == 0 or all_ranks:
            torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))
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

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args, attempts: int = 3,
                    all_ranks: bool = False) -> Any:
    """Call fn(rank, world_size, *args) on world_size gloo ranks; return rank 0's result, or with
    all_ranks=True the list [result of rank 0, ..., result of rank world_size-1] (None where a
    rank returned None). Results go through torch.save / torch.load(weights_only=True).
    fn must be importable (module-level) for spawn. free_port() can race with another process
    taking the port before rank 0 binds it: that one failure is retried on a new port."""
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir, all_ranks),
                         nprocs=world_size, join=True)
            except Exception as e:
                errs = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                        if f.startswith("error")]
                text = "\n".join(errs) or str(e)
                if "address already in use" in text.lower() and attempt + 1 < attempts:
                    continue
                raise RuntimeError("distributed run failed:\n" + text) from e
            results = []
            for rank in range(world_size if all_ranks else 1):
                path = os.path.join(out_dir, f"result{rank}.pt")
                if not os.path.exists(path):
                    raise RuntimeError(f"distributed run: rank {rank} finished without saving a result")
                results.append(torch.load(path, weights_only=True))
            return results if all_ranks else results[0]


class ThreadAllGather:
    """An all-gather among R threads of one process, for code that takes an exchange callable
    (data/packing.py PackBalance): rank(r) returns rank r's exchange, (n,) -> (R, n). The jobs'
    exchange is a collective (parallel/dims.py row_exchange); this one lets a test drive several
    DP ranks' loaders, each in its own thread, without processes."""

    def __init__(self, world_size: int):
        import threading
        self.rows: list = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=60)

    def rank(self, r: int) -> Callable:
        import numpy as np

        def exchange(row):
            self.rows[r] = np.asarray(row, dtype=np.float64)
            self.barrier.wait()
            out = np.stack(self.rows)
            self.barrier.wait()  # nobody overwrites a row before every rank has read them all
            return out
        return exchange


def run_threads(fns: list[Callable[[], Any]]) -> list:
    """Call each fn in its own thread; their results in order (the first error re-raised)."""
    import threading
    out: list = [None] * len(fns)
    errs: list = []

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:
            errs.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errs:
        raise errs[0]
    return out
