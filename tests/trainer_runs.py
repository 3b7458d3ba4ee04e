"""Run the real Trainer in this process (shared by the integration tests)."""
from sora_dist.training.trainer import Trainer


def run_trainer(cfg, stop_at=None):
    """(losses of this run, the closed trainer: its model, EMA and loader stay readable)."""
    tr = Trainer(cfg)
    try:
        return tr.train(stop_at=stop_at), tr
    finally:
        tr.close()
