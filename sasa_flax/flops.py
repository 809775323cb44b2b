"""Analytic parameter and FLOP counts of SASA ResNets, in the paper's convention.

Convention (paper footnote): a multiply-add is 2 FLOPs; images of the config's size.
Per layer, with H×W the resolution a layer computes at:

- convolution k×k, C_in -> C_out: 2·k²·C_in·C_out·H_out·W_out (no bias);
- classifier: 2·C·num_classes (its bias is not counted as FLOPs);
- attention layer (``SelfAttention2D``) at its input resolution H×W, k×k window,
  d_in -> d_out:
    2·H·W·[ (3 or 2)·d_in·d_out        Q, K, V projections (no K without content)
          + k²·d_out · (#logit terms)   q·k and q·r, each a d-wide dot per neighbour
          + k²·d_out ]                  the weighted sum of values
  The relative term is counted as Eq. 3 writes it, a full q·r dot per neighbour.
  (The implementation factors it as q_row·rel_row + q_col·rel_col, which costs
  k·d_out instead; counted that way ResNet-50 with attention would come to 6.8 B
  instead of the paper's 7.0 B, outside Table 1's precision, so the paper counts
  it per neighbour.) Absolute encoding adds p to the keys: one dot, like q·k.
- attention stem at the full input resolution with b×b blocks: the same terms with
  b² neighbours; spatially-aware values cost m·d_in·d_out per pixel for the m
  value projections plus m·d_out to mix them; "conv_values" a 3×3 conv.
- Not counted: BatchNorm, ReLU, softmax, masking, pooling, the residual additions,
  and the stem's mixture weights p(a, b, m) (computed once per block position).

Parameters are counted exactly and equal the model's (a test checks every config):
BatchNorm scale and bias count, running statistics do not.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections

from sasa_flax.models import resnet


@dataclasses.dataclass(frozen=True)
class LayerCost:
    name: str
    params: int
    flops: int


def conv_out_size(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1


def _taps(n: int, k: int, stride: int, pad: int, in_image_only: bool) -> int:
    """Σ over output positions of the kernel taps counted along one axis."""
    outputs = conv_out_size(n, k, stride, pad)
    if not in_image_only:
        return outputs * k
    return sum(min(o * stride - pad + k, n) - max(o * stride - pad, 0) for o in range(outputs))


def conv(
    name: str,
    k: int,
    c_in: int,
    c_out: int,
    in_size: int,
    stride: int = 1,
    pad: int = 0,
    in_image_taps_only: bool = False,
) -> LayerCost:
    """A bias-free k×k convolution of a square in_size² input.

    The paper's convention counts all k² taps of every output; with
    ``in_image_taps_only`` the taps that fall on zero padding are skipped, which
    is XLA's cost-analysis convention (used to cross-check these formulas).
    """
    taps = _taps(in_size, k, stride, pad, in_image_taps_only)
    return LayerCost(name, k * k * c_in * c_out, 2 * c_in * c_out * taps * taps)


def batch_norm(name: str, channels: int) -> LayerCost:
    return LayerCost(name, 2 * channels, 0)


def attention(
    name: str, m: ml_collections.ConfigDict, d_in: int, d_out: int, hw: tuple[int, int]
) -> LayerCost:
    """A ``SelfAttention2D`` configured by config.model ``m`` at resolution hw."""
    k, heads = m.kernel_size, m.num_heads
    projections = (3 if m.content else 2) * d_in * d_out
    logit_terms = int(m.content or m.pos_encoding == "absolute") + int(m.pos_encoding == "relative")
    per_pixel = projections + k * k * d_out * logit_terms + k * k * d_out
    params = projections
    if m.pos_encoding == "relative":
        tables = k * (d_out // heads)  # row and column tables, k × d/2 each
        params += tables * (heads if m.relative_tables == "per_head" else 1)
    return LayerCost(name, params, 2 * hw[0] * hw[1] * per_pixel)


def attention_stem(
    m: ml_collections.ConfigDict, out: int, image_hw: tuple[int, int]
) -> list[LayerCost]:
    """``AttentionStem`` (4×4 blocks, 4 heads, m = 4 mixtures) at the full image size."""
    block, heads, mixtures, d_in = 4, resnet.ATTENTION_STEM_HEADS, 4, 3
    head_dim = out // heads
    h, w = image_hw
    neighbours = block * block
    params = 2 * d_in * out + 2 * (2 * block - 1) * (head_dim // 2)  # W_Q, W_K, rel tables
    per_pixel = 2 * d_in * out + neighbours * out * 3  # Q, K; q·k, q·r, weighted sum
    if m.stem_variant == "stand_alone":
        params += d_in * out
        per_pixel += d_in * out
    elif m.stem_variant == "conv_values":
        params += 9 * d_in * out
        per_pixel += 9 * d_in * out
    else:
        params += mixtures * d_in * out + 2 * block * head_dim + mixtures * head_dim
        per_pixel += mixtures * d_in * out + mixtures * out
    return [
        LayerCost("stem/attention", params, 2 * h * w * per_pixel),
        batch_norm("stem/bn", out),
    ]


def layer_costs(
    config: ml_collections.ConfigDict, *, in_image_taps_only: bool = False
) -> list[LayerCost]:
    """Every counted layer of the config's model at config.input.image_size.

    ``in_image_taps_only`` counts convolutions as XLA's cost analysis does (see ``conv``).
    """
    m = config.model
    size = config.input.image_size
    stem_width = resnet.scaled(resnet.STEM_WIDTH, m.width)
    conv_ = functools.partial(conv, in_image_taps_only=in_image_taps_only)
    costs: list[LayerCost] = []
    if m.stem == "conv":
        costs += [
            conv_("stem/conv", 7, 3, stem_width, size, stride=2, pad=3),
            batch_norm("stem/bn", stem_width),
        ]
        res = conv_out_size(conv_out_size(size, 7, 2, 3), 3, 2, 1)
    elif m.stem == "cifar":
        costs += [
            conv_("stem/conv", 3, 3, stem_width, size, pad=1),
            batch_norm("stem/bn", stem_width),
        ]
        res = size
    else:
        costs += attention_stem(m, stem_width, (size, size))
        res = size // 4
    specs = resnet.block_specs(m.depth, m.width, tuple(m.spatial))
    for spec in specs:
        name = f"group{spec.group + 1}/block{spec.index + 1}"
        out = -(-res // spec.stride)  # ceil: what both the strided conv and the pool give
        w = spec.width
        costs += [
            conv_(f"{name}/conv1", 1, spec.in_features, w, res),
            batch_norm(f"{name}/bn1", w),
        ]
        if spec.spatial == "conv":
            costs.append(conv_(f"{name}/conv2", 3, w, w, res, stride=spec.stride, pad=1))
        else:
            costs.append(attention(f"{name}/attention", m, w, w, (res, res)))
        costs += [
            batch_norm(f"{name}/bn2", w),
            conv_(f"{name}/conv3", 1, w, spec.out_features, out),
            batch_norm(f"{name}/bn3", spec.out_features),
        ]
        if spec.has_projection:
            costs += [
                conv_(
                    f"{name}/projection", 1, spec.in_features, spec.out_features, res, spec.stride
                ),
                batch_norm(f"{name}/projection_bn", spec.out_features),
            ]
        res = out
    features = specs[-1].out_features
    costs.append(
        LayerCost("head", features * m.num_classes + m.num_classes, 2 * features * m.num_classes)
    )
    return costs


def count(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(parameters, FLOPs) of the config's model."""
    costs = layer_costs(config)
    return sum(c.params for c in costs), sum(c.flops for c in costs)
