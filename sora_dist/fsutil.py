"""Atomic file writes: a reader sees the old file or the whole new one, never a torn one."""
from __future__ import annotations

import os


def atomic_write_text(path: str, text: str) -> None:
    """Write to a per-process temp name, fsync, then rename over `path` (atomic on POSIX)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
