"""Parameter and FLOP counts of a config's model, in the paper's convention.

Convention (paper footnote): a multiply-add is 2 FLOPs; one image of the config's size.
The formulas live beside the layers they count (``SelfAttention2D``, ``AttentionStem``
in ``sasa_flax/layers/``; convolution, BatchNorm and dense layers in ``costs.py``), and
``costs.trace`` sums them over any model, ResNet or not, by an abstract forward pass.
Not counted: BatchNorm, ReLU, softmax, masking, pooling, the residual additions, biases'
adds, and the attention stem's mixture weights p(a, b, m) (computed once per block
position). Parameters are counted exactly and equal the model's (a test checks every
shipped config): BatchNorm scale and bias count, running statistics do not.
"""

from __future__ import annotations

import ml_collections

from sasa_flax import config_lib, costs
from sasa_flax.costs import LayerCost, conv

__all__ = ["LayerCost", "conv", "count", "layer_costs", "report", "uncounted_layers"]


def _trace(config, in_image_taps_only: bool, model=None):
    model = config_lib.build_model(config) if model is None else model
    size = config.input.image_size
    return costs.trace(model, (1, size, size, 3), in_image_taps_only=in_image_taps_only)


def report(config: ml_collections.ConfigDict) -> tuple[list[LayerCost], list[str]]:
    """Validates the config, then (counted layers, paths of the parameter-owning layers no
    rule counts), from one abstract build of the model."""
    return _trace(config, False, config_lib.validate(config))


def layer_costs(
    config: ml_collections.ConfigDict, *, in_image_taps_only: bool = False
) -> list[LayerCost]:
    """Every counted layer of the config's model at config.input.image_size, named by its
    path in the model. ``in_image_taps_only`` skips the convolution taps that fall on zero
    padding, as XLA's cost analysis does (to cross-check these formulas)."""
    return _trace(config, in_image_taps_only)[0]


def uncounted_layers(config: ml_collections.ConfigDict) -> list[str]:
    """Paths of the model's parameter-owning layers that no cost rule counts."""
    return _trace(config, False)[1]


def count(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(parameters, FLOPs) of the config's model."""
    return costs.total(layer_costs(config))
