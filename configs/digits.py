r"""The offline quickstart: scikit-learn's handwritten digits upsampled to 32².

    python train.py --config configs/digits.py --workdir /tmp/sasa-digits
    python eval.py --config configs/digits.py --workdir /tmp/sasa-digits

A SASA ResNet-26 with attention in every group, the ``cifar`` stem and width 0.25
(4 heads of width 4 in the first group), k = 3. Real data (1,797 images, 10 classes; a
fixed 80/20 split) that needs no download; a few minutes on two CPU cores. Evaluated on
the 360 held-out test digits.

Recipe: ``recipes.small_recipe`` (the small-image base) with batch 32 (44 steps per
epoch), 12 epochs, 1 warm-up epoch, lr 0.2, weight decay 5e-4, no flips, no EMA.
"""

from sasa_flax import config_lib, recipes


def get_config(arg=None):
    config_lib.parse_arg(arg)
    config = recipes.small_base_config()
    config.model.update(
        depth=26,
        width=0.25,
        stem="cifar",
        spatial=("attention",) * 4,
        kernel_size=3,
        num_heads=4,
        num_classes=10,
    )
    config.input.update(
        dataset="digits",
        image_size=32,
        batch_size=32,
        eval_batch_size=120,
        augment="pad",
        random_flip=False,  # digits are not mirror-symmetric
    )
    config.train.update(
        num_epochs=12.0,
        warmup_epochs=1.0,
        base_learning_rate=1.6,  # lr 0.2 at batch 32
        weight_decay=5e-4,
        ema_decay=0.0,  # 500 steps are too few for a useful average
        log_every_steps=44,  # one line per epoch: 1437 // 32 = 44 steps
        checkpoint_every_steps=100,
    )
    return config
