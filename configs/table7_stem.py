r"""Paper Table 7: the attention stem (ResNet-50, full attention).

    python train.py --config configs/table7_stem.py:stem_variant=stand_alone --workdir DIR

The paper's numbers are ``PAPER_ROWS`` below (written once: ``report --results`` shows
them beside a run's).

See ``AttentionStem`` for each variant and the choices the paper leaves open.

The paper does not say which split these were measured on; evaluated on ImageNet's
validation set (set ``--config.input.tuning_split=True`` for the held-out 4%).
"""

from sasa_flax import config_lib, recipes

PAPER_ROWS = {
    f"stem_variant={name}": dict(top1=top1)
    for name, top1 in [("stand_alone", 76.2), ("conv_values", 77.2), ("spatially_aware", 77.6)]
}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, stem_variant="spatially_aware", runlocal=False)
    config = recipes.imagenet_config(50, "full_attention", arg.runlocal)
    config.model.stem_variant = arg.stem_variant
    return config
