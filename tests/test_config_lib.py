"""Config parsing and validation: every bad field gets one message naming it."""

import pytest
from flax import nnx

from sasa_flax import config_lib, recipes


def test_parse_arg_types_values_by_their_defaults():
    arg = config_lib.parse_arg(
        "depth=26,runlocal=true,width=0.5", depth=50, runlocal=False, width=1.0
    )
    assert (arg.depth, arg.runlocal, arg.width) == (26, True, 0.5)
    assert config_lib.parse_arg(None, depth=50).depth == 50


@pytest.mark.parametrize(
    "arg,match",
    [
        ("detph=26", "unknown config argument 'detph'.*known arguments: depth"),
        ("depth", "needs a value"),
        ("depth=fifty", "must be a int"),
        ("runlocal=maybe", "must be true or false"),
    ],
)
def test_parse_arg_errors(arg, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.parse_arg(arg, depth=50, runlocal=False)


def good_config():
    return recipes.imagenet_config(50, "conv_stem_attention")


def with_fields(**fields):
    config = good_config()
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        config[section][name] = value
    return config


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(model__depth=34), r"config\.model\.depth=34: must be one of \(26, 38, 50\)"),
        (dict(model__stem="patchify"), r"config\.model\.stem='patchify': must be one of"),
        (dict(model__stem_variant="fancy"), r"config\.model\.stem_variant"),
        (
            dict(model__spatial=("conv", "attention", "conv")),
            r"config\.model\.spatial.*tuple of four",
        ),
        (dict(model__spatial=("conv", "attn", "conv", "conv")), r"group 2 is 'attn'"),
        (dict(model__kernel_size=6), r"config\.model\.kernel_size=6: must be a positive odd"),
        (
            dict(model__num_heads=7),
            r"config\.model\.num_heads=7: must divide the 64 channels of group 1",
        ),
        (dict(model__width=0.25, model__num_heads=16), r"heads of odd width 1 in group 1"),
        (dict(model__pos_encoding="learned"), r"config\.model\.pos_encoding='learned'"),
        (dict(model__padding="reflect"), r"config\.model\.padding"),
        (dict(model__attention_impl="cuda"), r"config\.model\.attention_impl"),
        (dict(model__content=False, model__pos_encoding="none"), r"config\.model\.content=False"),
        (dict(model__width=-1.0), r"config\.model\.width=-1\.0"),
        (dict(model__num_classes=0), r"config\.model\.num_classes=0"),
        (dict(model__bn_momentum=1.0), r"config\.model\.bn_momentum"),
        (dict(input__image_size=0), r"config\.input\.image_size=0"),
        (
            dict(model__stem="attention", input__image_size=226),
            r"multiple of 4 with the attention stem",
        ),
        (
            # groups of 36/72/144/288 split into 2 heads, but the 36-channel stem
            # cannot take 4 heads of even width
            dict(model__stem="attention", model__width=0.5625, model__num_heads=2),
            r"config\.model\.width=0\.5625: gives an attention stem of 36",
        ),
    ],
)
def test_bad_fields_are_named(fields, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(with_fields(**fields))


def test_unknown_fields_are_named():
    config = good_config()
    config.model.kernal_size = 9
    with pytest.raises(
        config_lib.ConfigError, match=r"config\.model has unknown field\(s\) \['kernal_size'\]"
    ):
        config_lib.validate(config)


@pytest.mark.parametrize("rngs", [None, nnx.Rngs(0)], ids=["abstract", "concrete"])
def test_build_model_reports_the_models_argument_error_as_the_config_field(rngs):
    config = with_fields(model__kernel_size=4)
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.kernel_size=4: must be"):
        config_lib.build_model(config, rngs=rngs)


@pytest.mark.parametrize(
    "spec,field,value",
    [
        ("configs/imagenet.py:depth=38,variant=baseline", "depth", 38),
        ("configs/imagenet.py:depth=26,variant=full_attention", "stem", "attention"),
        (
            "configs/table3_layer_mix.py:mix=CCAA",
            "spatial",
            ("conv", "conv", "attention", "attention"),
        ),
        ("configs/table4_kernel_size.py:kernel_size=11", "kernel_size", 11),
        ("configs/table5_pos_encoding.py:pos_encoding=absolute", "pos_encoding", "absolute"),
        ("configs/table6_content.py:content=false", "content", False),
        ("configs/table7_stem.py:stem_variant=conv_values", "stem_variant", "conv_values"),
    ],
)
def test_config_arguments_set_their_field(spec, field, value):
    assert config_lib.load_config(spec).model[field] == value


@pytest.mark.parametrize(
    "spec,match",
    [
        ("configs/imagenet.py:variant=vit", "variant must be one of"),
        ("configs/table3_layer_mix.py:mix=CCA", "must be four letters"),
        ("configs/table4_kernel_size.py:kernel_size=8", r"config\.model\.kernel_size=8"),
        ("configs/nope.py", "does not exist"),
    ],
)
def test_bad_config_arguments(spec, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.load_config(spec)
