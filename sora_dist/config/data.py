"""Training data: pre-encoded webdataset shards, or the in-repo synthetic latent source."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DATA_SOURCES = ("synthetic", "shards")
# Written by sora-encode's rank 0 into the shard folder once every rank is done: its presence
# is what makes a folder complete (validate() checks it; data/shards.py writes and reads it).
SHARDS_MANIFEST = "manifest.json"


@dataclass
class DataConfig:
    # "synthetic" (deterministic latents made in memory, for demos/tests) or "shards"
    # (webdataset tars written by sora-encode).
    source: str = "synthetic"
    # Folder (or manifest.json inside it) of shards written by sora-encode; source=shards only.
    shards: Optional[str] = None
    # Samples per batch on each DP rank (micro-batch; all TP/CP/PP ranks of a group share it).
    batch_size: int = 2
    # Seed for the data order (shuffle of shards and samples); order is a function of it.
    seed: int = 1234
    # Shuffle buffer size per rank (samples); 0 = samples in shard order (the shards themselves
    # are still dealt to DP ranks in a seeded order per epoch).
    shuffle_buffer: int = 64
    # Synthetic source: number of distinct samples in one epoch.
    synthetic_samples: int = 64
    # Synthetic source: latent buckets as [T, H, W] (latent frames/height/width).
    synthetic_buckets: list[list[int]] = field(default_factory=lambda: [[3, 8, 8], [2, 6, 10]])
    # Synthetic source: text tokens per caption (padded length; a mask marks real tokens).
    text_len: int = 8
    # Shards source: per-bucket batch sizes keyed by latent bucket "TxHxW", e.g. {"5x8x8": 1}
    # (Open-Sora's resolution x frames -> batch size table: long/large buckets take fewer
    # samples per batch so every batch costs about the same memory). Unlisted buckets use batch_size.
    # On the command line: '+data.bucket_batch_size={5x8x8:1,3x8x8:2}'.
    bucket_batch_size: dict[str, int] = field(default_factory=dict)
    # Shards source: read the next shuffle block in a background thread while the current one
    # is consumed (hides shard I/O at block boundaries; holds one more block in memory).
    prefetch_next_block: bool = True
    # Patch n' Pack (data/packing.py): instead of bucket batches, each DP rank's micro-batch is
    # one pack of mixed-size samples (images and clips of any length/aspect) whose tokens
    # (prod of ceil(T/pt), ceil(H/ph), ceil(W/pw) under model.patch_size) fill tokens_per_rank.
    # Every rank fills its own pack to ~the same budget (and with pack_balance=flops the ranks
    # agree on ~the same step cost).
    # null (the default): pack when the data holds more than one latent size (the shards'
    # manifest buckets, or data.synthetic_buckets) and every size divides by model.patch_size;
    # else bucket batches (which pad odd sizes to the patch); true / false force it.
    packing: Optional[bool] = None
    # Token budget of one pack = one DP rank's micro-batch; 0 (the default): the most tokens one
    # bucket batch would hold (bucket_batch_size, else batch_size, x the bucket's tokens). A
    # sample longer than it is an error (raise it, or shard the sequence with parallel.cp).
    # With parallel.pp > 1 the pack's whole samples are dealt to the parallel.pp_microbatches
    # pipeline microbatches, all padded to the largest (+ < 1/8): the padding stays small while
    # samples are shorter than tokens_per_rank / pp_microbatches; a longer one pads every other
    # microbatch to its length (data.batch_size is not used).
    tokens_per_rank: int = 0
    # Look-ahead window (samples, in stream order) the best-fill packer picks each pack from;
    # larger fills packs better and holds more decoded samples in memory.
    pack_window: int = 64
    # How DP ranks balance their packs: "flops" (default): each step the DP ranks agree on one
    # modelled step cost (model FLOPs, attention quadratic per sample; two tiny all-gathers) and
    # each takes the costliest pack within that cost and tokens_per_rank, so a rank with a long
    # clip does not keep the others waiting (packs then leave ~3-6% of the token budget unfilled);
    # "tokens": each rank fills its own pack to the token budget with no communication (equal
    # tokens, unequal attention work).
    pack_balance: str = "flops"
    # The balance's cost model: the time of one attention FLOP in linear-layer FLOPs. null: from
    # the precisions (1 in bf16, 0.5 with model.fp8_attention, 2 with FP8 linears only, as the
    # planner models kernels); or measured on the cluster's GPUs (tools/bench_pack.py fits it on
    # the machine it runs on: 0.3-0.7 on this repo's 2-core CPU, from run to run).
    pack_attention_cost: Optional[float] = None
