"""Atomic file writes: a reader sees the old file or the whole new one, never a torn one."""
from __future__ import annotations

import os
import shutil


def atomic_write_text(path: str, text: str) -> None:
    """Write to a per-process temp name, fsync, then rename over `path` (atomic on POSIX)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir(tmp: str, final: str) -> None:
    """Rename a finished folder `tmp` to `final`. An existing `final` is moved aside first and
    removed only after the rename, so a kill at any point leaves a complete folder under one of
    the two names, never none."""
    if os.path.exists(final):
        old = f"{final}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
