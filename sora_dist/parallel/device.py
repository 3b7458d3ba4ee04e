"""The one device seam: which device and backend, and process-group start-up/shut-down.

Everything else asks this module for the device instead of calling torch.cuda directly, so
the same code runs on CPU/gloo (tests) and CUDA/NCCL (clusters).
"""
from __future__ import annotations

import datetime
import os
import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def resolve_device_type(pref: str = "auto") -> str:
    if pref == "cpu":
        return "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, or Slurm's srun (one task per GPU), or 1 process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        # srun launching the trainer directly: map Slurm's task ids; MASTER_ADDR/PORT come
        # from the sbatch script (first node of SLURM_JOB_NODELIST).
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def select_device(device_pref: str = "auto", local_rank: int = 0) -> torch.device:
    """This process's device: its node-local GPU (made current), or the CPU."""
    if resolve_device_type(device_pref) == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device; (0, 0) for anything else."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def init_distributed(device_pref: str = "auto", backend: str = "auto", timeout_s: int = 600) -> DistEnv:
    """Start the default process group when launched with >1 process; pick the device."""
    rank, world, local_rank = read_launch_env()
    device = select_device(device_pref, local_rank)
    dtype = device.type
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dtype == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if dtype == "cuda" else None,
        )
    return DistEnv(rank, world, local_rank, device)


def side_stream(device: torch.device):
    """A second stream on `device` for communication that overlaps compute (transformer-engine's
    context-parallel attention takes one), or None where there are no streams (CPU)."""
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def shutdown_distributed(clean: bool = True) -> None:
    """Barrier (clean exit, so no rank leaves a peer mid-collective) then destroy the group.
    After a failure the peers may be gone: skip the barrier, it would only raise again."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def is_comm_failure(err: BaseException) -> bool:
    """A collective that failed because a peer died, hung past the timeout or lost its link
    (not any error that merely mentions NCCL, such as an out-of-memory inside it)."""
    text = str(err).lower()
    if "out of memory" in text:
        return False
    return isinstance(err, getattr(dist, "DistNetworkError", ())) or any(
        s in text for s in ("connection reset", "connection closed", "connection refused", "broken pipe",
                            "timed out", "collective operation timeout", "remote process exited"))


def autocast(device: torch.device, mixed_precision: str):
    """bf16 autocast on GPU; CPU runs fp32 (CPU bf16 is slow and only used for tests)."""
    enabled = device.type == "cuda" and mixed_precision == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def memory_stats(device: torch.device) -> dict:
    """Peak allocated memory in GiB on GPU; process RSS high-water mark on CPU."""
    if device.type == "cuda":
        return {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:
        return {"mem_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except Exception:
        return {}


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_tflops(device: torch.device, configured: float = 0.0) -> float:
    """Dense bf16 peak of one device, for MFU; 0 when unknown."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in PEAK_BF16_TFLOPS.items():
            if key in name:
                return v
    return 0.0
