r"""Paper Table 6: the content term (ResNet-50, conv stem + attention).

    python train.py --config configs/table6_content.py:content=false --workdir DIR

``content=false``: logits q·r alone (no W_K, no q·k); ``content=true``: q·k + q·r.
The paper's numbers are ``PAPER_ROWS`` below (written once: ``report --results`` shows
them beside a run's).

The paper does not say which split these were measured on; evaluated on ImageNet's
validation set (set ``--config.input.tuning_split=True`` for the held-out 4%).
"""

from sasa_flax import config_lib, recipes

PAPER_ROWS = {"content=false": dict(top1=76.9), "content=true": dict(top1=77.4)}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, content=True, runlocal=False)
    config = recipes.imagenet_config(50, "conv_stem_attention", arg.runlocal)
    config.model.content = arg.content
    return config
