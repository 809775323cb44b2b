"""SASA ResNets (paper §3): bottleneck ResNet-26/38/50 with a per-group conv/attention mix.

Block (the standard bottleneck; the paper does not spell out BN/ReLU placement):

    1×1 conv - BN - ReLU - spatial [- 2×2 avg pool /2] - BN - ReLU
      - 1×1 conv - BN(γ=0) (+ shortcut) - ReLU

where "spatial" is a 3×3 convolution (stride 2 when the block downsamples) or a
``SelfAttention2D`` at the block's input resolution followed, when the block
downsamples, by a 2×2 average pool with stride 2 (paper §3.1). Downsampling is in
the spatial layer, not the first 1×1 (ResNet v1.5), and the shortcut is a strided
1×1 conv + BN where the shape changes. Everything is NHWC.

Initialisation: convolutions He normal (fan-out, as torchvision), the last BN
scale of each block zero (``zero_init_last_bn``) so each block starts as the
identity, the classifier LeCun normal; attention layers as ``SelfAttention2D``
documents (LeCun-normal projections, relative tables N(0, d^-1/2)).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_flax.layers import AttentionStem, SelfAttention2D

BLOCKS_PER_GROUP = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}
GROUP_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
EXPANSION = 4
STEMS = ("conv", "attention", "cifar")
SPATIAL_LAYERS = ("conv", "attention")
ATTENTION_STEM_HEADS = 4

Dtype = Any

he_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled(channels: int, width: float) -> int:
    """Channels of a layer under the width multiplier."""
    return max(1, round(channels * width))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One bottleneck block: the structure the model builds and ``flops`` counts."""

    group: int  # 0..3
    index: int  # position within the group
    in_features: int
    width: int  # bottleneck width; output is EXPANSION * width
    stride: int
    spatial: str  # "conv" or "attention"

    @property
    def out_features(self) -> int:
        return EXPANSION * self.width

    @property
    def has_projection(self) -> bool:
        return self.stride != 1 or self.in_features != self.out_features


def block_specs(depth: int, width: float, spatial: Sequence[str]) -> list[BlockSpec]:
    """The blocks of a ResNet-``depth`` body, in order."""
    specs = []
    in_features = scaled(STEM_WIDTH, width)
    for group, (num_blocks, base) in enumerate(
        zip(BLOCKS_PER_GROUP[depth], GROUP_WIDTHS, strict=True)
    ):
        for index in range(num_blocks):
            stride = 2 if group > 0 and index == 0 else 1
            spec = BlockSpec(group, index, in_features, scaled(base, width), stride, spatial[group])
            specs.append(spec)
            in_features = spec.out_features
    return specs


class Bottleneck(nnx.Module):
    """A bottleneck block whose spatial layer is a 3×3 conv or local self-attention."""

    def __init__(
        self,
        spec: BlockSpec,
        *,
        attention: dict,
        zero_init_last_bn: bool,
        norm: functools.partial,
        conv: functools.partial,
        rngs: nnx.Rngs,
    ):
        self.spec = spec
        width = spec.width
        self.conv1 = conv(spec.in_features, width, (1, 1), rngs=rngs)
        self.bn1 = norm(width, rngs=rngs)
        if spec.spatial == "conv":
            self.spatial = conv(
                width, width, (3, 3), strides=spec.stride, padding=((1, 1), (1, 1)), rngs=rngs
            )
        else:
            self.spatial = SelfAttention2D(width, width, **attention, rngs=rngs)
        self.bn2 = norm(width, rngs=rngs)
        self.conv3 = conv(width, spec.out_features, (1, 1), rngs=rngs)
        last_scale = nnx.initializers.zeros if zero_init_last_bn else nnx.initializers.ones
        self.bn3 = norm(spec.out_features, scale_init=last_scale, rngs=rngs)
        if spec.has_projection:
            self.proj_conv = conv(
                spec.in_features, spec.out_features, (1, 1), strides=spec.stride, rngs=rngs
            )
            self.proj_bn = norm(spec.out_features, rngs=rngs)
        else:
            self.proj_conv = self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.spatial(y)
        if self.spec.spatial == "attention" and self.spec.stride > 1:
            s = self.spec.stride
            # SAME + excluded padding: ceil(n / 2) outputs, as the strided 1×1
            # shortcut gives, so odd resolutions work; identical to VALID for even n.
            y = nnx.avg_pool(
                y, window_shape=(s, s), strides=(s, s), padding="SAME", count_include_pad=False
            )
        y = nnx.relu(self.bn2(y))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return nnx.relu(y + shortcut)


class ConvStem(nnx.Module):
    """ResNet stem: 7×7/2 conv, BN, ReLU, 3×3/2 max pool (224² -> 56²)."""

    def __init__(self, out_features: int, *, norm, conv, rngs: nnx.Rngs):
        self.conv = conv(3, out_features, (7, 7), strides=2, padding=((3, 3), (3, 3)), rngs=rngs)
        self.bn = norm(out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn(self.conv(x)))
        return nnx.max_pool(y, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class CifarStem(nnx.Module):
    """Small-image stem: 3×3/1 conv, BN, ReLU, no pooling (32² stays 32²)."""

    def __init__(self, out_features: int, *, norm, conv, rngs: nnx.Rngs):
        self.conv = conv(3, out_features, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn = norm(out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


class ResNet(nnx.Module):
    """SASA ResNet: (B, H, W, 3) images -> (B, num_classes) float32 logits.

    Args:
      depth: 26, 38 or 50.
      width: multiplier on every channel count (stem, bottlenecks, outputs).
      stem: ``"conv"`` (7×7/2 + max pool), ``"attention"`` (``AttentionStem``),
        ``"cifar"`` (3×3/1 conv, no pool; for 32×32 and smaller inputs).
      stem_variant: the attention stem's values (``AttentionStem`` variants).
      spatial: per group, ``"conv"`` or ``"attention"`` (paper Table 3).
      kernel_size, num_heads, pos_encoding, content, padding, relative_tables,
      scale_queries, attention_impl: passed to every ``SelfAttention2D``.
      num_classes: classifier outputs.
      zero_init_last_bn: start each block's last BN scale at zero.
      bn_momentum, bn_epsilon: BatchNorm running-average decay and epsilon.
      dtype: compute dtype (e.g. bfloat16); parameters stay ``param_dtype``.
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        width: float = 1.0,
        stem: str = "conv",
        stem_variant: str = "spatially_aware",
        spatial: Sequence[str] = ("conv",) * 4,
        kernel_size: int = 7,
        num_heads: int = 8,
        pos_encoding: str = "relative",
        content: bool = True,
        padding: str = "mask",
        relative_tables: str = "shared",
        scale_queries: bool = True,
        attention_impl: str = "auto",
        num_classes: int = 1000,
        zero_init_last_bn: bool = True,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-5,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        norm = functools.partial(
            nnx.BatchNorm,
            momentum=bn_momentum,
            epsilon=bn_epsilon,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        conv = functools.partial(
            nnx.Conv, use_bias=False, kernel_init=he_normal, dtype=dtype, param_dtype=param_dtype
        )
        attention = dict(
            num_heads=num_heads,
            kernel_size=kernel_size,
            pos_encoding=pos_encoding,
            content=content,
            padding=padding,
            relative_tables=relative_tables,
            scale_queries=scale_queries,
            impl=attention_impl,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        stem_width = scaled(STEM_WIDTH, width)
        if stem == "conv":
            self.stem = ConvStem(stem_width, norm=norm, conv=conv, rngs=rngs)
        elif stem == "cifar":
            self.stem = CifarStem(stem_width, norm=norm, conv=conv, rngs=rngs)
        elif stem == "attention":
            self.stem = AttentionStem(
                3,
                stem_width,
                variant=stem_variant,
                num_heads=ATTENTION_STEM_HEADS,
                bn_momentum=bn_momentum,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            raise ValueError(f"stem must be one of {STEMS}; got {stem!r}.")
        specs = block_specs(depth, width, tuple(spatial))
        self.blocks = nnx.List(
            [
                Bottleneck(
                    spec,
                    attention=attention,
                    zero_init_last_bn=zero_init_last_bn,
                    norm=norm,
                    conv=conv,
                    rngs=rngs,
                )
                for spec in specs
            ]
        )
        self.head = nnx.Linear(
            specs[-1].out_features, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x).astype(jnp.float32)
