"""SASA ResNets built from every shipped config: shapes, parameter counts, layer mix, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasa_flax import config_lib, recipes
from sasa_flax.layers import AttentionStem, SelfAttention2D
from sasa_flax.models import resnet
from tests.helpers import (
    CONFIG_DIR,
    ROOT,
    default_and_slow,
    model_count,
    param_count,
    shipped_config_specs,
)

SPECS = shipped_config_specs()


def abstract_model(config):
    return config_lib.build_model(config)


def abstract_forward(model, batch, size):
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)


# By default one config per family (the paper's largest model, the small ones); every
# shipped config in the slow selection.
DEFAULT_SPECS = [
    spec
    for spec in SPECS
    if spec.endswith(("imagenet.py:depth=50,variant=full_attention", "digits.py", "cifar10.py"))
]


@pytest.mark.parametrize(
    "spec", default_and_slow(SPECS, DEFAULT_SPECS), ids=lambda s: s.split("configs/")[-1]
)
def test_every_config_builds_counts_and_runs(spec):
    config = config_lib.load_config(spec)
    # The analytic count (costs.count) equals the built model's, at the config's size.
    assert model_count(config)[0] == param_count(abstract_model(config))
    # The forward pass traces at a small resolution and width.
    config.model.width = 0.25
    config.input.image_size = 32
    out = abstract_forward(abstract_model(config), 2, 32)
    assert out.shape == (2, config.model.num_classes) and out.dtype == jnp.float32


# Exact parameter counts at 1000 classes, computed from the built models.
TABLE1_PARAMS = {
    (26, "baseline"): 13_696_552,
    (38, "baseline"): 19_626_792,
    (50, "baseline"): 25_557_032,  # = torchvision's ResNet-50
    (26, "conv_stem_attention"): 10_331_264,
    (38, "conv_stem_attention"): 14_173_384,
    (50, "conv_stem_attention"): 18_015_504,
    (26, "full_attention"): 10_323_312,
    (38, "full_attention"): 14_165_432,
    (50, "full_attention"): 18_007_552,
}
PAPER = config_lib.load_config_module(str(CONFIG_DIR / "imagenet.py")).PAPER_ROWS


def _readme_table1_row(depth: int, variant: str) -> list[str]:
    """The cells of the README's Table 1 row for (depth, variant), after the name."""
    name = {
        "baseline": "baseline",
        "conv_stem_attention": "conv stem + attention",
        "full_attention": "full attention",
    }[variant]
    rows = [
        line.split("|")[2:-1]
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith(f"| ResNet-{depth} {name} |")
    ]
    assert len(rows) == 1, (depth, variant, rows)
    return [cell.strip() for cell in rows[0]]


@pytest.mark.parametrize("depth,variant", list(TABLE1_PARAMS))
def test_table1_parameters_and_flops(depth, variant):
    """Our counts against the paper's, and the README's Table 1 row is both (so the
    README's table is checked, not a copy)."""
    arg = f"depth={depth},variant={variant}"
    config = recipes.imagenet_config(depth, variant)
    params = param_count(abstract_model(config))
    assert params == TABLE1_PARAMS[(depth, variant)]
    paper = PAPER[arg]
    gflops = model_count(config)[1] / 1e9
    assert abs(params / 1e6 - paper["mparams"]) <= 0.1
    assert abs(gflops - paper["gflops"]) <= 0.15
    assert _readme_table1_row(depth, variant) == [
        f"{params / 1e6:.2f}",
        f"{paper['mparams']}",
        f"{gflops:.2f}",
        f"{paper['gflops']}",
        f"{paper['top1']}",
    ]


@pytest.mark.parametrize("mix", ["CCAA", "ACCC", "CACA", "AAAA", "CCCC"])
def test_layer_mix_puts_attention_exactly_where_asked(mix):
    config = config_lib.load_config(f"configs/table3_layer_mix.py:mix={mix}")
    model = abstract_model(config)
    for block in model.blocks:
        wanted = mix[block.spec.group] == "A"
        assert isinstance(block.spatial, SelfAttention2D) == wanted
        assert isinstance(block.spatial, nnx.Conv) != wanted


def test_attention_stem_is_used_for_full_attention():
    model = abstract_model(recipes.imagenet_config(26, "full_attention"))
    assert isinstance(model.stem, AttentionStem)
    assert isinstance(abstract_model(recipes.imagenet_config(26, "baseline")).stem, resnet.ConvStem)


def test_odd_resolutions_downsample_consistently():
    # 36 -> 36, 18, 9, 5: attention + pool and the strided shortcut agree on ceil(9 / 2).
    config = config_lib.load_config("configs/digits.py")
    config.input.image_size = 36
    assert abstract_forward(abstract_model(config), 1, 36).shape == (1, 10)


@pytest.mark.parametrize("zero_init", [True, False])
def test_last_batch_norm_scale_initialisation(zero_init):
    config = config_lib.load_config("configs/digits.py")
    config.model.zero_init_last_bn = zero_init
    model = config_lib.build_model(config, rngs=nnx.Rngs(0))
    expected = 0.0 if zero_init else 1.0
    assert all(np.all(np.asarray(b.bn3.scale[...]) == expected) for b in model.blocks)
    assert all(np.all(np.asarray(b.bn1.scale[...]) == 1.0) for b in model.blocks)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["baseline", "conv_stem_attention", "full_attention"])
def test_compiled_forward_runs_and_trains_batch_norm(variant):
    config = recipes.imagenet_config(26, variant, runlocal=True)
    model = config_lib.build_model(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        model = nnx.merge(graphdef, state)
        return model(images), nnx.state(model)

    images = 3.0 + jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    logits, new_state = forward(state, images)
    assert logits.shape == (2, 1000) and bool(jnp.all(jnp.isfinite(logits)))
    # Train mode: the stem's running mean moved away from its initial zeros.
    stem_mean = nnx.merge(graphdef, new_state).stem.bn.mean[...]
    assert float(jnp.max(jnp.abs(stem_mean))) > 0.0
    assert float(jnp.max(jnp.abs(model.stem.bn.mean[...]))) == 0.0


@pytest.mark.slow
def test_bfloat16_forward():
    config = recipes.imagenet_config(26, "full_attention", runlocal=True)
    model = config_lib.build_model(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    model.eval()
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    logits = nnx.jit(lambda m, x: m(x))(model, images)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    model32 = config_lib.build_model(config, rngs=nnx.Rngs(0))
    model32.eval()
    logits32 = nnx.jit(lambda m, x: m(x))(model32, images)
    scale = float(jnp.max(jnp.abs(logits32)))
    assert float(jnp.max(jnp.abs(logits - logits32))) < 0.05 * scale


def test_every_resnet_and_options_argument_is_a_config_field_with_its_own_default():
    """``sasa_resnet`` writes ResNet's options out as flat config fields: each field of
    ``AttentionOptions`` (``impl`` as ``attention_impl``) and of ``StemOptions``
    (prefixed ``stem_``) and each of ``ResNet``'s own arguments is one, with the class's
    own default. A field added to an options class without its config field fails here,
    instead of being silently out of reach of configs."""
    import dataclasses
    import inspect

    from sasa_flax.layers import AttentionOptions, StemOptions
    from sasa_flax.models import registry

    expected = {}
    for p in inspect.signature(resnet.ResNet.__init__).parameters.values():
        if p.name not in ("self", "attention", "stem_options", *registry.NOT_FIELDS):
            expected[p.name] = p.default
    for f in dataclasses.fields(AttentionOptions):
        expected["attention_impl" if f.name == "impl" else f.name] = f.default
    for f in dataclasses.fields(StemOptions):
        expected[f"stem_{f.name}"] = f.default
    assert registry.arguments("sasa_resnet") == expected


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("attention_impl", "fast", "attention_impl='fast'"),
        ("kernel_size", 4, "kernel_size=4"),
        ("stem_block_size", 0, "stem_block_size=0"),
        ("stem_variant", "odd", "stem_variant='odd'"),
    ],
)
def test_an_option_error_names_the_config_field(field, value, named):
    config = config_lib.load_config("configs/imagenet.py:depth=26,variant=full_attention")
    config.model[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"config.model.{named}"):
        config_lib.validate(config)
