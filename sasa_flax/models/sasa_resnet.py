"""``config.model.name = "sasa_resnet"``: a SASA ResNet (``resnet.ResNet``) from the config's
flat fields, every layer option one override."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flax import nnx

from sasa_flax.errors import ArgumentError
from sasa_flax.layers import AttentionOptions, StemOptions
from sasa_flax.models.registry import register
from sasa_flax.models.resnet import Defaults, Dtype, ResNet

# The defaults, each written once where it belongs: ResNet's in ``resnet.Defaults``; the
# options' as the classes' attributes.
_R, _A, _S = Defaults, AttentionOptions, StemOptions


def _options(options_class, config_name: Callable[[str], str], **fields):
    """``options_class(**fields)``; an error names the argument as ``config.model`` does."""
    try:
        return options_class(**fields)
    except ArgumentError as e:
        raise e.renamed(config_name(e.argument)) from None


def attention_options(*, attention_impl: str = _A.impl, **fields) -> AttentionOptions:
    """``AttentionOptions`` from ``config.model``'s names (``attention_impl`` is ``impl``)."""
    impl_named = lambda name: "attention_impl" if name == "impl" else name  # noqa: E731
    return _options(AttentionOptions, impl_named, impl=attention_impl, **fields)


@register("sasa_resnet", implementation_fields=("attention_impl",))
def sasa_resnet(
    *,
    depth: int = _R.depth,
    width: float = _R.width,
    stem: str = _R.stem,
    spatial: Sequence[str] = _R.spatial,
    # AttentionOptions, as they are (``impl`` is ``attention_impl``):
    num_heads: int = _A.num_heads,
    kernel_size: int = _A.kernel_size,
    pos_encoding: str = _A.pos_encoding,
    content: bool = _A.content,
    padding: str = _A.padding,
    relative_tables: str = _A.relative_tables,
    scale_queries: bool = _A.scale_queries,
    attention_impl: str = _A.impl,
    # StemOptions, prefixed ``stem_``:
    stem_variant: str = _S.variant,
    stem_num_heads: int = _S.num_heads,
    stem_block_size: int = _S.block_size,
    stem_pool_size: int = _S.pool_size,
    stem_num_mixtures: int = _S.num_mixtures,
    stem_value_kernel_size: int = _S.value_kernel_size,
    num_classes: int = _R.num_classes,
    zero_init_last_bn: bool = _R.zero_init_last_bn,
    bn_momentum: float = _R.bn_momentum,
    bn_epsilon: float = _R.bn_epsilon,
    dtype: Dtype | None = None,
    param_dtype: Dtype = _R.param_dtype,
    rngs: nnx.Rngs,
) -> ResNet:
    """A SASA ResNet from ``config.model``'s flat fields: ``ResNet``'s arguments with its
    ``attention`` and ``stem_options`` objects written out field by field, so that every
    option is one override (``--config.model.kernel_size=5``,
    ``--config.model.stem_block_size=2``). The defaults are ``ResNet``'s and the options
    classes' own (a test holds them equal)."""
    attention = attention_options(
        num_heads=num_heads,
        kernel_size=kernel_size,
        pos_encoding=pos_encoding,
        content=content,
        padding=padding,
        relative_tables=relative_tables,
        scale_queries=scale_queries,
        attention_impl=attention_impl,
    )
    stem_options = _options(
        StemOptions,
        lambda name: f"stem_{name}",
        variant=stem_variant,
        num_heads=stem_num_heads,
        block_size=stem_block_size,
        pool_size=stem_pool_size,
        num_mixtures=stem_num_mixtures,
        value_kernel_size=stem_value_kernel_size,
    )
    return ResNet(
        depth=depth,
        width=width,
        stem=stem,
        spatial=tuple(spatial) if isinstance(spatial, list | tuple) else spatial,
        attention=attention,
        stem_options=stem_options,
        num_classes=num_classes,
        zero_init_last_bn=zero_init_last_bn,
        bn_momentum=bn_momentum,
        bn_epsilon=bn_epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )
