"""The cost of one local self-attention layer against a convolution as the window grows.

For a layer with d_in = d_out = C, per output pixel, in multiply-adds (MACs; the paper's
FLOPs are 2 × MACs) and parameters, counted by the layers' own formulas
(``layers.attention_cost``, ``costs.conv``):

    attention, relative term per neighbour (as Eq. 3 writes it, and Table 1 counts):
        3C² (Q, K, V) + k²C (q·k) + k²C (q·r) + k²C (values)  = 3C² + 3k²C
    attention, relative term factored (as the code computes it, q_row·r_row + q_col·r_col):
        3C² + k²C + kC + k²C                                = 3C² + 2k²C + kC
    k×k convolution:                                         k²C²

Setting attention equal to a K×K convolution (K = 3: 9C²) gives the extent k* where
attention costs as much:

    per neighbour:  3C² + 3k²C = K²C²      ->  k* = sqrt((K² − 3)·C / 3)       (= sqrt(2C))
    factored:       2k² + k − (K² − 3)·C = 0 ->  k* = (−1 + sqrt(1 + 8(K² − 3)·C)) / 4

Parameters do not depend on k for attention beyond the relative tables (k·C/N shared
over heads), so attention's parameters stay ≈ 3C² while a k×k convolution's grow as k²C².
"""

from __future__ import annotations

import dataclasses
import math

from sasa_flax import costs
from sasa_flax.layers import AttentionOptions, attention_cost

WIDTHS = (64, 128, 256, 512)  # the paper's ResNet stage widths (the 3×3 layers' channels)
EXTENTS = tuple(range(3, 33, 2))  # k = 3, 5, ..., 31
CONVENTIONS = ("per_neighbour", "factored")
NUM_HEADS = 8  # the paper's


@dataclasses.dataclass(frozen=True)
class Row:
    width: int  # C = d_in = d_out
    k: int
    attention_params: int
    attention_macs: dict  # convention -> MACs per output pixel
    conv_params: int
    conv_macs: int  # a k×k convolution's


def attention_per_pixel(width: int, k: int, convention: str) -> tuple[int, int]:
    """(parameters, MACs per output pixel) of SelfAttention2D(C -> C) with extent k."""
    options = AttentionOptions(num_heads=NUM_HEADS, kernel_size=k)
    params, flops = attention_cost(
        options, width, width, 1, 1, factored_relative=convention == "factored"
    )
    return params, flops // 2


def conv_per_pixel(width: int, k: int) -> tuple[int, int]:
    """(parameters, MACs per output pixel) of a bias-free k×k convolution C -> C."""
    layer = costs.conv("conv", k, width, width, in_size=1, pad=(k - 1) // 2)
    return layer.params, layer.flops // 2


def rows(widths=WIDTHS, extents=EXTENTS) -> list[Row]:
    out = []
    for width in widths:
        for k in extents:
            params = attention_per_pixel(width, k, "per_neighbour")[0]
            macs = {c: attention_per_pixel(width, k, c)[1] for c in CONVENTIONS}
            out.append(Row(width, k, params, macs, *conv_per_pixel(width, k)))
    return out


def crossover(width: int, convention: str, conv_extent: int = 3) -> float:
    """The (real) extent k* at which attention's MACs equal a conv_extent² convolution's."""
    excess = (conv_extent**2 - 3) * width  # (K² − 3)·C
    if convention == "per_neighbour":
        return math.sqrt(excess / 3)
    return (-1 + math.sqrt(1 + 8 * excess)) / 4


FORMULAS = {
    "per_neighbour": "k* = sqrt((K²−3)·C/3) = sqrt(2C) for K = 3",
    "factored": "k* = (−1 + sqrt(1 + 8(K²−3)·C)) / 4 = (−1 + sqrt(1 + 48C)) / 4 for K = 3",
}


def width_for_extent(k: float, convention: str, conv_extent: int = 3) -> float:
    """The width C at which attention with extent k costs a conv_extent² convolution."""
    per_width = conv_extent**2 - 3
    if convention == "per_neighbour":
        return 3 * k * k / per_width
    return (2 * k * k + k) / per_width


def paper_claim_in_words(k: int = 19) -> str:
    """Which widths and which convention make "a 3×3 convolution costs as much as attention
    with k = 19" hold."""
    per = width_for_extent(k, "per_neighbour")
    fac = width_for_extent(k, "factored")
    near = {c: min(WIDTHS, key=lambda w, c=c: abs(crossover(w, c) - k)) for c in CONVENTIONS}
    return (
        f"Attention with k = {k} costs exactly a 3×3 convolution at C = {per:.0f} when the "
        f"relative term is counted per neighbour (k* = {crossover(128, 'per_neighbour'):.1f} "
        f"at C = 128, {crossover(256, 'per_neighbour'):.1f} at C = 256), and at C = {fac:.0f} "
        f"when it is factored as the code computes it (k* = {crossover(128, 'factored'):.1f} "
        f"at C = 128). So the paper's k = {k} holds for the {near['factored']}-wide stage "
        f"(the second) with the factored count, and between the {near['per_neighbour']}- and "
        "256-wide stages with the per-neighbour count; at C = 64 the crossover is smaller "
        f"({crossover(64, 'per_neighbour'):.1f} / {crossover(64, 'factored'):.1f}), at C = 512 "
        f"larger ({crossover(512, 'per_neighbour'):.1f} / {crossover(512, 'factored'):.1f})."
    )


def summary(widths=WIDTHS, extents=EXTENTS) -> dict:
    """Everything ``report --scaling`` prints, as plain data (``--json``)."""
    return {
        "unit": "per output pixel; MACs (multiply-adds; FLOPs = 2 × MACs), parameters",
        "num_heads": NUM_HEADS,
        "rows": [dataclasses.asdict(r) for r in rows(widths, extents)],
        "crossovers": [
            {"width": w, "convention": c, "k_star": crossover(w, c), "formula": FORMULAS[c]}
            for w in widths
            for c in CONVENTIONS
        ],
        "paper_k19": paper_claim_in_words(),
    }


def markdown(result: dict) -> str:
    lines = [
        f"Per output pixel, d_in = d_out = C, {result['num_heads']} heads; MACs "
        "(FLOPs = 2 × MACs). Attention counted with the relative term per neighbour "
        "(Table 1's convention) and factored (as computed).",
        "",
        "| C | k | attention params | attention MACs (per neighbour) | attention MACs "
        "(factored) | k×k conv params = MACs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['width']} | {r['k']} | {r['attention_params']:,} | "
            f"{r['attention_macs']['per_neighbour']:,} | {r['attention_macs']['factored']:,} | "
            f"{r['conv_macs']:,} |"
        )
    lines += [
        "",
        "Extent k* at which attention costs as much as a 3×3 convolution (9C² MACs):",
        "",
        "| C | 3×3 conv MACs | k* per neighbour | k* factored |",
        "| ---: | ---: | ---: | ---: |",
    ]
    by_width = {}
    for c in result["crossovers"]:
        by_width.setdefault(c["width"], {})[c["convention"]] = c["k_star"]
    for width, ks in by_width.items():
        lines.append(
            f"| {width} | {9 * width * width:,} | {ks['per_neighbour']:.1f} | "
            f"{ks['factored']:.1f} |"
        )
    lines += ["", *(f"- {c}: {f}" for c, f in FORMULAS.items()), "", result["paper_k19"]]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """MACs per pixel against k, one panel per width: attention (both conventions), the
    k×k convolution and the 3×3 convolution, with the crossovers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({r["width"] for r in result["rows"]})
    columns = min(2, len(widths))
    rows_ = math.ceil(len(widths) / columns)
    fig, axes = plt.subplots(rows_, columns, figsize=(6 * columns, 4.2 * rows_), squeeze=False)
    axes = axes.ravel()
    for ax, width in zip(axes, widths, strict=False):
        mine = [r for r in result["rows"] if r["width"] == width]
        ks = [r["k"] for r in mine]
        scale = 1e6
        offsets = ((-58, 8), (4, -14))  # per-neighbour label above-left, factored below-right
        for convention, style, offset in zip(CONVENTIONS, ("-", "--"), offsets, strict=True):
            macs = [r["attention_macs"][convention] / scale for r in mine]
            label = f"attention ({convention.replace('_', ' ')})"
            ax.plot(ks, macs, style, color="C0", label=label)
            k_star = crossover(width, convention)
            ax.plot([k_star], [9 * width * width / scale], "o", color="C3")
            ax.annotate(
                f"k*={k_star:.1f}",
                (k_star, 9 * width * width / scale),
                textcoords="offset points",
                xytext=offset,
                fontsize=8,
            )
        ax.plot(ks, [r["conv_macs"] / scale for r in mine], color="C1", label="k×k convolution")
        ax.axhline(9 * width * width / scale, color="C2", linestyle=":", label="3×3 convolution")
        ax.set_yscale("log")
        ax.set_title(f"C = {width}")
        ax.set_xlabel("spatial extent k")
        ax.set_ylabel("million multiply-adds per output pixel")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle("One layer, d_in = d_out = C: local self-attention vs convolution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
