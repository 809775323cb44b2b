"""The options of the SASA layer and of the attention stem: every value checked once, when
the frozen options object is made, so that a model can pass one object to every layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sasa_flax.errors import ArgumentError, check_one_of, check_options
from sasa_flax.ops.local_attention import validate_impl, validate_kernel_size, validate_padding

POS_ENCODINGS = ("relative", "absolute", "none")
RELATIVE_TABLES = ("shared", "per_head")
STEM_VARIANTS = ("spatially_aware", "stand_alone", "conv_values")


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Every option of ``SelfAttention2D``, checked once, here, when it is made.

    Frozen and typed: a model passes one object to every attention layer it builds, so an
    option cannot reach one layer and miss another. ``SelfAttention2D`` documents each
    field; the model config names them the same (``impl`` is ``attention_impl`` there).
    """

    num_heads: int = 8
    kernel_size: int = 7
    pos_encoding: str = "relative"
    content: bool = True
    padding: str = "mask"
    relative_tables: str = "shared"
    scale_queries: bool = True
    impl: str = "auto"

    def __post_init__(self):
        check_options(self)
        if self.num_heads < 1:
            raise ArgumentError("num_heads", self.num_heads, "must be a positive integer")
        validate_kernel_size(self.kernel_size)
        validate_padding(self.padding)
        check_one_of("pos_encoding", self.pos_encoding, POS_ENCODINGS)
        check_one_of("relative_tables", self.relative_tables, RELATIVE_TABLES)
        validate_impl(self.impl)
        if not self.content and self.pos_encoding == "none":
            raise ArgumentError(
                "content",
                self.content,
                "must be True when pos_encoding='none': content=False with "
                "pos_encoding='none' leaves no attention logit; use pos_encoding='relative' "
                "(the paper's Table 6 ablation) or content=True",
            )


@dataclasses.dataclass(frozen=True)
class StemOptions:
    """Every option of ``AttentionStem`` (which documents them), checked once, here.

    The model config names them with a ``stem_`` prefix (``stem_block_size``, ...).
    """

    variant: str = "spatially_aware"
    num_heads: int = 4
    block_size: int = 4
    pool_size: int = 4
    num_mixtures: int = 4
    value_kernel_size: int = 3

    def __post_init__(self):
        check_options(self)
        check_one_of("variant", self.variant, STEM_VARIANTS)
        for name in ("num_heads", "block_size", "pool_size", "num_mixtures"):
            if getattr(self, name) < 1:
                raise ArgumentError(name, getattr(self, name), "must be a positive integer")
        validate_kernel_size(self.value_kernel_size, "value_kernel_size")

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this."""
        return int(np.lcm(self.block_size, self.pool_size))

    def check_image_size(self, height: int, width: int) -> None:
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ArgumentError(
                "image_size",
                (height, width) if height != width else height,
                f"must be a multiple of {multiple} with the attention stem: height and width "
                f"must be multiples of {multiple} (block_size={self.block_size}, "
                f"pool_size={self.pool_size}); resize or crop the images",
            )
