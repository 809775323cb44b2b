"""SelfAttention2D and AttentionStem: shapes, parameter counts, wiring, options, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from sasa_flax.layers import AttentionStem, SelfAttention2D, sinusoidal_2d
from tests import reference
from tests.helpers import FD_STEP, param_count


def param_names(module) -> set[str]:
    return {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize("kernel_size", [3, 7, 11])
def test_parameter_count_of_the_defaults(kernel_size):
    d_in, d_out, heads = 24, 64, 8
    layer = SelfAttention2D(d_in, d_out, num_heads=heads, kernel_size=kernel_size, rngs=nnx.Rngs(0))
    assert param_count(layer) == 3 * d_in * d_out + kernel_size * (d_out // heads)


@pytest.mark.parametrize(
    "options,expected",
    [
        (dict(pos_encoding="none"), 3 * 16 * 32),
        (dict(pos_encoding="absolute"), 3 * 16 * 32),
        (dict(content=False), 2 * 16 * 32 + 5 * 8),
        (dict(relative_tables="per_head"), 3 * 16 * 32 + 4 * 5 * 8),
    ],
)
def test_parameter_count_of_the_options(options, expected):
    layer = SelfAttention2D(16, 32, num_heads=4, kernel_size=5, rngs=nnx.Rngs(0), **options)
    assert param_count(layer) == expected


def test_content_false_has_no_key_projection():
    layer = SelfAttention2D(16, 32, num_heads=4, content=False, rngs=nnx.Rngs(0))
    assert layer.key is None
    assert not any(name.startswith("key") for name in param_names(layer))
    assert any(
        name.startswith("key") for name in param_names(SelfAttention2D(16, 32, rngs=nnx.Rngs(0)))
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(padding="zeros"),
        dict(content=False),
        dict(pos_encoding="absolute"),
        dict(pos_encoding="absolute", content=False),
        dict(pos_encoding="none"),
        dict(relative_tables="per_head"),
        dict(scale_queries=False),
    ],
    ids=str,
)
def test_module_matches_the_reference_with_its_own_weights(rng, options):
    """Projections, head split, scaling and tables are wired as the paper says."""
    d_in, d_out, heads, ks = 6, 8, 2, 3
    layer = SelfAttention2D(
        d_in, d_out, num_heads=heads, kernel_size=ks, rngs=nnx.Rngs(1), **options
    )
    x = rng.standard_normal((1, 4, 5, d_in)).astype(np.float32)
    y = np.asarray(layer(jnp.asarray(x)))

    d = d_out // heads
    split = lambda t: t.reshape(1, 4, 5, heads, d)
    q = split(x @ np.asarray(layer.query.kernel[...]))
    if layer.options.scale_queries:
        q = q / np.sqrt(d)
    v = split(x @ np.asarray(layer.value.kernel[...]))
    k = split(x @ np.asarray(layer.key.kernel[...])) if layer.options.content else None
    if layer.options.pos_encoding == "absolute":
        p = np.broadcast_to(sinusoidal_2d(4, 5, d)[None, :, :, None, :], q.shape)
        k = p if k is None else k + p
    expected = np.zeros(q.shape)
    expected_weights = np.zeros((1, 4, 5, heads, ks, ks))
    for n in range(heads):
        tables = (None, None)
        if layer.options.pos_encoding == "relative":
            tables = (np.asarray(layer.rel_row[...]), np.asarray(layer.rel_col[...]))
            if layer.options.relative_tables == "per_head":
                tables = (tables[0][n], tables[1][n])
        one = lambda t, n=n: None if t is None else t[:, :, :, n : n + 1]
        expected[:, :, :, n : n + 1], expected_weights[:, :, :, n : n + 1] = (
            reference.local_attention(one(q), one(k), one(v), *tables, ks, layer.options.padding)
        )
    np.testing.assert_allclose(y, expected.reshape(y.shape), atol=1e-5)
    # The lean weights of a few pixels (sasa_flax.visualize) are the same weights, and
    # the mask marks the neighbours outside the image.
    positions = [(0, 0), (2, 3), (3, 4)]
    weights, inside = layer.attention_weights(jnp.asarray(x), positions)
    for p, (i, j) in enumerate(positions):
        np.testing.assert_allclose(weights[:, p], expected_weights[:, i, j], atol=1e-5)
        rows, cols = np.arange(i - 1, i + 2), np.arange(j - 1, j + 2)
        in_image = ((rows >= 0) & (rows < 4))[:, None] & ((cols >= 0) & (cols < 5))[None, :]
        np.testing.assert_array_equal(inside[p], in_image)


def test_bfloat16_compute_keeps_float32_parameters(rng):
    layer = SelfAttention2D(
        16, 32, num_heads=4, kernel_size=3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 16)), jnp.float32)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    y32 = SelfAttention2D(16, 32, num_heads=4, kernel_size=3, rngs=nnx.Rngs(0))(x)
    assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - y32))) < 5e-2 * float(
        jnp.max(jnp.abs(y32))
    )


@pytest.mark.parametrize(
    "options",
    [
        dict(impl="shifted"),
        dict(relative_tables="per_head", padding="zeros"),
        dict(pos_encoding="absolute"),
    ],
    ids=str,
)
def test_jitted_layer_gradients_match_finite_differences_in_float64(rng, options):
    """The whole layer's gradients (projections, head split, scaling, tables; input and
    every parameter), under jit, against central differences in float64."""
    with jax.enable_x64(True):
        layer = SelfAttention2D(
            6,
            8,
            num_heads=2,
            kernel_size=3,
            param_dtype=jnp.float64,
            rngs=nnx.Rngs(0),
            **options,
        )
        graphdef, params = nnx.split(layer)
        x = jnp.asarray(rng.standard_normal((1, 4, 5, 6)))
        forward = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))
        assert forward(params, x).dtype == jnp.float64
        check_grads(
            forward, (params, x), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=FD_STEP
        )


@pytest.mark.parametrize("scale", [None, 0.125])
def test_the_projections_channels_first_are_the_same_products(rng, scale):
    """On TPU the q/k/v projections are computed channels-first (``project_heads``): the
    same (B, H, W, N, d) as one 2-D matmul and a head split, with the same scaling."""
    from sasa_flax.layers import common

    x = jnp.asarray(rng.standard_normal((2, 3, 5, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((6, 12)), jnp.float32)
    with jax.default_matmul_precision("highest"):
        rows_first = common.heads_rows_first(x, kernel, 3, scale)
        channels_first = common.heads_channels_first(x, kernel, 3, scale)
    expected = np.einsum("bhwc,co->bhwo", np.float64(x), np.float64(kernel)).reshape(
        2, 3, 5, 3, 4
    ) * (scale or 1.0)
    np.testing.assert_allclose(rows_first, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(channels_first, expected, rtol=1e-5, atol=1e-5)


def test_sinusoidal_encoding():
    p = sinusoidal_2d(5, 7, 8)
    assert p.shape == (5, 7, 8) and p.dtype == np.float32
    np.testing.assert_array_equal(p[:, 0, :4], p[:, 3, :4])  # rows half: same along a row
    np.testing.assert_array_equal(p[0, :, 4:], p[2, :, 4:])  # columns half: same down a column
    flat = p.reshape(35, 8)
    assert len({tuple(np.round(r, 6)) for r in flat}) == 35  # every position distinct
    assert np.all(np.abs(p) <= 1.0)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(num_heads=3), "divisible by num_heads=3"),
        (dict(kernel_size=4), "kernel_size must be a positive odd integer"),
        (dict(pos_encoding="learned"), "pos_encoding must be one of"),
        (dict(padding="reflect"), "padding must be one of"),
        (dict(content=False, pos_encoding="none"), "content=False with pos_encoding='none'"),
        (dict(num_heads=32), "head width out_features / num_heads = 1 must be even"),
        (dict(relative_tables="grouped"), "relative_tables must be one of"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_options_raise_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        SelfAttention2D(16, 32, rngs=nnx.Rngs(0), **options)


def test_wrong_input_channels_are_named():
    layer = SelfAttention2D(16, 32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features=16"):
        layer(jnp.zeros((1, 8, 8, 3)))


# --- the attention stem ---------------------------------------------------------


@pytest.mark.parametrize("variant", ["spatially_aware", "stand_alone", "conv_values"])
def test_stem_shapes(variant):
    stem = AttentionStem(variant=variant, rngs=nnx.Rngs(0))
    assert stem(jnp.ones((2, 32, 16, 3))).shape == (2, 8, 4, 64)


def test_stem_variants_differ(rng):
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    outputs = {
        v: np.asarray(AttentionStem(variant=v, rngs=nnx.Rngs(0))(x))
        for v in ("spatially_aware", "stand_alone", "conv_values")
    }
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(outputs[a], outputs[b], atol=1e-3), (a, b)


def test_spatially_aware_values_follow_the_formula(rng):
    """v~_ab = (Σ_m p(a,b,m) W_V^m) x_ab, p = softmax_m((emb_row[a] + emb_col[b])·ν_m)."""
    stem = AttentionStem(variant="spatially_aware", rngs=nnx.Rngs(0))
    stem.mixture_logit_vectors[...] = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    x = rng.standard_normal((1, 8, 8, 3)).astype(np.float64)
    values = np.asarray(stem.values(jnp.asarray(x, jnp.float32)))
    emb_row, emb_col = np.asarray(stem.emb_row[...]), np.asarray(stem.emb_col[...])
    nu, w = np.asarray(stem.mixture_logit_vectors[...]), np.asarray(stem.value_mixture[...])
    for i in range(8):
        for j in range(8):
            a, b = i % 4, j % 4  # position inside the 4×4 block
            logits = np.array([(emb_row[a] + emb_col[b]) @ nu[m] for m in range(4)])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            mixed = sum(p[m] * w[m] for m in range(4))
            np.testing.assert_allclose(values[0, i, j], x[0, i, j] @ mixed, rtol=1e-4, atol=1e-5)
    # and the mixture is not trivially uniform in this check
    assert np.ptp(np.asarray(stem.mixture_weights())) > 0.05


@pytest.mark.parametrize("variant", ["spatially_aware", "stand_alone", "conv_values"])
def test_the_stem_attends_in_blocks_as_the_block_operator_does(rng, variant):
    """The stem projects its input in the blocked layout; in float64 its attention equals
    ``block_local_attention`` (checked against the loop reference in
    test_block_attention.py) on q, k and v projected in the image's own layout."""
    from sasa_flax.ops import block_local_attention

    with jax.enable_x64(True):
        stem = AttentionStem(
            3, 16, variant=variant, num_heads=2, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
        )
        if variant == "spatially_aware":  # a mixture that depends on the block position
            stem.mixture_logit_vectors[...] = jnp.asarray(rng.standard_normal((4, 8)))
        x = jnp.asarray(rng.standard_normal((2, 8, 12, 3)))
        split = lambda y: y.reshape(*y.shape[:3], 2, 8)  # noqa: E731
        q = x @ stem.query.kernel[...] * 8**-0.5
        k = x @ stem.key.kernel[...]
        expected = block_local_attention(
            split(q),
            split(k),
            split(stem.values(x)),
            stem.rel_row[...],
            stem.rel_col[...],
            block_size=4,
        ).reshape(2, 8, 12, 16)
        np.testing.assert_allclose(stem.attend(x), expected, rtol=1e-12, atol=1e-12)


def test_stem_mixture_starts_uniform():
    stem = AttentionStem(rngs=nnx.Rngs(0))
    np.testing.assert_allclose(stem.mixture_weights(), 0.25, rtol=1e-6)


def test_stem_train_and_eval_modes_use_batch_statistics_differently(rng):
    stem = AttentionStem(variant="stand_alone", rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
    train_out = stem(x)  # updates running statistics
    stem.eval()
    assert not np.allclose(train_out, stem(x), atol=1e-3)


@pytest.mark.parametrize(
    "options,shape,match",
    [
        (dict(variant="conv"), None, "variant must be one of"),
        (dict(num_heads=5), None, "divisible by num_heads=5"),
        (dict(), (1, 18, 16, 3), "multiples of 4"),
        (dict(), (1, 16, 16, 4), "in_features=3"),
    ],
)
def test_stem_errors(options, shape, match):
    with pytest.raises(ValueError, match=match):
        AttentionStem(rngs=nnx.Rngs(0), **options)(jnp.zeros(shape or (1, 16, 16, 3)))


@pytest.mark.parametrize("variant", ["spatially_aware", "stand_alone", "conv_values"])
def test_stem_in_strips_equals_the_whole_image(rng, variant):
    """At 128² and more the stem attends one strip of blocks at a time, rematerialised
    (memory); outputs and every parameter gradient equal the whole-image computation."""
    from sasa_flax.layers.stem import _stem_strips

    assert _stem_strips(128, 128, 4) == 8 and _stem_strips(224, 224, 4) == 8
    assert _stem_strips(64, 64, 4) == 1 and _stem_strips(128, 96, 4) == 1
    stem = AttentionStem(3, 16, variant=variant, num_heads=2, rngs=nnx.Rngs(0))
    if variant == "spatially_aware":  # a mixture that depends on the block position
        stem.mixture_logit_vectors[...] = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 128, 128, 3)), jnp.float32)
    graphdef, params, rest = nnx.split(stem, nnx.Param, ...)

    def run(params, method):
        module = nnx.merge(graphdef, params, rest)
        y = getattr(module, method)(x)
        return jnp.sum(y * jnp.sin(y)), y

    grad = jax.jit(jax.value_and_grad(run, has_aux=True), static_argnums=1)
    (_, y_strips), g_strips = grad(params, "attend_in_strips")
    (_, y_whole), g_whole = grad(params, "attend")
    # Two float32 computations that sum in another order: outputs are of order 1, so the
    # absolute tolerance is ~100 ulp of that scale (a misplaced strip border is off by ~0.1;
    # 1e-6 failed on one element in 524,288 on CI's CPUs).
    np.testing.assert_allclose(y_strips, y_whole, rtol=1e-5, atol=1e-5)
    leaves = zip(jax.tree.leaves(g_strips), jax.tree.leaves(g_whole), strict=True)
    for got, want in leaves:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g_whole)) > 0
