"""Pipeline bubble fraction per schedule, from the action tables torch.distributed.pipelining
actually executes (schedule.pipeline_order), replayed with per-action costs.

    python tools/bench_pipeline.py --pp 2 4 --microbatches 4 8

Costs (forward = 1): full backward 2, input-grad backward 1, weight-grad backward 1. An action
starts when its rank is free (ranks run their table in order) and its producer is done:
F(s, m) after F(s-1, m); B/I(s, m) after B/I(s+1, m) and F(s, m); W(s, m) after I(s, m).
Communication time is ignored, so these are the schedules' own bubbles. The textbook 1F1B
figure (p-1)/(m+p-1) is printed beside them as a check.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sora_dist.parallel.bubble import SCHEDULES, schedule_bubbles  # noqa: E402
from sora_dist.testing import run_distributed  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    a = ap.parse_args()
    print(f"{'pp':>3} {'mb':>3} {'schedule':<18} {'bubble (replay)':>16} {'empty slots':>12} {'1F1B textbook':>14}")
    for pp in a.pp:
        for mb in a.microbatches:
            res = run_distributed(schedule_bubbles, pp, mb)
            book = (pp - 1) / (mb + pp - 1)
            for name, _ in SCHEDULES:
                rep, slots = res[name]
                print(f"{pp:>3} {mb:>3} {name:<18} {rep:>16.3f} {slots:>12.3f} {book:>14.3f}")


if __name__ == "__main__":
    main()
