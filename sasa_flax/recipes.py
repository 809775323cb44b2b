"""The SASA recipes the shipped configs start from: the paper's ImageNet recipe (A.2) with
its Table 1 variants, and the small-image recipe of the laptop and CIFAR configs.

Generic config parsing and checking is ``config_lib``'s; this module is only SASA's
choices, so a config for another model or recipe need not touch it.
"""

from __future__ import annotations

import ml_collections

from sasa_flax import config_lib

# Table 1 variants: which stem and which spatial layer in each of the four groups.
VARIANTS = {
    "baseline": dict(stem="conv", spatial=("conv",) * 4),
    "conv_stem_attention": dict(stem="conv", spatial=("attention",) * 4),
    "full_attention": dict(stem="attention", spatial=("attention",) * 4),
}


def imagenet_config(
    depth: int = 50, variant: str = "full_attention", runlocal: bool = False
) -> ml_collections.ConfigDict:
    """A Table 1 model on ImageNet at 224², with the paper's recipe (A.2): Nesterov SGD,
    lr 0.1 per 256 images (1.6 at batch 4096), 10 warm-up epochs then cosine over 130,
    BatchNorm and parameter-EMA decay 0.9999. Evaluated on ImageNet's validation set.

    ``runlocal`` shrinks the model (width 0.25), the images (64²) and the run to a smoke
    test that fits a laptop: ``small_recipe``'s batch of 128, 20 steps.
    """
    if variant not in VARIANTS:
        raise config_lib.ConfigError(f"variant must be one of {tuple(VARIANTS)}; got {variant!r}.")
    config = config_lib.base_config()
    config.model.depth = depth
    config.model.update(VARIANTS[variant])
    # Paper A.2: batch-norm decay 0.9999 (long ImageNet runs; small runs want 0.9).
    config.model.bn_momentum = 0.9999
    if runlocal:
        small_recipe(config)
        config.model.width = 0.25
        config.input.update(image_size=64, augment="inception", random_flip=True)
        config.train.update(
            num_steps=20, warmup_epochs=0.0, log_every_steps=5, checkpoint_every_steps=10
        )
    return config


def small_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sets every input and training field to the small-image recipe (in place; returns
    ``config``), so that the small configs share nothing with the ImageNet recipe.

    The recipe is the common CIFAR one for ResNets (kuangliu/pytorch-cifar: 95% with a
    ResNet-18; He et al. 2016, §4.2, for the batch, momentum and augmentation): batch 128,
    4-pixel pad-and-crop with flips, Nesterov SGD with momentum 0.9 and lr 0.1 (base 0.2
    per 256 images), cosine decay over 200 epochs after 1 warm-up epoch, weight decay
    5e-4, BatchNorm decay 0.9, and an EMA of decay 0.999 with warm-up.
    """
    if "bn_momentum" in config.model:  # a registered model without BatchNorm has none
        config.model.bn_momentum = 0.9
    config.input.update(
        batch_size=128,
        eval_batch_size=512,
        augment="pad",
        random_flip=True,
        tuning_split=False,
        shuffle_buffer=50_000,
    )
    config.train.update(
        num_epochs=200.0,
        num_steps=0,
        warmup_epochs=1.0,
        base_learning_rate=0.2,  # lr 0.1 at batch 128
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        label_smoothing=0.0,
        ema_decay=0.999,
        ema_warmup=True,
        log_every_steps=100,
        eval_every_steps=0,
        checkpoint_every_steps=1000,
    )
    return config


def small_base_config() -> ml_collections.ConfigDict:
    """``base_config``'s fields with ``small_recipe``: the base of the small configs."""
    return small_recipe(config_lib.base_config())
