"""Time fwd+bwd of N real DiTBlocks; report achieved TFLOP/s and MFU with the planner's FLOPs.

    python tools/bench_step.py                                   # CPU: small, fp32
    python tools/bench_step.py --tokens 32768 --hidden 3072 --heads 24 --blocks 2   # one GPU

One step = forward + backward of `--blocks` DiTBlocks (models/dit.py) on `--batch` samples of
`--tokens` video tokens and `--text-len` caption tokens. FLOPs per step come from
DiTArgs.block_forward_flops (x3 for fwd+bwd), so the figure is the one the planner's
step-time estimate assumes. MFU = achieved / peak:
  * CUDA: bf16 weights (as FSDP's param_dtype) under bf16 autocast, timed with CUDA events after
    warm-up; peak --peak-tflops (default 989 bf16 / 1979 fp8, H100 SXM dense); memory is
    torch.cuda.max_memory_allocated.
  * CPU: fp32; the peak is a measured fp32 matmul rate on this machine (not a datasheet), and
    memory is the allocator high-water mark from the profiler's memory events.
Variants, each timed in the same run and printed with its speed-up over the first:
  * bf16 (fp32 on CPU): SDPA, kernel per --sdpa-kernel (model.sdpa_kernel);
  * fp8-lin: the block linears as torchao Float8Linear (model.fp8_linears=torchao), CUDA with
    compute capability >= 8.9 and torchao installed; MFU still against the bf16 peak;
  * fp8: FP8 attention + linears through transformer-engine (CoreAttention("te")).
A variant that cannot run here prints why; none is ever a relabelled bf16 run.
--compile compiles each block (train.compile).
Also printed: bytes saved for backward (saved_tensors_hooks) against the planner's estimate.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from sora_dist import planning as P
from sora_dist.config.model import SDPA_KERNELS
from sora_dist.config.train import DEVICES
from sora_dist.models.attention import CoreAttention
from sora_dist.models.dit import Conditioning, DiTArgs, DiTBlock
from sora_dist.models.embeddings import build_rope_3d
from sora_dist.models.fp8 import build_te_recipe, convert_te, convert_torchao
from sora_dist.parallel.activation_checkpoint import apply_activation_checkpointing
from sora_dist.parallel.rng import build_rng_tracker
from sora_dist.planning.measure import cpu_peak_bytes, live_bytes_of, saved_bytes_of

H100_PEAK = {"bf16": 989.0, "fp8": 1979.0}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="video tokens per sample")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--heads", type=int, default=None, help="default hidden/64")
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", choices=DEVICES, default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="bf16 peak to compute MFU against (CUDA default 989; CPU: measured)")
    ap.add_argument("--peak-tflops-fp8", type=float, default=None, help="CUDA default 1979")
    ap.add_argument("--recompute", default="none",
                    help="comma list of none|op|full (train.activation_checkpointing per block): "
                         "one row each, e.g. none,op,full")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (train.compile)")
    ap.add_argument("--sdpa-kernel", default="auto", choices=SDPA_KERNELS,
                    help="SDPA kernel tried first (model.sdpa_kernel)")
    return ap.parse_args(argv)


def fp8_attention_status(device: torch.device) -> str:
    """'' when FP8 attention can run here, else why not (from the model's own seam)."""
    if device.type != "cuda":
        return "FP8 attention needs a CUDA device with transformer-engine; this run is on CPU"
    try:
        CoreAttention("te")
    except ImportError:
        return "transformer-engine is not installed (pip install 'sora_dist[gpu]')"
    except NotImplementedError as e:
        return f"transformer-engine is installed but {e}"
    return ""


def fp8_linears_status(device: torch.device) -> str:
    """'' when torchao FP8 linears can run here at FP8 speed, else why not."""
    if device.type != "cuda":
        return "torchao FP8 linears only emulate FP8 on CPU (no speed to measure)"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "FP8 GEMMs need compute capability >= 8.9"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install torchao)"
    return ""


def cpu_matmul_peak_tflops(n: int = 1024, reps: int = 10) -> float:
    """Best fp32 GEMM rate of this CPU (2*n^3 per matmul): the CPU's practical peak. On a
    shared machine this is the rate available now, so MFU is relative to the same load."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def bench_args(a, **build) -> DiTArgs:
    """The benchmarked blocks' dimensions; the caption comes in already projected, so its
    width is the hidden size."""
    return DiTArgs(hidden_size=a.hidden, depth=a.blocks, num_heads=a.heads, mlp_ratio=a.mlp_ratio,
                   text_dim=a.hidden, **build)


class Stack(torch.nn.Module):
    def __init__(self, args: DiTArgs, n: int):
        super().__init__()
        # A ModuleDict like VideoDiT's, so models/fp8.py and parallel/activation_checkpoint.py
        # treat it the same way.
        self.blocks = torch.nn.ModuleDict({str(i): DiTBlock(args) for i in range(n)})

    def forward(self, x, cond):
        for blk in self.blocks.values():
            x = blk(x, cond)
        return x


def make_inputs(a, device, dtype):
    D, heads = a.hidden, a.heads
    g = torch.Generator().manual_seed(0)
    # A (T, H, W) grid with T*H*W = tokens: 8 frames if it divides, else one row.
    T = 8 if a.tokens % 8 == 0 else 1
    grid = (T, 1, a.tokens // T)
    cond = Conditioning(
        c_BD=torch.randn(a.batch, D, generator=g).to(device, dtype),
        text_BLD=torch.randn(a.batch, a.text_len, D, generator=g).to(device, dtype),
        text_mask_BL=torch.ones(a.batch, a.text_len, dtype=torch.bool, device=device),
        rope_SP2=build_rope_3d(grid, D // heads, device),
        grid=grid,
    )
    cond.text_mask_BL[:, a.text_len - a.text_len // 4:] = False  # padded captions
    x = torch.randn(a.batch, a.tokens, D, generator=g).to(device, dtype).requires_grad_()
    return x, cond


def run(a, device, variant: str, recompute: str) -> dict:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    attn = "fp8" if variant == "fp8" else "sdpa"
    args = bench_args(a, attention_backend="te" if attn == "fp8" else "sdpa", sdpa_kernel=a.sdpa_kernel)
    torch.manual_seed(0)
    model = Stack(args, a.blocks).to(device, dtype)  # bf16 weights = FSDP param_dtype
    # adaLN-Zero gates start at 0; random gates keep every branch's gradient alive.
    for blk in model.blocks.values():
        torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.02)
    if variant == "fp8-lin":
        convert_torchao(model)
    if variant == "fp8":  # what model.fp8_attention=true + model.fp8_linears=te set up
        recipe = build_te_recipe("current", fp8_dpa=True)
        for mod in model.modules():
            if isinstance(mod, CoreAttention):
                mod.fp8_recipe = recipe
        convert_te(model, "current")
    # Checkpointing before compile, as parallelize_dit does (compiled code under an active SAC
    # dispatch mode would otherwise run eagerly).
    apply_activation_checkpointing(model, recompute, build_rng_tracker(0, 0, 0, device.type))
    if a.compile:
        for blk in model.blocks.values():
            blk.compile()
    x, cond = make_inputs(a, device, dtype)

    def fwd():
        # FP8 regions (attention and block linears) are entered by the modules themselves.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return model(x, cond)

    def step():
        out = fwd()
        out.float().square().mean().backward()
        x.grad = None
        model.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(a.iters):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            step()
            t1.record()
            torch.cuda.synchronize()
            times.append(t0.elapsed_time(t1) / 1e3)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        for _ in range(a.iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        peak = cpu_peak_bytes(step)
    if recompute == "op":  # its outputs sit in the checkpoint's op cache, not in saved tensors
        kept = kept_bytes(fwd, device)
    else:
        kept = saved_bytes_of(fwd, model.parameters())
    return {"s": statistics.median(times), "peak": peak, "saved": kept,
            "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def kept_bytes(fwd, device) -> int:
    """Bytes a forward leaves allocated (its output excluded)."""
    if device.type != "cuda":
        return live_bytes_of(fwd)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = fwd()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before - out.numel() * out.element_size()


def bench_precision(device) -> "P.Precision":
    """The planner's profile for this run: CUDA bf16 autocast without FSDP's input cast (the
    RoPE table stays one fp32 tensor), or CPU fp32."""
    if device.type == "cuda":
        return dataclasses.replace(P.PRECISIONS["cuda_bf16"], rope_copy=0)
    return P.PRECISIONS["cpu_fp32"]


def estimate_saved(a, device, recompute: str) -> float:
    """Planner: N blocks' saved tensors plus what they share (RoPE table, caption, c); for op,
    what the forward leaves allocated (the first block's input existed before it)."""
    m = bench_args(a)
    prec = bench_precision(device)
    acts = P.block_activations(m, "flash", prec, a.tokens, a.text_len)
    S, B = a.tokens, a.batch
    if recompute == "op":
        blocks = (a.blocks * P.sac_block_bytes(m, prec, S * B, B, 1, a.text_len)
                  + (a.blocks - 1) * P.checkpoint_input_bytes(m, prec, S * B, 1))
        shared = 0.0
    elif recompute == "full":
        blocks = a.blocks * P.checkpoint_input_bytes(m, prec, S * B, 1)
        shared = 0.0  # RoPE table, caption and c are held by reference, not saved
    else:
        blocks = a.blocks * acts.bytes(S * B, B, 1)
        shared = S * m.head_dim * prec.fp32 + B * (a.text_len + 1) * a.hidden * prec.act
    return blocks + shared


def estimate_peak(a, device, saved_est: float, grad_bytes: int, recompute: str) -> float:
    """Planner: saved tensors + the recomputed block (if any) + backward's working gradients
    + the weights' gradients (allocated in backward, freed by zero_grad)."""
    m = bench_args(a)
    prec = bench_precision(device)
    S, B = a.tokens, a.batch
    rec = P.recompute_transient_bytes(m, prec, recompute, S, a.text_len, S * B, B, 1)
    return saved_est + rec + P.backward_working_bytes(m, prec, S * B, 1) + grad_bytes


def main(argv=None) -> int:
    a = parse_args(argv)
    a.heads = a.heads or max(1, a.hidden // 64)
    recomputes = [r.strip() for r in a.recompute.split(",") if r.strip()]
    bad = [r for r in recomputes if r not in ("none", "op", "full")]
    if bad or not recomputes:
        raise SystemExit(f"--recompute {a.recompute!r}: use a comma list of none, op, full")
    dev_type = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    device = torch.device(dev_type)
    cuda = dev_type == "cuda"
    m = bench_args(a)
    f = m.block_forward_flops(a.tokens, a.text_len, a.batch)
    step_flops = 3 * a.blocks * f.total
    full_extra = a.blocks * f.total  # full recompute runs each block's forward again
    if cuda:
        peaks = {"bf16": a.peak_tflops or H100_PEAK["bf16"], "fp8": a.peak_tflops_fp8 or H100_PEAK["fp8"]}
        name = torch.cuda.get_device_name(device)
        peak_src = "--peak-tflops" if a.peak_tflops else "H100 SXM dense default"
    else:
        measured = cpu_matmul_peak_tflops()
        peaks = {"bf16": a.peak_tflops or measured}
        name = f"CPU ({torch.get_num_threads()} threads)"
        peak_src = "--peak-tflops" if a.peak_tflops else f"measured fp32 1024^3 matmul: {measured:.4f} TFLOP/s"
    print(f"device: {name}; {'bf16 weights + autocast' if cuda else 'fp32'}; peak {peaks['bf16']:.4g} "
          f"TFLOP/s ({peak_src})")
    print(f"{a.blocks} DiTBlock(s): hidden {a.hidden}, heads {a.heads}, mlp x{a.mlp_ratio:g}, "
          f"{a.tokens} tokens x batch {a.batch}, caption {a.text_len}")
    print(f"planner FLOPs per step (fwd+bwd = 3x fwd): {step_flops / 1e9:.2f} GFLOP "
          f"(attention {f.attention / f.total:.1%}); full recompute executes "
          f"{(step_flops + full_extra) / 1e9:.2f} GFLOP; TFLOP/s and MFU count model FLOPs only")
    variants = ["bf16" if cuda else "fp32"]
    for v, why in (("fp8-lin", fp8_linears_status(device)), ("fp8", fp8_attention_status(device))):
        if why:
            print(f"{v}: unavailable: {why}")
        else:
            variants.append(v)
    print(f"SDPA kernel: {a.sdpa_kernel}; compile: {'on' if a.compile else 'off'}")
    print("memory (MiB): fwd+bwd peak above the inputs and weights, and the bytes saved for "
          "backward, each measured | planner")
    print(f"{'variant':>7} {'rc':>4} {'step ms':>9} {'x base':>7} {'TFLOP/s':>9} {'MFU':>7} {'peak':>8} "
          f"{'planner':>8} {'saved':>8} {'planner':>8} {'err':>7}")
    MiB = 2**20
    base_s = None
    for v in variants:
        for rc in recomputes:
            r = run(a, device, v, rc)
            base_s = base_s or r["s"]
            saved = r["saved"]
            est = estimate_saved(a, device, rc)
            tflops = step_flops / r["s"] / 1e12
            peak = peaks["fp8" if v == "fp8" else "bf16"]
            est_peak = estimate_peak(a, device, est, r["grad_bytes"], rc)
            print(f"{v:>7} {rc:>4} {r['s'] * 1e3:9.1f} {base_s / r['s']:7.2f} {tflops:9.4f} {tflops / peak:7.1%} "
                  f"{r['peak'] / MiB:8.1f} {est_peak / MiB:8.1f} {saved / MiB:8.1f} {est / MiB:8.1f} "
                  f"{est / saved - 1:+7.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
