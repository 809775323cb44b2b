"""sasa_flax: Stand-Alone Self-Attention in Vision Models (Ramachandran et al., 2019)."""

from sasa_flax.ops import block_local_attention, local_attention, local_attention_weights

__all__ = ["block_local_attention", "local_attention", "local_attention_weights"]
