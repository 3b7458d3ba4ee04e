"""tools/bench_pack.py at tiny sizes: every figure is printed, and packing's padding and DP
imbalance are no worse than bucket batching's (properties of the data layout, not timings)."""
import json
import pathlib
import re
import subprocess
import sys

TOOL = pathlib.Path(__file__).parents[2] / "tools" / "bench_pack.py"
TINY = ["--hidden", "32", "--depth", "1", "--heads", "2", "--text-len", "4", "--text-dim", "8",
        "--frames", "1,2,3", "--aspects", "4x6,6x4,4x4", "--window", "16", "--steps", "8",
        "--dp", "2,4", "--warmup", "1", "--repeats", "1", "--attention-cost", "1"]


def test_bench_pack_prints_every_figure_and_packing_pads_and_imbalances_less(tmp_path):
    out_json = tmp_path / "figures.json"
    run = subprocess.run([sys.executable, str(TOOL), *TINY, "--json", str(out_json)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    # the mix, the budget/bucket table and the method are stated
    assert "mix: the stream's first" in out and "token share" in out and "bucket bs" in out
    assert "budget N = 1 x longest sample (18 tokens)" in out
    assert "floor(N / bucket tokens)" in out and "median of 1" in out
    header = "dp mode steps samples tokens time s tok/s x bucket padding dp wait imb mean imb max flop imb T=1 tok"
    assert header in " ".join(out.split())
    modes = ("bucket", "pack/tok", "packing")
    rows = {(r[0], r[1]): r for r in (ln.split() for ln in out.splitlines())
            if len(r) == 14 and r[0].isdigit() and r[1] in modes}
    assert set(rows) == {(d, m) for d in ("2", "4") for m in modes}
    for d in ("2", "4"):
        assert re.search(rf"dp={d}: tokens/s packing/bucket [\d.]+x .*padding [\d.]+% \| [\d.]+% .*imbalance mean "
                         r"[\d.]+ worst [\d.]+ \| [\d.]+ worst [\d.]+", out)
    fig = json.loads(out_json.read_text())
    # the printed mix covers the stream: shares of a whole
    shares = [float(r[5].rstrip("%")) for r in (ln.split() for ln in out.splitlines())
              if len(r) == 8 and r[0].isdigit()]
    assert len(shares) == len(fig["mix"]) and abs(sum(shares) - 100) < 0.5
    for d in ("2", "4"):
        b, t, p = (fig["dp"][d][m] for m in modes)
        for f in (b, t, p):
            assert f["tokens_per_s"] > 0 and f["steps"] == 8 and f["ranks"] == int(d)
            assert 0 <= f["padding"] < 1 and 0 <= f["dp_wait"] < 1 and f["imbalance_max"] >= f["imbalance_mean"] >= 1
            assert f["flop_imbalance_max"] >= f["flop_imbalance_mean"] >= 1
        # token packs fill the budget and balance tokens better than bucket batches; the balanced
        # packs balance the modelled step cost better than both (layout properties, not timings)
        assert t["padding"] <= b["padding"]
        assert t["imbalance_mean"] <= b["imbalance_mean"] and t["imbalance_max"] <= b["imbalance_max"]
        assert p["flop_imbalance_mean"] <= t["flop_imbalance_mean"]
        assert p["flop_imbalance_mean"] < b["flop_imbalance_mean"]
        assert fig["dp"][d]["speedup"] == p["tokens_per_s"] / b["tokens_per_s"]
        # the printed row is the JSON's figure
        assert rows[(d, "packing")][8] == f"{p['padding']:.1%}"
        assert rows[(d, "bucket")][11] == f"{b['imbalance_max']:.3f}"
        assert rows[(d, "pack/tok")][12] == f"{t['flop_imbalance_max']:.3f}"


def test_the_attention_cost_fit_recovers_a_known_cost_model():
    """fit_attention_cost on step times made by a known model (1 ms per linear GFLOP, 0.4 of that
    per attention GFLOP, 0.3 ms per sample, 5 ms per step): it recovers 0.4."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_pack", TOOL)
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    from sora_dist.config.model import DiTArgs

    class Known:
        args = DiTArgs(hidden_size=64, depth=2, num_heads=4, in_channels=4, text_dim=8)
        a = bp.parse_args(["--text-len", "4"])

        def time(self, item):
            f = [self.args.forward_flops(bp.sample_tokens(s, bp.PATCH), 4) for s in item[1]]
            lin, att = 3 * sum(x.linear for x in f), 3 * sum(x.attention for x in f)
            return 1e-12 * (lin + 0.4 * att) + 3e-4 * len(f) + 5e-3

    shapes = [(t, h, w) for t in (1, 3, 5, 9) for h, w in ((12, 20), (16, 16), (20, 12))]
    fit = bp.fit_attention_cost(Known(), shapes, 576, 32, 0)
    assert abs(fit["attention_cost"] - 0.4) < 1e-6 and abs(fit["s_per_sample"] - 3e-4) < 1e-9
    assert fit["mean_abs_residual"] < 1e-9
