"""Flax NNX layers on top of the functional core (``sasa_flax.ops``).

  options.py    ``AttentionOptions`` and ``StemOptions``: every option, checked once
  attention.py  ``SelfAttention2D``, the SASA layer (paper Eq. 3), and its cost rule
  stem.py       ``AttentionStem`` (paper §3.2), and its cost rule
  common.py     projections, head splitting and the checks both layers share
  plan.py       ``attention_plan``: which implementation each layer runs on a platform

A layer's options are read as ``layer.options.<field>`` (one place, frozen).
"""

from sasa_flax.layers.attention import SelfAttention2D, attention_cost, sinusoidal_2d
from sasa_flax.layers.options import (
    POS_ENCODINGS,
    RELATIVE_TABLES,
    STEM_VARIANTS,
    AttentionOptions,
    StemOptions,
)
from sasa_flax.layers.plan import attention_plan
from sasa_flax.layers.stem import AttentionStem, stem_cost

__all__ = [
    "POS_ENCODINGS",
    "RELATIVE_TABLES",
    "STEM_VARIANTS",
    "AttentionOptions",
    "AttentionStem",
    "SelfAttention2D",
    "StemOptions",
    "attention_cost",
    "attention_plan",
    "sinusoidal_2d",
    "stem_cost",
]
