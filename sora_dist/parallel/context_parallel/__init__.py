"""Context parallelism: the token sequence sharded over the CP group, self-attention made whole.

  comm.py       the collectives (all-gather, all-to-all, ring shift), with a byte counter
  ulysses.py    sequence <-> heads all-to-all (DeepSpeed-Ulysses)
  kernels.py    blockwise attention returning the log-sum-exp (fused aten kernels, fp32 math)
  ring.py       ring attention as a torch.library custom op (forward + backward)
  attention.py  ContextParallelAttention (ulysses | ring | hybrid | TE's own CP) and its swap-in
"""
from sora_dist.parallel.context_parallel.attention import (TE_COMM_TYPES, ContextParallelAttention,
                                                            apply_cp_attention, build_cp_attention)
from sora_dist.parallel.context_parallel.comm import COMM_COUNTER

__all__ = ["COMM_COUNTER", "TE_COMM_TYPES", "ContextParallelAttention", "apply_cp_attention",
           "build_cp_attention"]
