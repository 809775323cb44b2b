r"""Paper Table 3: convolution or attention per group (ResNet-50, conv stem).

    python train.py --config configs/table3_layer_mix.py:mix=CCAA --workdir DIR

``mix`` has one letter per group, C = 3×3 convolution, A = attention (k=7, 8 heads).
The paper's top-1 (on its held-out 4% of the ImageNet training set) is ``PAPER_ROWS``
below, written once: ``report --results`` shows it beside a run's.

Convolutions early and attention late is best.

Evaluated as the paper measured it: on the held-out 4% of the training set
(``input.tuning_split=True``), trained on the other 96%.
"""

from sasa_flax import config_lib, recipes

PAPER_ROWS = {
    f"mix={mix}": dict(top1=top1)
    for mix, top1 in [
        ("AAAA", 80.2),
        ("CAAA", 80.7),
        ("CCAA", 80.7),
        ("CCCA", 80.2),
        ("CCCC", 79.5),
        ("ACCC", 79.7),
        ("AACC", 79.6),
        ("AAAC", 79.9),
    ]
}

_LETTERS = {"C": "conv", "A": "attention"}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, mix="CCAA", runlocal=False)
    mix = arg.mix.upper()
    if len(mix) != 4 or set(mix) - set(_LETTERS):
        raise config_lib.ConfigError(
            f"mix={arg.mix!r} must be four letters, C (conv) or A (attention), one per group, "
            "e.g. mix=CCAA."
        )
    config = recipes.imagenet_config(50, "conv_stem_attention", arg.runlocal)
    config.model.spatial = tuple(_LETTERS[c] for c in mix)
    config.input.tuning_split = True  # the paper's numbers are on the held-out 4%
    return config
