"""The DiT training loop (`trainer.py`) and what it owns: checkpoints (`checkpoint.py`),
optimizer/LR/EMA (`optim.py`), metrics (`metrics.py`), in-training sampling (`sampling.py`).
The entry point is sora_dist/train.py."""
