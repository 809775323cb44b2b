"""SASA ResNets."""

from sasa_flax.models.resnet import ResNet, block_specs

__all__ = ["ResNet", "block_specs"]
