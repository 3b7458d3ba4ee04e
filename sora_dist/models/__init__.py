from sora_dist.models.dit import Conditioning, DiTArgs, VideoDiT, build_dit

__all__ = ["Conditioning", "DiTArgs", "VideoDiT", "build_dit"]
