"""Plan a parallel layout for VideoDiT training: memory per GPU, FLOPs, step time, a pick.

    python tools/plan.py --flavor 7B --tokens 460000 --gpus 64 --mem-gib 80
    python tools/plan.py --hidden 3072 --depth 34 --heads 24 --tokens 460000 --gpus 64 --attn-dtype fp8
    python tools/plan.py --flavor wan2.1-14b --frames 81 --height 720 --width 1280 --gpus 8 --mem-gib 80
    python tools/plan.py --flavor 7B --tokens-per-rank 460000 --gpus 64   # packing: one pack per DP rank
    python tools/plan.py --calibrate        # planner vs measured saved bytes of tiny real models (CPU)

Wan flavors (wan2.1-1.3b, wan2.1-14b, wan2.2-5b, wan2.2-a14b: one expert) plan full fine-tuning of
the released weights; their inputs default to Wan's (umT5 4096 x 512 caption tokens, the flavor's
latent channels). --frames/--height/--width give the token count through the VAE's compression
(Wan2.1 VAE 4x8x8, Wan2.2's 48-channel VAE 4x16x16) and the patch.

Enumerates tp x cp x pp x dp = gpus with recompute none/op/selective/full (FSDP2 over dp*cp),
rejects layouts that break divisibility or do not fit with --headroom, prints the fitting ones
by throughput and recommends one (sora_dist/planning/ has the formulas and their sources).
Step time = executed FLOPs / (gpus x peak x --mfu), times the 1F1B bubble; communication is
not modelled beyond what --mfu absorbs.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys

from sora_dist import planning as P
from sora_dist.models.packing import microbatch_tokens_bound


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model (a flavor, or explicit sizes that override it)")
    m.add_argument("--flavor", default="7B", help="config/model.py FLAVORS key (default 7B)")
    m.add_argument("--hidden", type=int)
    m.add_argument("--depth", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--mlp-ratio", type=float, help="MLP width / hidden (default: the flavor's, 4)")
    m.add_argument("--text-dim", type=int, help="text encoder width (default: T5-XXL/umT5 4096)")
    m.add_argument("--text-len", type=int,
                   help=f"caption tokens per sample (default {P.CAPTION_TOKENS}; Wan flavors 512)")
    m.add_argument("--in-channels", type=int,
                   help=f"VAE latent channels (default {P.LATENT_CHANNELS}; the Wan flavor's)")
    w = ap.add_argument_group("workload and machine")
    w.add_argument("--tokens", type=int, default=None,
                   help="video tokens per sample (default 460,000; with --tokens-per-rank: N)")
    w.add_argument("--frames", type=int, help="video frames (with --height/--width: sets --tokens)")
    w.add_argument("--height", type=int)
    w.add_argument("--width", type=int)
    w.add_argument("--vae-stride", type=str, default=None,
                   help="VAE compression t,h,w (default 4,8,8; wan2.2-5b 4,16,16)")
    w.add_argument("--micro-batch", type=int, default=1, help="samples per microbatch")
    w.add_argument("--tokens-per-rank", type=int, default=None, metavar="N",
                   help="packing (data.packing=true data.tokens_per_rank=N): each DP rank's micro-batch "
                        "is one pack of up to N tokens of whole samples. Planned for a pack's worst case, "
                        "samples as long as the longest (one N-token sample without --frames/--height/"
                        "--width): attention is quadratic in a sample's length and the saved activations "
                        "linear in tokens, so a pack of shorter samples costs no more FLOPs or activation "
                        "memory, except one caption per sample (a pack of many images holds more caption "
                        "tokens: plan --text-len for that if captions are long). Replaces --tokens and "
                        "--micro-batch; --frames/--height/--width then give the longest sample, which N "
                        "must hold. CP/TP shard a pack like a sample. With pp > 1 "
                        "a pack's samples are dealt to the microbatches, all padded to the largest: each "
                        "is planned as one sample of the most tokens that can reach one (N / microbatches "
                        "+ about the longest sample; models/packing.py microbatch_tokens_bound), and "
                        "tokens/s counts the pack's N tokens only")
    w.add_argument("--microbatches", type=int, default=None,
                   help="microbatches per step with PP (default 2*pp; 1 without PP)")
    w.add_argument("--gpus", type=int, default=64)
    w.add_argument("--gpus-per-node", type=int, default=P.GPUS_PER_NODE)
    w.add_argument("--mem-gib", type=float, default=80.0, help="memory per GPU")
    w.add_argument("--attn-dtype", choices=("bf16", "fp8"), default="bf16",
                   help="fp8: transformer-engine FP8 attention (q/k/v/o in fp8, fp8 peak)")
    w.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM 989)")
    w.add_argument("--peak-tflops-fp8", type=float, default=1979.0)
    w.add_argument("--cp-mode", choices=P.PLANNER_CP_MODES, default="auto",
                   help="CP attention; auto: Ulysses if heads divide, else hybrid in-node Ulysses x ring")
    w.add_argument("--mfu", type=float, default=0.4, help="achieved share of peak on executed FLOPs")
    w.add_argument("--headroom", type=float, default=0.10, help="share of memory kept free")
    w.add_argument("--reserve-gib", type=float, default=3.0, help="CUDA context, NCCL, allocator")
    w.add_argument("--no-ema", action="store_true", help="train.ema_decay=0 (no fp32 EMA copy)")
    o = ap.add_argument_group("output")
    o.add_argument("--top", type=int, default=15, help="fitting layouts to print")
    o.add_argument("--all", action="store_true", help="print every layout, rejected ones too")
    o.add_argument("--calibrate", action="store_true",
                   help="measure saved bytes of tiny real VideoDiTs on CPU against the estimate")
    return ap.parse_args(argv)


HEADER = (f"{'tp':>3} {'cp':>4} {'mode':>8} {'pp':>3} {'dp':>3} {'rc':>9} {'mb':>3} | "
          f"{'param':>6} {'grad':>6} {'optim':>6} {'ema':>5} {'fsdp':>5} {'act':>7} {'bwd':>6} "
          f"{'rsv':>4} {'total':>7} | {'PFLOP':>7} {'step s':>8} {'tok/s':>9}  status")


def row(p: P.Plan) -> str:
    lay = p.layout
    mode = lay.cp_mode if lay.cp > 1 else "-"
    mode = f"{mode}{lay.ulysses}" if lay.cp_mode == "hybrid" and lay.cp > 1 else mode
    head = (f"{lay.tp:>3} {lay.cp:>4} {mode:>8} {lay.pp:>3} {lay.dp:>3} {lay.recompute:>9} "
            f"{lay.microbatches:>3} | ")
    if not p.mem:
        return head + f"rejected: {p.why}"
    g = p.mem
    return head + (f"{g['params']:6.2f} {g['grads']:6.2f} {g['optim']:6.2f} {g['ema']:5.2f} "
                   f"{g['fsdp_buffers']:5.2f} {g['activations']:7.1f} {g['bwd_transient']:6.1f} "
                   f"{g['reserve']:4.1f} {p.total_gib:7.1f} | {p.model_tflop / 1e3:7.1f} "
                   f"{p.step_s:8.2f} {p.tokens_per_s:9.0f}  " + ("fits" if p.ok else p.why))


def calibrate() -> int:
    """Planner vs saved_tensors_hooks on tiny real models (CPU fp32), both SDPA backends."""
    # torch only here: planning itself is torch-free so the plan prints in milliseconds.
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sora_dist.planning import measure

    torch.set_num_threads(1)
    dit = P.DiTArgs
    cases = [  # (dims, caption tokens, latent T/H/W, batch, recompute)
        (dit(hidden_size=48, depth=1, num_heads=4, text_dim=24), 7, (3, 8, 10), 2, "none"),
        (dit(hidden_size=64, depth=2, num_heads=4, text_dim=32), 16, (4, 16, 16), 1, "none"),
        (dit(hidden_size=96, depth=3, num_heads=6, text_dim=32), 12, (2, 16, 24), 2, "none"),
        (dit(hidden_size=64, depth=4, num_heads=4, text_dim=32), 16, (4, 16, 16), 2, "selective"),
        (dit(hidden_size=64, depth=4, num_heads=4, text_dim=32), 16, (4, 16, 16), 2, "full"),
        (dit(hidden_size=96, depth=3, num_heads=6, text_dim=32), 12, (2, 16, 24), 2, "op"),
    ]
    print(f"{'backend':>7} {'D':>4} {'depth':>5} {'S':>5} {'B':>2} {'rc':>9} {'measured':>11} "
          f"{'estimate':>11} {'err':>7}")
    worst = 0.0
    for backend, kernel in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
        for m, text_len, grid, b, rc in cases:
            if rc == "op" and backend == "math":
                continue  # op-level SAC is modelled for fused attention kernels only
            torch.manual_seed(0)
            model = measure.build_model(m, rc)
            inputs = measure.tiny_inputs(m, grid, b, text_len)
            with sdpa_kernel([kernel]):
                # op keeps its outputs in the checkpoint's cache, not as saved tensors
                meas = (measure.live_bytes_of(lambda: model(*inputs)) if rc == "op"
                        else measure.measure_saved_bytes(model, inputs))
            seq = grid[0] * grid[1] * grid[2] // m.patch_volume
            est = P.estimate_saved_bytes(m, seq, text_len, b, rc, backend)
            err = est / meas - 1
            worst = max(worst, abs(err))
            print(f"{backend:>7} {m.hidden_size:>4} {m.depth:>5} {seq:>5} {b:>2} {rc:>9} {meas:>11,} "
                  f"{int(est):>11,} {err:>+7.2%}")
    print(f"worst |error| {worst:.2%} (full recompute: the checkpoint holds the RoPE table and the "
          "projected caption by reference, not as saved tensors; the estimate counts them)")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.calibrate:
        return calibrate()
    m = P.flavor_model(a.flavor, hidden_size=a.hidden, depth=a.depth, num_heads=a.heads,
                       mlp_ratio=a.mlp_ratio, text_dim=a.text_dim, in_channels=a.in_channels)
    if a.text_len is None:
        a.text_len = P.WAN_TEXT_TOKENS if m.arch == "wan" else P.CAPTION_TOKENS
    if a.frames is not None or a.height is not None or a.width is not None:
        if None in (a.frames, a.height, a.width):
            print("--frames, --height and --width go together", file=sys.stderr)
            return 2
        stride = (tuple(int(x) for x in a.vae_stride.split(",")) if a.vae_stride
                  else P.vae_stride(a.flavor))
        a.tokens = P.video_tokens(m, a.frames, a.height, a.width, stride)
        print(f"video {a.frames} frames x {a.height}x{a.width} -> VAE {stride} -> patch "
              f"{tuple(m.patch_size)}: {a.tokens:,} tokens")
    if a.tokens is None:
        a.tokens = a.tokens_per_rank or 460_000
    if a.tokens_per_rank is not None:
        problem = packing_problem(a)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        longest, a.tokens = a.tokens, a.tokens_per_rank
    hw = P.Hardware(a.gpus, a.mem_gib, a.peak_tflops, a.peak_tflops_fp8, a.mfu, a.gpus_per_node,
                    a.reserve_gib, a.headroom)
    plans = P.plan_all(m, hw, a.tokens, a.micro_batch, a.attn_dtype, a.microbatches, not a.no_ema,
                       a.cp_mode, a.text_len)
    if a.tokens_per_rank is not None:
        plans = [plan_packing(p, m, hw, a, longest) for p in plans]
    f = m.forward_flops(a.tokens, a.text_len)
    print(f"model: {m.arch} ({a.flavor}), hidden {m.hidden_size}, depth {m.depth}, heads {m.num_heads} (head dim "
          f"{m.head_dim}), mlp {m.mlp_width}, text {a.text_len}x{m.text_dim}: "
          f"{m.num_params() / 1e9:.2f} B params")
    print(f"per sample of {a.tokens:,} tokens: forward {f.total / 1e15:.2f} PFLOP, attention "
          f"{f.attention / f.total:.1%} of it; fwd+bwd = 3x forward")
    prec = P.PRECISIONS["cuda_fp8attn" if a.attn_dtype == "fp8" else "cuda_bf16"]
    acts = P.block_activations(m, "flash", prec, a.tokens, a.text_len)
    print(f"saved for backward per token per block (bf16 autocast, flash attention): "
          f"{acts.seq_sharded + acts.gathered + acts.head_sharded:,.0f} B = residual side "
          f"{acts.seq_sharded:,.0f} (/tp with SP) + gathered linear inputs {acts.gathered:,.0f} "
          f"(whole on every TP rank) + attention/MLP {acts.head_sharded:,.0f} (/tp); all /cp")
    print(f"machine: {a.gpus} GPUs x {a.mem_gib:g} GiB, peak {a.peak_tflops:g} bf16 / "
          f"{a.peak_tflops_fp8:g} fp8 TFLOP/s, MFU {a.mfu:g}, attention in {a.attn_dtype}; "
          f"micro-batch {a.micro_batch}; memory columns in GiB per GPU (worst PP stage)")
    if a.tokens_per_rank is not None:
        shapes = sorted({(p.layout.pp > 1, p.layout.microbatches): pack_shape(a, longest, p.layout)
                         for p in plans}.items())
        print(f"packing: data.tokens_per_rank={a.tokens_per_rank:,} per DP rank = one pack per step, longest "
              f"sample {longest:,} tokens; planned at its worst case, samples as long as the longest "
              "(attention is quadratic per sample): "
              + "; ".join(f"{'pp > 1, ' + str(mb) + ' microbatches of' if pipe else 'pp=1, each microbatch one pack of'} "
                          f"{k} x {n:,} tokens" for (pipe, mb), (k, n) in shapes)
              + " (pp > 1: split_pack's padded microbatch length, models/packing.py microbatch_tokens_bound); "
              "tokens/s counts the pack's tokens (mixed sets fill ~99%: tests/unit/test_packing.py)")
    print()
    fits = sorted((p for p in plans if p.ok), key=lambda p: -p.tokens_per_s)
    shown = plans if a.all else fits[: a.top]
    print(HEADER)
    for p in shown:
        print(row(p))
    if not a.all:
        print(f"... {len(fits)} of {len(plans)} layouts fit; {len(plans) - len(fits)} rejected")
        reasons = collections.Counter(_reason_kind(p.why) for p in plans if not p.ok)
        for why, n in reasons.most_common():
            print(f"    {n:4d} x {why}")
    best = P.recommend(plans)
    print()
    if best is None:
        print("no layout fits: add GPUs, shorten the sequence or use --attn-dtype fp8")
        return 1
    lay = best.layout
    cp_txt = f"cp={lay.cp} ({lay.cp_mode}" + (f", ulysses {lay.ulysses}" if lay.cp_mode == "hybrid" else "") + ")"
    print(f"recommended: tp={lay.tp} {cp_txt} pp={lay.pp} dp={lay.dp} recompute={lay.recompute}"
          f" microbatches={lay.microbatches}: {best.total_gib:.1f} GiB of {a.mem_gib:g}, "
          f"step {best.step_s:.2f} s, {best.tokens_per_s:,.0f} tokens/s, "
          f"model MFU {best.model_tflop / (best.step_s * a.gpus * a.peak_tflops):.1%} (bf16 peak)")
    print("  activations (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in best.activation_parts.items()))
    print(f"  parallel.tp={lay.tp} parallel.cp={lay.cp} parallel.cp_mode={lay.cp_mode}"
          + (f" parallel.ulysses_degree={lay.ulysses}" if lay.cp_mode == "hybrid" else "")
          + f" parallel.pp={lay.pp} parallel.dp={lay.dp} train.activation_checkpointing={lay.recompute}"
          + (f" data.packing=true data.tokens_per_rank={a.tokens_per_rank}" if a.tokens_per_rank is not None else ""))
    print_sampling(a, m, lay)
    return 0


def print_sampling(a, m, lay) -> None:
    """sora-sample with the training layout's model split (tp x cp, parallel/inference.py): per
    denoising step the CFG pair's forwards (2x forward FLOPs; cfg_parallel=true puts them on two
    groups), no gradients or optimizer state; bf16 weights whole per TP shard (no FSDP); the
    largest transient is one block's working set on this rank's tokens. A planner estimate at
    the same MFU, not a measurement (tools/bench_sample.py measures on this machine)."""
    tokens, group = a.tokens, lay.tp * lay.cp
    fwd = m.forward_flops(tokens, a.text_len).total
    peak = a.peak_tflops_fp8 if a.attn_dtype == "fp8" else a.peak_tflops
    step_s = 2 * fwd / (group * peak * 1e12 * a.mfu)
    weights = m.num_params() * 2 / lay.tp / 2**30
    # one block's forward working set per token: residual, norm, q/k/v/o, MLP hidden (bf16)
    act = tokens / lay.cp * (8 * m.hidden_size + 2 * m.mlp_width / lay.tp) * 2 / 2**30
    groups = max(a.gpus // group, 1)
    print(f"sampling ({tokens:,} tokens, tp={lay.tp} cp={lay.cp} per video; 2x forward per step with "
          f"CFG): {step_s:.2f} s/step on {group} GPUs, {50 * step_s / 60:.1f} min for 50 steps; "
          f"weights {weights:.1f} GiB + ~{act:.1f} GiB working set per GPU; {groups} videos at once "
          f"on {a.gpus} GPUs ({groups // 2 if groups > 1 else 1} with cfg_parallel=true, each step "
          f"{step_s / 2:.2f} s)")


def packing_problem(a) -> str:
    """'' when --tokens-per-rank can be planned with the other arguments, else why not."""
    if a.tokens_per_rank < 1:
        return f"--tokens-per-rank={a.tokens_per_rank}: the token budget must be >= 1"
    if a.micro_batch != 1:
        return (f"--micro-batch {a.micro_batch} with --tokens-per-rank: a pack is the micro-batch; "
                "raise --tokens-per-rank instead")
    if a.tokens > a.tokens_per_rank:
        return (f"--tokens-per-rank={a.tokens_per_rank:,} cannot hold the longest sample ({a.tokens:,} tokens "
                f"from --tokens or --frames/--height/--width): raise it to >= {a.tokens:,}")
    return ""


def pack_shape(a, longest: int, lay) -> tuple[int, int]:
    """(samples, tokens each) a layout's microbatch is planned as under packing. Its tokens L: the
    pack's N, or with pp > 1 split_pack's padded microbatch length (at most
    microbatch_tokens_bound(N, longest, mb)). Its worst case holds as many longest samples as
    fit and the rest in one (with pp, padding is a run of its own): attention, quadratic per
    sample, then costs q x longest^2 + r^2 (L = q x longest + r). The planner's microbatch is k
    equal samples, so k = L / (that cost / L), rounded, and each sample L / k tokens: the same
    token count and, within a few per cent, the same attention work (one N-token sample when
    the longest sample is N)."""
    L = a.tokens_per_rank if lay.pp == 1 else microbatch_tokens_bound(a.tokens_per_rank, longest, lay.microbatches)
    q, r = divmod(L, longest)
    mean_len = (q * longest ** 2 + r ** 2) / L  # attention work per token of the worst case
    k = max(1, round(L / mean_len))
    return k, -(-L // k)


def plan_packing(p: P.Plan, m, hw, a, longest: int) -> P.Plan:
    """A layout re-planned for packs (pack_shape); tokens/s counts the N tokens of each pack a
    DP rank trains per step, not the padding of pipeline microbatches."""
    if not p.mem:  # rejected before any estimate (layout rules)
        return p
    k, n = pack_shape(a, longest, p.layout)
    q = P.estimate(m, p.layout, hw, n, k, a.attn_dtype, not a.no_ema, a.text_len)
    # pp=1: each of the layout's microbatches (gradient accumulation) is a pack of its own;
    # pp > 1: the microbatches are one pack dealt out
    packs = p.layout.microbatches if p.layout.pp == 1 else 1
    q.tokens_per_s = p.layout.dp * packs * a.tokens_per_rank / q.step_s
    return q


def _reason_kind(why: str) -> str:
    """Group rejection messages by their rule: numbers and the suggested fix dropped."""
    if why.startswith("needs "):
        return "does not fit in memory"
    return re.sub(r"\d+", "N", why.split(";")[0])


if __name__ == "__main__":
    sys.exit(main())
