"""SASA ResNets (paper §3): bottleneck ResNet-26/38/50 with a per-group conv/attention mix.

Block (the standard bottleneck; the paper does not spell out BN/ReLU placement):

    1×1 conv - BN - ReLU - spatial [- 2×2 avg pool /2] - BN - ReLU
      - 1×1 conv - BN(γ=0) (+ shortcut) - ReLU

where "spatial" is a 3×3 convolution (stride 2 when the block downsamples) or a
``SelfAttention2D`` at the block's input resolution followed, when the block
downsamples, by a 2×2 average pool with stride 2 (paper §3.1). Downsampling is in
the spatial layer, not the first 1×1 (ResNet v1.5), and the shortcut is a strided
1×1 conv + BN where the shape changes. Everything is NHWC.

The spatial layer of each group is built by a registered factory (``SPATIAL_LAYERS``:
"conv" and "attention"; ``register_spatial_layer`` adds one), from the convolution and
normalisation factories and the ``AttentionOptions`` the model was given, so that every
option reaches every layer it names.

Initialisation: convolutions He normal (fan-out, as torchvision), the last BN
scale of each block zero (``zero_init_last_bn``) so each block starts as the
identity, the classifier LeCun normal; attention layers as ``SelfAttention2D``
documents (LeCun-normal projections, relative tables N(0, d^-1/2)).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sasa_flax.errors import ArgumentError, check_one_of
from sasa_flax.layers import AttentionOptions, AttentionStem, SelfAttention2D, StemOptions
from sasa_flax.layers.plan import attention_plan
from sasa_flax.registries import Registry

BLOCKS_PER_GROUP = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}
GROUP_WIDTHS = (64, 128, 256, 512)
STEM_WIDTH = 64
EXPANSION = 4
STEMS = ("conv", "attention", "cifar")

Dtype = Any

he_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled(channels: int, width: float) -> int:
    """Channels of a layer under the width multiplier."""
    return max(1, round(channels * width))


@dataclasses.dataclass(frozen=True)
class Parts:
    """What every layer of a ResNet is made of, passed whole to each spatial-layer factory.

    conv: ``conv(in, out, kernel_size, strides=..., padding=..., rngs=...)`` (bias-free,
      He-initialised ``nnx.Conv``); norm: ``norm(features, rngs=...)`` (BatchNorm with the
      model's momentum and epsilon); attention: the options of every attention layer.
    """

    conv: Callable[..., nnx.Module]
    norm: Callable[..., nnx.Module]
    attention: AttentionOptions
    dtype: Dtype | None
    param_dtype: Dtype


@dataclasses.dataclass(frozen=True)
class SpatialLayer:
    """A bottleneck's spatial layer: ``build(width, stride, parts, rngs)`` returns a module
    (B, H, W, width) -> (B, H', W', width). ``downsamples``: the module applies the stride
    itself (H' = ceil(H / stride)); otherwise it keeps H×W and the block follows it with
    a 2×2 average pool when the stride is 2 (paper §3.1)."""

    build: Callable[[int, int, Parts, nnx.Rngs], nnx.Module]
    downsamples: bool


SPATIAL_LAYERS: Registry = Registry("spatial layer", defined_by=lambda layer: layer.build)


def register_spatial_layer(name: str, *, downsamples: bool):
    """Decorator: ``build(width, stride, parts, rngs)`` becomes the spatial layer ``name``,
    usable in ``config.model.spatial``."""

    def decorate(build):
        SPATIAL_LAYERS.add(name, SpatialLayer(build, downsamples))
        return build

    return decorate


@register_spatial_layer("conv", downsamples=True)
def conv_3x3(width: int, stride: int, parts: Parts, rngs: nnx.Rngs) -> nnx.Module:
    return parts.conv(width, width, (3, 3), strides=stride, padding=((1, 1), (1, 1)), rngs=rngs)


@register_spatial_layer("attention", downsamples=False)
def local_self_attention(width: int, stride: int, parts: Parts, rngs: nnx.Rngs) -> nnx.Module:
    del stride  # the block pools
    return SelfAttention2D(
        width,
        width,
        parts.attention,
        dtype=parts.dtype,
        param_dtype=parts.param_dtype,
        rngs=rngs,
    )


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One bottleneck block: the structure the model builds."""

    group: int  # 0..3
    index: int  # position within the group
    in_features: int
    width: int  # bottleneck width; output is EXPANSION * width
    stride: int
    spatial: str  # a SPATIAL_LAYERS name: "conv", "attention", ...

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
    """A bottleneck block whose spatial layer is any registered ``SpatialLayer``."""

    def __init__(self, spec: BlockSpec, *, parts: Parts, zero_init_last_bn: bool, rngs: nnx.Rngs):
        self.spec = spec
        width, conv, norm = spec.width, parts.conv, parts.norm
        self.conv1 = conv(spec.in_features, width, (1, 1), rngs=rngs)
        self.bn1 = norm(width, rngs=rngs)
        try:
            self.spatial = SPATIAL_LAYERS[spec.spatial].build(width, spec.stride, parts, rngs)
        except ArgumentError as e:
            raise e.at(f"group {spec.group + 1}") from None
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
        if self.spec.stride > 1 and not SPATIAL_LAYERS[self.spec.spatial].downsamples:
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


def _check_arguments(depth, width, stem, spatial, num_classes, zero_init_last_bn, bn_momentum):
    check_one_of("depth", depth, BLOCKS_PER_GROUP)
    if not isinstance(width, int | float) or isinstance(width, bool) or width <= 0:
        raise ArgumentError("width", width, "must be a positive number (1.0 = the paper's)")
    check_one_of("stem", stem, STEMS)
    if isinstance(spatial, str) or not isinstance(spatial, Sequence) or len(spatial) != 4:
        raise ArgumentError(
            "spatial",
            spatial,
            f"must be a tuple of four, one per group, each one of {tuple(SPATIAL_LAYERS)}, "
            "e.g. ('conv', 'conv', 'attention', 'attention')",
        )
    for group, layer in enumerate(spatial, start=1):
        if layer not in SPATIAL_LAYERS:
            raise ArgumentError(
                "spatial",
                tuple(spatial),
                f"must name a spatial layer in every group: group {group} is {layer!r}; use "
                f"one of {tuple(SPATIAL_LAYERS)} (register_spatial_layer adds one)",
            )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ArgumentError("num_classes", num_classes, "must be a positive integer")
    if not isinstance(zero_init_last_bn, bool):
        raise ArgumentError("zero_init_last_bn", zero_init_last_bn, "must be True or False")
    if not 0.0 <= bn_momentum < 1.0:
        raise ArgumentError("bn_momentum", bn_momentum, "must be in [0, 1)")


class Defaults:
    """ResNet's defaults, declared once: its signature and ``sasa_resnet``'s read them."""

    depth = 50
    width = 1.0
    stem = "conv"
    spatial = ("conv",) * 4
    num_classes = 1000
    zero_init_last_bn = True
    bn_momentum = 0.9
    bn_epsilon = 1e-5
    param_dtype = jnp.float32


class ResNet(nnx.Module):
    """SASA ResNet: (B, H, W, 3) images -> (B, num_classes) float32 logits.

    Args:
      depth: 26, 38 or 50.
      width: multiplier on every channel count (stem, bottlenecks, outputs).
      stem: ``"conv"`` (7×7/2 + max pool), ``"attention"`` (``AttentionStem``),
        ``"cifar"`` (3×3/1 conv, no pool; for 32×32 and smaller inputs).
      spatial: per group, a ``SPATIAL_LAYERS`` name: ``"conv"`` or ``"attention"``
        (paper Table 3).
      attention: the ``AttentionOptions`` of every ``SelfAttention2D`` (default: its
        defaults).
      stem_options: the ``StemOptions`` of the attention stem (default: its defaults).
      num_classes: classifier outputs.
      zero_init_last_bn: start each block's last BN scale at zero.
      bn_momentum, bn_epsilon: every BatchNorm's running-average decay and epsilon
        (the attention stem's included).
      dtype: compute dtype (e.g. bfloat16); parameters stay ``param_dtype``.
    """

    def __init__(
        self,
        *,
        depth: int = Defaults.depth,
        width: float = Defaults.width,
        stem: str = Defaults.stem,
        spatial: Sequence[str] = Defaults.spatial,
        attention: AttentionOptions | None = None,
        stem_options: StemOptions | None = None,
        num_classes: int = Defaults.num_classes,
        zero_init_last_bn: bool = Defaults.zero_init_last_bn,
        bn_momentum: float = Defaults.bn_momentum,
        bn_epsilon: float = Defaults.bn_epsilon,
        dtype: Dtype | None = None,
        param_dtype: Dtype = Defaults.param_dtype,
        rngs: nnx.Rngs,
    ):
        _check_arguments(depth, width, stem, spatial, num_classes, zero_init_last_bn, bn_momentum)
        attention = attention or AttentionOptions()
        stem_options = stem_options or StemOptions()
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
        parts = Parts(conv, norm, attention, dtype, param_dtype)
        stem_width = scaled(STEM_WIDTH, width)
        self.stem_options = stem_options
        if stem == "conv":
            self.stem = ConvStem(stem_width, norm=norm, conv=conv, rngs=rngs)
        elif stem == "cifar":
            self.stem = CifarStem(stem_width, norm=norm, conv=conv, rngs=rngs)
        else:
            try:
                self.stem = AttentionStem(
                    3,
                    stem_width,
                    stem_options,
                    norm=norm,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
            except ArgumentError as e:
                if e.argument != "num_heads":
                    raise
                raise ArgumentError(
                    "width",
                    width,
                    f"gives an attention stem of {stem_width} channels, which "
                    f"{stem_options.num_heads} heads of even width cannot split; use a width "
                    "that is a multiple of 1/8, or change the stem's num_heads",
                ) from None
        specs = block_specs(depth, width, tuple(spatial))
        self.blocks = nnx.List(
            [
                Bottleneck(spec, parts=parts, zero_init_last_bn=zero_init_last_bn, rngs=rngs)
                for spec in specs
            ]
        )
        self.head = nnx.Linear(
            specs[-1].out_features, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        # Name scopes reach the compiled program's metadata: profiles and the TPU
        # estimate (sasa_flax.tools.tpu_schedule) attribute each op to its part of the model.
        with jax.named_scope("stem"):
            x = self.stem(images)
        for block in self.blocks:
            with jax.named_scope(f"group{block.spec.group + 1}_block{block.spec.index + 1}"):
                x = block(x)
        with jax.named_scope("head"):
            x = jnp.mean(x, axis=(1, 2))
            return self.head(x).astype(jnp.float32)

    def check_image_size(self, height: int, width: int) -> None:
        """Raises ArgumentError("image_size", ...) for a size the stem cannot take."""
        if isinstance(self.stem, AttentionStem):
            self.stem.options.check_image_size(height, width)

    def describe(self, platform: str, image_size: int) -> list[str]:
        """The optional model hook the trainer logs once per run: which implementation
        each attention layer runs on ``platform`` at ``image_size`` (``layers.plan``)."""
        plan = attention_plan(self, image_size, platform)
        return [f"attention on {platform}: {'; '.join(plan)}"] if plan else []

    @staticmethod
    def decay_mask(params) -> Any:
        """Weight decay on convolution / projection kernels and the stem's value matrices
        only: not on BatchNorm, biases, relative tables or the stem's embeddings
        (Choice: the paper does not say; tables and embeddings are positional logits)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", None) in DECAYED_PARAMETERS, params
        )


DECAYED_PARAMETERS = ("kernel", "value_mixture")
