"""Pure-JAX attention operators (no Flax)."""

from sasa_flax.ops.block_attention import block_local_attention
from sasa_flax.ops.choice import auto_choice
from sasa_flax.ops.local_attention import (
    PADDINGS,
    implementations,
    local_attention,
    local_attention_weights,
    register_implementation,
)

__all__ = [
    "PADDINGS",
    "auto_choice",
    "block_local_attention",
    "implementations",
    "register_implementation",
    "local_attention",
    "local_attention_weights",
]
