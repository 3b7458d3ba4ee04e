"""What the jobs print: sora_dist's own lines (rank 0) and progress bars, not other libraries'
import-time noise. Every entry point calls `quiet_third_party` before those libraries load;
`logging.verbose=true` (train) or `verbose=true` (encode, sample, `sora-demo --verbose`) keeps
everything.

The noise, all of it logged (never an error): torchao's "Failed to load ..._C_*.so" (CUDA-only
kernels on a CPU install) and "Detected no triton", torch's pytree deprecation notes triggered
by torchao's enum registration, diffusers' "Unable to import torchao Tensor objects" and
"install accelerate" hints, transformers' advisory warnings.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("sora_dist")

# Loggers of libraries that warn at import or load time about things sora_dist does not use.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_third_party(verbose: bool = False) -> None:
    """Raise other libraries' log thresholds to errors (no-op when verbose). Environment
    variables already set by the user win."""
    if verbose:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Read when diffusers / transformers configure their loggers (on first import).
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def setup_console(rank: int) -> None:
    """Console logging on rank 0 only; other ranks keep warnings."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
