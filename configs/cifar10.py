r"""A laptop-sized SASA ResNet-26 for CIFAR-10 (32² images, ``cifar`` stem).

    python train.py --config configs/cifar10.py --workdir DIR
    python train.py --config configs/cifar10.py:variant=baseline --workdir DIR   # the conv twin

Width 0.5, conv in group 1 and attention in groups 2-4 (the paper's best layer mix,
Table 3), k = 5 (a 7×7 window is most of a 4×4 or 8×8 feature map), 8 heads.
Not a paper number: a small, fast model for trying ideas. Evaluated on CIFAR-10's test
set (10,000 images).

Recipe (``recipes.small_recipe``): batch 128 (390 steps per epoch), 200 epochs, 1
warm-up epoch, Nesterov SGD lr 0.1 with cosine decay, weight decay 5e-4, pad-and-crop
with flips, EMA 0.999 with warm-up. Expected, not measured here (CIFAR-10 cannot be
downloaded on the development machine): about 93-95% top-1, as this recipe gives a
ResNet-18 of similar size (kuangliu/pytorch-cifar).
"""

from sasa_flax import config_lib, recipes

_SPATIAL = {
    "baseline": ("conv",) * 4,
    "mixed": ("conv", "attention", "attention", "attention"),
    "full_attention": ("attention",) * 4,
}


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, variant="mixed")
    if arg.variant not in _SPATIAL:
        raise config_lib.ConfigError(
            f"variant must be one of {tuple(_SPATIAL)}; got {arg.variant!r}."
        )
    config = recipes.small_base_config()
    config.model.update(
        depth=26,
        width=0.5,
        stem="cifar",
        spatial=_SPATIAL[arg.variant],
        kernel_size=5,
        num_classes=10,
    )
    config.input.update(dataset="cifar10", image_size=32)
    return config
