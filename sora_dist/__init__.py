"""sora_dist: Megatron-style distributed training for Sora-like video diffusion transformers.

The jobs are `python -m sora_dist.{encode,train,sample,demo}`; README.md's Layout section says
where each piece lives.
"""
