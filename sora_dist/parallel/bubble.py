"""Pipeline bubble of each schedule, replayed from the action tables that
torch.distributed.pipelining executes (schedule.pipeline_order), with per-action costs.

Costs (forward = 1): full backward 2, input-grad backward 1, weight-grad backward 1. An action
starts when its rank is free (ranks run their table in order) and its producer is done:
F(s, m) after F(s-1, m); B/I(s, m) after B/I(s+1, m) and F(s, m); W(s, m) after I(s, m).
Communication time is ignored, so these are the schedules' own bubbles.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed import pipelining as P

from sora_dist.config.parallel import PP_ONE_STAGE_SCHEDULES, PP_SCHEDULES, pp_min_virtual_stages
from sora_dist.parallel.pipeline import SCHEDULE_CLASSES, stage_ids_for_rank

# Each schedule with the fewest stages per rank it runs.
SCHEDULES = [(s, pp_min_virtual_stages(s)) for s in PP_SCHEDULES]
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


def schedule_bubbles(rank, world, microbatches):
    """run_distributed target: {schedule: (replayed bubble, empty-slot fraction)}."""
    out = {}
    for name, virtual in SCHEDULES:
        ids = stage_ids_for_rank(rank, world, virtual, name)
        n_stages = world * virtual
        stages = [P.PipelineStage(nn.Linear(4, 4), s, n_stages, torch.device("cpu")) for s in ids]
        sched = SCHEDULE_CLASSES[name](stages[0] if name in PP_ONE_STAGE_SCHEDULES else stages, microbatches, loss_fn=lambda a, b: a.sum())
        order = sched.pipeline_order
        stage_of_rank = {r: stage_ids_for_rank(r, world, virtual, name) for r in range(world)}
        out[name] = simulate(order, stage_of_rank)
    return out
