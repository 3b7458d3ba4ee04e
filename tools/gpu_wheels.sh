#!/usr/bin/env bash
# Wheels for a GPU machine that cannot download (CPython 3.12, x86-64 Linux): what
# tools/gpu_check.sh needs beyond a stock PyTorch image. Run where pip can reach an index:
#
#   bash tools/gpu_wheels.sh [DIR]     # default .whl (keep it out of git: .git/info/exclude)
#
# gpu_check.sh installs DIR/*.whl into /tmp/site by itself when DIR is ./.whl. torchao's
# version must suit the machine's torch (0.17 for torch 2.11; see torchao's compatibility table).
set -euo pipefail
DIR=${1:-.whl}
PIP=${PIP:-python3 -m pip}
TORCHAO=${TORCHAO:-torchao==0.17.0}
mkdir -p "$DIR"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" hydra-core==1.3.2 omegaconf==2.3.0 "$TORCHAO" webdataset braceexpand
$PIP wheel -q --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3  # sdist only upstream; pure Python
ls -1 "$DIR"
