"""Pure-JAX attention operators (no Flax)."""

from sasa_flax.ops.block_attention import block_local_attention
from sasa_flax.ops.local_attention import (
    IMPLEMENTATIONS,
    PADDINGS,
    local_attention,
    local_attention_weights,
)

__all__ = [
    "IMPLEMENTATIONS",
    "PADDINGS",
    "block_local_attention",
    "local_attention",
    "local_attention_weights",
]
