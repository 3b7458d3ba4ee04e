#!/usr/bin/env bash
# The checks only a GPU can do, as one prepared run (~6-8 min on one H100/H200):
#
#   bash tools/gpu_check.sh [OUT_DIR]          # in the repo root; PYTHON=python3 by default
#
#   1. environment: GPU, driver, torch/CUDA, which optional packages import;
#   2. the CUDA block kernels of ring attention (flash / memory-efficient, with LSE) against
#      full attention, the rest of the attention-seam tests, and packed self-attention through
#      varlen_attn against per-sample SDPA, on the GPU;
#   3. tools/bench_step.py at 32k tokens (2 blocks, hidden 3072, 24 heads, bf16): each SDPA
#      kernel, then the best with per-block compile and torchao FP8 linears, then the cost of
#      recompute none / op / full: TFLOP/s, MFU and memory;
#   4. the real trainer on CUDA (bf16 autocast, one rank over NCCL, synthetic data, XL blocks
#      at 4k tokens): step lines with tok/s, MFU and memory, then a rerun that resumes from the
#      step-10 checkpoint: step 11 must repeat exactly; later steps within bf16 noise (CUDA's
#      flash / memory-efficient attention backward accumulates with atomics: not bitwise).
# Logs go to OUT_DIR (default $OUT, else ./gpu_check_out). Steps never stop the script: each
# prints its own failure. Needs torch with CUDA; hydra-core/omegaconf (trainer), torchao (FP8
# linears) and transformer-engine (FP8 attention) are optional per step. A machine that cannot
# download can take them as wheels: see tools/gpu_wheels.sh.
set -uo pipefail
OUT_DIR=${1:-${OUT:-gpu_check_out}}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels (tools/gpu_wheels.sh)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step() { echo; echo "=== $* ($(date +%T)) ==="; }

step "1. environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(),
      "| capability", torch.cuda.get_device_capability())
for m in ("omegaconf", "hydra", "torchao", "transformer_engine", "webdataset", "wandb"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m}: {getattr(mod, '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001
        print(f"  {m}: missing ({type(e).__name__})")
EOF

step "2. attention seam on CUDA (ring block kernels vs full attention)"
$PY -m pytest -q -p no:cacheprovider tests/unit/test_cp_kernels.py tests/unit/test_attention_backends.py 2>&1 \
    | tee "$OUT_DIR/pytest_attention.txt" | tail -5
echo "--- packed self-attention: varlen_attn (flash) vs one SDPA call per sample"
$PY -m pytest -q -p no:cacheprovider tests/unit/test_packing_model.py -k cuda 2>&1 \
    | tee "$OUT_DIR/pytest_varlen.txt" | tail -3

step "3. bench_step: 2 blocks, hidden 3072, 24 heads, 32768 tokens, bf16"
BENCH=(tools/bench_step.py --tokens 32768 --hidden 3072 --heads 24 --blocks 2 --warmup 2 --iters 5)
for k in auto cudnn flash; do
    echo "--- --sdpa-kernel $k"
    $PY "${BENCH[@]}" --sdpa-kernel "$k" 2>&1 | tee "$OUT_DIR/bench_$k.txt" | grep -E "^ *(bf16|fp8|fp8-lin) |unavailable|Error"
done
BEST=$(for k in auto cudnn flash; do
    awk -v k="$k" '$1 == "bf16" {print $2, k}' "$OUT_DIR/bench_$k.txt"; done | sort -n | head -1 | cut -d' ' -f2)
echo "--- fastest SDPA kernel: ${BEST:-none}; with per-block compile (+ torchao FP8 linears if available)"
$PY "${BENCH[@]}" --sdpa-kernel "${BEST:-auto}" --compile 2>&1 | tee "$OUT_DIR/bench_compile.txt" | tail -4
echo "--- cost of activation checkpointing (none / op-level SAC / full), fastest kernel, no compile"
$PY "${BENCH[@]}" --sdpa-kernel "${BEST:-auto}" --recompute none,op,full 2>&1 | tee "$OUT_DIR/bench_recompute.txt" | tail -4

step "4. trainer on CUDA: XL blocks (hidden 1152, 4 of them), 4096 tokens/sample, bf16"
RUN=/tmp/sora_gpu_check_run
rm -rf "$RUN"
TRAIN=($PY -m sora_dist.train train.run_dir=$RUN train.steps=20 train.ckpt_every=10
       logging.log_every=5 train.device=${GPU_CHECK_DEVICE:-cuda} model.flavor=${GPU_CHECK_FLAVOR:-XL}
       model.depth=4 "data.synthetic_buckets=[${GPU_CHECK_BUCKET:-[16,32,32]}]" data.batch_size=2
       logging.wandb_mode=disabled)
"${TRAIN[@]}" 2>&1 | tee "$OUT_DIR/train_first.txt" | grep -E "step |Error|error" | tail -6
# Drop the last checkpoint: the rerun resumes at step 10 and repeats steps 11-20.
rm -rf "$RUN/checkpoints/step_00000020"
"${TRAIN[@]}" 2>&1 | tee "$OUT_DIR/train_resume.txt" | grep -E "resumed|step |Error|error" | tail -4
$PY - "$RUN" <<'EOF2'
import json, sys
by_step = {}
for line in open(f"{sys.argv[1]}/metrics.jsonl"):
    r = json.loads(line)
    by_step.setdefault(r["step"], []).append(r["loss"])
again = {s: v for s, v in by_step.items() if len(v) > 1}
if not again:
    print("no step was re-run: the resume did not happen")
else:
    first = min(again)
    rel = max(abs(v[-1] - v[0]) / abs(v[0]) for v in again.values())
    print(f"re-run steps {first}..{max(again)}: step {first} "
          f"{'identical' if len(set(again[first])) == 1 else 'DIFFERS'}; max relative loss change {rel:.2e}")
EOF2
step "done"
