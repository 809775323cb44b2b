r"""Paper Table 5: positional encoding (ResNet-50, conv stem + attention).

    python train.py --config configs/table5_pos_encoding.py:pos_encoding=absolute --workdir DIR

The paper's numbers are ``PAPER_ROWS`` below (written once: ``report --results`` shows
them beside a run's).

See ``SelfAttention2D`` for how the absolute encoding enters the logits.

Evaluated as the paper measured it: on the held-out 4% of the training set
(``input.tuning_split=True``), trained on the other 96%.
"""

from sasa_flax import config_lib, recipes

PAPER_ROWS = {
    f"pos_encoding={name}": dict(top1=top1)
    for name, top1 in [("none", 77.6), ("absolute", 78.2), ("relative", 80.2)]
}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, pos_encoding="relative", runlocal=False)
    config = recipes.imagenet_config(50, "conv_stem_attention", arg.runlocal)
    config.model.pos_encoding = arg.pos_encoding
    config.input.tuning_split = True  # the paper's numbers are on the held-out 4%
    return config
