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

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sora_dist.parallel.pipeline import stage_ids_for_rank  # noqa: E402
from sora_dist.parallel.spawn import run_distributed  # noqa: E402

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_zb", 2), ("zbv", 2)]
COST = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}


def simulate(order: dict, stage_of_rank: dict) -> tuple[float, float]:
    """(bubble by replay with costs, bubble by empty table slots)."""
    ranks = sorted(order)
    tables = {r: [a for a in order[r]] for r in ranks}
    slots = sum(len(t) for t in tables.values())
    empty = sum(1 for t in tables.values() for a in t if a is None)
    n_stages = sum(len(v) for v in stage_of_rank.values())
    done: dict = {}
    pos = {r: 0 for r in ranks}
    free_at = {r: 0.0 for r in ranks}
    busy = {r: 0.0 for r in ranks}

    def deps(kind, s, m):
        if kind == "F":
            return [("F", s - 1, m)] if s > 0 else []
        if kind in ("B", "I"):
            up = [("B", s + 1, m), ("I", s + 1, m)] if s < n_stages - 1 else []
            return [("F", s, m)] + ([up] if up else [])
        return [("I", s, m)]

    # Numbered by occurrence, not by the table's own index: torch's tables for the single-stage
    # schedules are for display and label some microbatches off by one.
    seen: dict = {}
    progress = True
    while progress:
        progress = False
        for r in ranks:
            t = tables[r]
            while pos[r] < len(t):
                a = t[pos[r]]
                if a is None or a.computation_type.value not in COST:
                    pos[r] += 1
                    continue
                kind, s = a.computation_type.value, a.stage_index
                m = seen.get((kind, s), 0)  # every stage runs each kind in microbatch order
                seen[(kind, s)] = m + 1
                ready = 0.0
                ok = True
                for d in deps(kind, s, m):
                    if isinstance(d, list):  # either a full or an input backward upstream
                        hit = [done[x] for x in d if x in done]
                        if not hit:
                            ok = False
                            break
                        ready = max(ready, min(hit))
                    elif d in done:
                        ready = max(ready, done[d])
                    else:
                        ok = False
                        break
                if not ok:
                    seen[(kind, s)] = m
                    break
                start = max(ready, free_at[r])
                free_at[r] = start + COST[kind]
                busy[r] += COST[kind]
                done[(kind, s, m)] = free_at[r]
                pos[r] += 1
                progress = True
    if any(pos[r] < len(tables[r]) for r in ranks):
        stuck = {r: str(tables[r][pos[r]]) for r in ranks if pos[r] < len(tables[r])}
        raise RuntimeError(f"replay stalled at {stuck}: dependency model does not fit this table")
    makespan = max(free_at.values())
    return 1 - sum(busy.values()) / (len(ranks) * makespan), empty / slots


def _worker(rank, world, microbatches):
    from torch.distributed import pipelining as P

    out = {}
    for name, virtual in SCHEDULES:
        ids = stage_ids_for_rank(rank, world, virtual, name)
        n_stages = world * virtual
        stages = [P.PipelineStage(nn.Linear(4, 4), s, n_stages, torch.device("cpu")) for s in ids]
        cls = {"gpipe": P.ScheduleGPipe, "1f1b": P.Schedule1F1B,
               "interleaved_1f1b": P.ScheduleInterleaved1F1B,
               "interleaved_zb": P.ScheduleInterleavedZeroBubble,
               "zbv": P.ScheduleZBVZeroBubble}[name]
        sched = cls(stages[0] if virtual == 1 else stages, microbatches, loss_fn=lambda a, b: a.sum())
        order = sched.pipeline_order
        stage_of_rank = {r: stage_ids_for_rank(r, world, virtual, name) for r in range(world)}
        out[name] = simulate(order, stage_of_rank)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    a = ap.parse_args()
    print(f"{'pp':>3} {'mb':>3} {'schedule':<18} {'bubble (replay)':>16} {'empty slots':>12} {'1F1B textbook':>14}")
    for pp in a.pp:
        for mb in a.microbatches:
            res = run_distributed(_worker, pp, mb)
            book = (pp - 1) / (mb + pp - 1)
            for name, _ in SCHEDULES:
                rep, slots = res[name]
                print(f"{pp:>3} {mb:>3} {name:<18} {rep:>16.3f} {slots:>12.3f} {book:>14.3f}")


if __name__ == "__main__":
    main()
