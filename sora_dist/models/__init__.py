from sora_dist.config.model import DiTArgs
from sora_dist.models.dit import Conditioning, VideoDiT, build_dit


def model_class(args: DiTArgs):
    """The module class of an architecture (model.arch): VideoDiT or WanDiT."""
    if args.arch == "wan":
        from sora_dist.models.wan import WanDiT
        return WanDiT
    return VideoDiT


def build_model(model_cfg):
    """The single-device model a ModelConfig describes (arch dit or wan), randomly initialised;
    `model.init_from` weights are loaded by the caller (models/wan_weights.py), after sharding."""
    args = DiTArgs.from_config(model_cfg)
    return model_class(args)(args)


__all__ = ["Conditioning", "DiTArgs", "VideoDiT", "build_dit", "build_model", "model_class"]
