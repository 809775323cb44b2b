r"""Paper Table 4: spatial extent k of the attention (ResNet-50, conv stem + attention).

    python train.py --config configs/table4_kernel_size.py:kernel_size=9 --workdir DIR

The paper's numbers are ``PAPER_ROWS`` below (written once: ``report --results`` shows
them beside a run's).

Parameters do not depend on k except for the small relative tables (k × d per layer).

The paper does not say which split these were measured on; evaluated on ImageNet's
validation set (set ``--config.input.tuning_split=True`` for the held-out 4%).
"""

from sasa_flax import config_lib, recipes

PAPER_ROWS = {
    f"kernel_size={k}": dict(top1=top1)
    for k, top1 in [(3, 76.4), (5, 77.2), (7, 77.4), (9, 77.7), (11, 77.6)]
}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, kernel_size=7, runlocal=False)
    config = recipes.imagenet_config(50, "conv_stem_attention", arg.runlocal)
    config.model.kernel_size = arg.kernel_size
    return config
