"""Local (k×k neighbourhood) multi-head self-attention: the pure functional core.

This is Eq. 3 of Ramachandran et al. (2019) for every pixel (i, j) and head n:

    logit(i, j, a, b) = q_ij · k_ab                                   (content)
                      + q_ij[:d/2] · rel_row[a-i+r] + q_ij[d/2:] · rel_col[b-j+r]   (position)
    y_ij = Σ_{|a-i|≤r, |b-j|≤r} softmax_ab(logit) v_ab,   r = kernel_size // 2.

No scaling is applied here; ``SelfAttention2D`` scales q by d^-1/2.

Implementations live one per module (``patches`` is the reference expression) and
are chosen with ``impl``; they all compute exactly this function.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sasa_flax.errors import ArgumentError, check_one_of
from sasa_flax.ops import dense, pallas, patches, shifted
from sasa_flax.ops.common import vary_together
from sasa_flax.registries import Registry

PADDINGS = ("mask", "zeros")

# name -> function(q, k, v, rel_row, rel_col, *, kernel_size, padding)
_IMPLEMENTATIONS = Registry(
    "attention implementation (impl)",
    {
        "patches": patches.local_attention,
        "shifted": shifted.local_attention,
        "dense": dense.local_attention,
        "pallas": pallas.local_attention,
    },
    reserved=("auto",),
)


def register_implementation(name: str, fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Makes ``fn`` available as ``impl=name`` here, in ``SelfAttention2D`` and as
    ``config.model.attention_impl``.

    ``fn(q, k, v, rel_row, rel_col, *, kernel_size, padding)`` must compute exactly
    ``local_attention``'s function (check it with the tests' float64 reference); the
    arguments reach it already validated. Registering the same definition again (its file
    loaded a second time, e.g. as a config file) replaces it. Returns ``fn``.
    """
    return _IMPLEMENTATIONS.add(name, fn)


def implementations() -> tuple[str, ...]:
    """Every valid ``impl``: "auto" and the registered implementations."""
    return ("auto", *_IMPLEMENTATIONS)


def local_attention(
    q: jax.Array,
    k: jax.Array | None,
    v: jax.Array,
    rel_row: jax.Array | None = None,
    rel_col: jax.Array | None = None,
    *,
    kernel_size: int,
    padding: str = "mask",
    impl: str = "auto",
) -> jax.Array:
    """Multi-head self-attention of every pixel over its k×k neighbourhood.

    Args:
      q: queries (B, H, W, N, d): N heads of width d.
      k: keys, same shape as ``q``; or ``None`` for position-only attention
        (paper Table 6), where the logit is the positional term alone.
      v: values (B, H, W, N, dv).
      rel_row, rel_col: relative row / column embeddings, (kernel_size, d // 2)
        each, shared by all heads; entry t embeds the offset t - kernel_size // 2.
        Both ``None`` for no positional term.
      kernel_size: odd window extent k (the window is centred on the query).
      padding: what lies outside the image. ``"mask"``: those neighbours take no
        part in the softmax, so a border pixel attends over its in-image
        neighbours only. ``"zeros"``: they are zero keys and zero values that do
        take part (their logit is the positional term alone).
      impl: ``"patches"`` (the reference expression: k×k neighbourhoods gathered,
        then einsum; memory-hungry), ``"shifted"`` (k² static shifts with a
        hand-written backward that gathers no k×k neighbourhoods; reverse-mode only,
        like every ``custom_vjp``), ``"dense"`` (the whole image as one block with a
        window mask: (H·W)² work in matmuls, for images not much larger than the
        window), ``"pallas"`` (fused Pallas kernels with an online softmax and their
        own backward; Triton kernels on GPU, Mosaic kernels on TPU, the GPU kernels
        interpreted on CPU, where they are exact but slow) or ``"auto"`` (the default,
        as ``SelfAttention2D``'s): chosen per platform when the program is lowered
        (``auto_choice``; e.g. on CPU ``"dense"`` when H·W < 4·k², else ``"shifted"``).

    Returns:
      (B, H, W, N, dv) in the dtype of ``v``. Logits and the softmax are computed
      in float32 whatever the input dtype (float64 for float64 inputs).

    Raises:
      ValueError: naming the offending argument, for bad shapes, an even or
        non-positive kernel_size, an odd d with a positional term, or an unknown
        padding / impl. Raised at trace time, before anything is compiled.
    """
    validate_arguments(q, k, v, rel_row, rel_col, kernel_size=kernel_size, padding=padding)
    # Inside a user's shard_map (check_vma=True) the custom VJPs need operands of one
    # type: the invariant tables become varying, and their gradient is summed over the
    # shards by the cast's transpose.
    q, k, v, rel_row, rel_col = vary_together(q, k, v, rel_row, rel_col)
    # The scope names the core's ops in profiles and in the TPU estimate (tpu_schedule).
    with jax.named_scope("local_attention"):
        return _implementation(impl)(
            q, k, v, rel_row, rel_col, kernel_size=kernel_size, padding=padding
        )


def local_attention_weights(
    q: jax.Array,
    k: jax.Array | None,
    rel_row: jax.Array | None = None,
    rel_col: jax.Array | None = None,
    *,
    kernel_size: int,
    padding: str = "mask",
) -> jax.Array:
    """The attention weights of ``local_attention``, for inspection and plots.

    Returns:
      (B, H, W, N, kernel_size, kernel_size), at least float32: weight of neighbour
      (i + dy, j + dx) at index [..., dy + r, dx + r]. Under ``"mask"`` the
      weights of out-of-image neighbours are exactly 0.
    """
    validate_arguments(q, k, None, rel_row, rel_col, kernel_size=kernel_size, padding=padding)
    weights = patches.local_attention_weights(
        q, k, rel_row, rel_col, kernel_size=kernel_size, padding=padding
    )
    return weights.reshape(*weights.shape[:-1], kernel_size, kernel_size)


# On TPU and GPU, images of at most this many positions (16², so ResNet-50's 14² and 7²
# stages) attend as one masked dense block: (H·W)² work, but all of it matmuls on the
# matrix units, for at most 256 × 256 logits per head. On TPU the choice table below
# decides first, where it covers the shape; this rule is the fallback.
ACCELERATOR_DENSE_POSITIONS = 256

# The TPU choice table: per generation, ResNet-50's attention stages at 224² and k = 3…11,
# every implementation's estimated cycles for the layer (forward and gradients) and the
# cheapest, read from libtpu's static schedule (``benchmarks/tpu_estimate.py --choices``;
# a compile test regenerates part of it and fails when it is stale).
TPU_CHOICES = pathlib.Path(__file__).with_name("tpu_choices.json")


@functools.cache
def _tpu_choices() -> dict:
    if not TPU_CHOICES.exists():
        return {}
    return json.loads(TPU_CHOICES.read_text())["generations"]


def _table_key(height: int, width: int, head_dim: int, kernel_size: int) -> str:
    return f"{height}x{width}x{head_dim} k={kernel_size}"


def tpu_table_choice(height: int, width: int, kernel_size: int, head_dim: int) -> str | None:
    """The table's choice at this shape, or None where it has no entry: the implementation
    whose estimate is closest to the best on every generation measured (the one whose
    worst ratio to each generation's best is smallest)."""
    key = _table_key(height, width, head_dim, kernel_size)
    rows = [table[key]["cycles"] for table in _tpu_choices().values() if key in table]
    if not rows:
        return None
    impls = set.intersection(*(set(r) for r in rows))
    return min(sorted(impls), key=lambda i: max(r[i] / min(r.values()) for r in rows))


def write_tpu_choices(table: dict, *, batch_per_chip: int) -> None:
    """Writes ``table`` ({generation: {key: {"cycles", "choice"}}}) as the checked-in
    choice table, merged into what is there."""
    import jax.version

    current = json.loads(TPU_CHOICES.read_text()) if TPU_CHOICES.exists() else {}
    generations = current.get("generations", {})
    for generation, rows in table.items():
        generations.setdefault(generation, {}).update(rows)
    TPU_CHOICES.write_text(json.dumps(dict(
        about="Estimated cycles of SelfAttention2D (forward and gradients, bfloat16, 8 heads) "
              "per implementation, from libtpu's static schedule, not run: "
              "benchmarks/tpu_estimate.py --choices.",
        jax=jax.version.__version__, libtpu=_libtpu_version(), batch_per_chip=batch_per_chip,
        generations=generations,
    ), indent=1, sort_keys=True) + "\n")  # fmt: skip
    _tpu_choices.cache_clear()


def stale_tpu_choices(table: dict) -> list[str]:
    """Where ``table`` (freshly estimated) chooses otherwise than the checked-in one."""
    checked_in = _tpu_choices()
    stale = []
    for generation, rows in table.items():
        for key, row in rows.items():
            old = checked_in.get(generation, {}).get(key, {}).get("choice")
            if old != row["choice"]:
                stale.append(f"{generation} {key}: table says {old}, libtpu now {row['choice']}")
    return stale


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001  (not installed: the table is only read)
        return "unknown"


def auto_choice(
    platform: str, height: int, width: int, kernel_size: int, *, head_dim: int = 8,
    value_dim: int | None = None, itemsize: int = 4,
) -> str:  # fmt: skip
    """What ``impl="auto"`` runs on ``platform`` ("cpu", "cuda", "rocm", "tpu") for an
    H×W image, window k and heads of width ``head_dim`` (values ``value_dim``, default the
    same), inputs of ``itemsize`` bytes (the Mosaic kernels' VMEM depends on it). The one
    table of per-platform choices (docs/performance.md, tests):

    - cpu: "dense" when H·W < 4·k², else "shifted": measured side by side with
      ``benchmarks/local_attention.py`` (ratios in benchmarks/RESULTS.md), "shifted"
      beats "patches" everywhere and "dense" beats "shifted" only where the window
      covers most of the image.
    - cuda: "dense" up to ACCELERATOR_DENSE_POSITIONS, else "pallas" (the fused Triton
      kernels, ``ops/pallas/gpu.py``: nothing of size k² per pixel is stored for the
      backward). By rule: compiled to cubin for H100 in CI (deviceless, ``tests/test_compile.py``),
      not yet timed on a GPU.
    - tpu: the choice table (``tpu_choices.json``: the implementation libtpu's schedule
      estimates fastest at ResNet-50's stages: k = 3…11 on v5e, k = 7 on v4) where it covers
      the shape; elsewhere "dense" up to ACCELERATOR_DENSE_POSITIONS, else "pallas" (the
      Mosaic kernels, ``ops/pallas/tpu.py``) where a tile of them fits VMEM
      (``tpu.fits``), else "shifted". Estimated, never timed on a TPU.
    - rocm and anything else: "dense" up to ACCELERATOR_DENSE_POSITIONS, else "shifted"
      (its batched accelerator form): no kernel has been lowered for them.
    """
    positions = height * width
    value_dim = value_dim or head_dim
    if platform == "cpu":
        return "dense" if positions < 4 * kernel_size**2 else "shifted"
    fits = pallas.tpu.fits(height, width, kernel_size, head_dim, value_dim, itemsize=itemsize)
    if platform == "tpu" and value_dim == head_dim:
        chosen = tpu_table_choice(height, width, kernel_size, head_dim)
        if chosen is not None and (chosen != "pallas" or fits):
            return chosen
    if positions <= ACCELERATOR_DENSE_POSITIONS:
        return "dense"
    if platform == "tpu":
        return "pallas" if fits else "shifted"
    return "pallas" if platform == "cuda" else "shifted"


def _auto(q, k, v, rel_row, rel_col, *, kernel_size, padding):
    """``auto_choice`` per platform, decided when the program is lowered (a function
    traced on a CPU host and exported for CUDA or TPU gets that platform's choice)."""
    height, width = q.shape[1:3]
    widths = dict(head_dim=q.shape[-1], value_dim=v.shape[-1], itemsize=q.dtype.itemsize)

    def branch(platform):
        impl = auto_choice(platform, height, width, kernel_size, **widths)
        options = dict(kernel_size=kernel_size, padding=padding)
        if impl == "pallas":  # lowered for CUDA or TPU only: compiled, never interpreted
            return pallas.compiled(platform, **options)
        return lambda *args: _IMPLEMENTATIONS[impl](*args, **options)

    choices = {p: branch(p) for p in ("cpu", "cuda", "tpu")}
    return jax.lax.platform_dependent(q, k, v, rel_row, rel_col, default=branch("other"), **choices)


def _implementation(impl: str) -> Callable:
    if impl == "auto":  # decided per platform, when the program is lowered
        return _auto
    validate_impl(impl)
    return _IMPLEMENTATIONS[impl]


def validate_impl(impl) -> None:
    check_one_of("impl", impl, implementations())


def validate_kernel_size(kernel_size, name: str = "kernel_size") -> None:
    """Raises unless ``kernel_size`` is a positive odd integer."""
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ArgumentError(
            name,
            kernel_size,
            "must be a positive odd integer (3, 5, 7, ...): the window is centred on the "
            "query pixel",
        )


def validate_padding(padding, name: str = "padding") -> None:
    check_one_of(name, padding, PADDINGS)


def validate_arguments(
    q, k, v, rel_row, rel_col, *, kernel_size, padding, table_rows: str = "kernel_size"
) -> None:
    """Checks the arguments of ``local_attention``; ``v=None`` skips v's checks.
    ``table_rows``: how an error names the tables' row count (block attention's is
    "2 * block_size - 1")."""
    validate_kernel_size(kernel_size)
    validate_padding(padding)
    _check_float("q", q)
    if q.ndim != 5:
        raise ValueError(
            f"q must have shape (batch, height, width, heads, head_dim); got shape {q.shape}. "
            "Reshape (B, H, W, C) inputs to (B, H, W, heads, C // heads)."
        )
    if k is not None:
        _check_float("k", k)
        if k.shape != q.shape:
            raise ValueError(
                f"k must have the same shape as q {q.shape}; got {k.shape}. "
                "Pass k=None for position-only attention."
            )
    if v is not None:
        _check_float("v", v)
        if v.ndim != 5 or v.shape[:4] != q.shape[:4]:
            raise ValueError(
                f"v must have shape (batch, height, width, heads, value_dim) with the first four "
                f"equal to q's {q.shape[:4]}; got {v.shape}."
            )
    if (rel_row is None) != (rel_col is None):
        raise ValueError(
            "rel_row and rel_col must be given together or both be None; got "
            f"rel_row={_describe(rel_row)}, rel_col={_describe(rel_col)}."
        )
    if rel_row is None:
        if k is None:
            raise ValueError(
                "k is None and rel_row/rel_col are None: every logit would be zero. "
                "Pass k, or relative tables for position-only attention."
            )
        return
    head_dim = q.shape[-1]
    if head_dim % 2:
        raise ValueError(
            f"the head width q.shape[-1] must be even with relative tables (half is "
            f"matched with rel_row, half with rel_col); got {head_dim}. Use an even "
            "head width or pass rel_row=rel_col=None."
        )
    expected = (kernel_size, head_dim // 2)
    for name, table in (("rel_row", rel_row), ("rel_col", rel_col)):
        _check_float(name, table)
        if table.shape != expected:
            raise ValueError(
                f"{name} must have shape ({table_rows}, head_dim // 2) = {expected}; "
                f"got {table.shape}."
            )


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}.")


def _describe(x) -> str:
    return "None" if x is None else f"array of shape {x.shape}"
