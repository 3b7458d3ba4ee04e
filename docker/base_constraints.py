"""Print pip constraints that pin the base image's torch-bound packages to their installed versions.

docker/Dockerfile installs the project under these (plus the base's own /etc/pip/constraint.txt
when present), so pip either keeps NGC's CUDA torch and transformer-engine or fails the build; it
never replaces them with generic PyPI wheels. Exits 1 when torch is not installed.
"""
from __future__ import annotations

import importlib.metadata as md
import re
import sys

# Distributions compiled against a specific torch (or torch itself): never up/downgraded by pip.
KEEP = {"torch", "torchvision", "torchaudio", "triton", "torchao", "transformer-engine",
        "transformer-engine-torch", "transformer-engine-cu12", "transformer-engine-cu13",
        "flash-attn", "apex"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> list[str]:
    found = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) in KEEP:
            found.setdefault(canonical(name), f"{canonical(name)}=={dist.version}")
    return [found[k] for k in sorted(found)]


def main() -> int:
    lines = pins()
    if not any(line.startswith("torch==") for line in lines):
        print("base_constraints: torch is not installed in this image", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
