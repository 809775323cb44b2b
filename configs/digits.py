r"""The offline quickstart model: scikit-learn's handwritten digits upsampled to 32².

    python train.py --config configs/digits.py --workdir /tmp/sasa-digits

A SASA ResNet-26 with attention in every group, the ``cifar`` stem and width 0.25
(4 heads of width 4 in the first group), k = 5. Needs no download.
"""

from sasa_flax import config_lib


def get_config(arg=None):
    config_lib.parse_arg(arg)
    config = config_lib.base_config()
    config.model.update(
        depth=26,
        width=0.25,
        stem="cifar",
        spatial=("attention",) * 4,
        kernel_size=5,
        num_heads=4,
        num_classes=10,
    )
    config.input.update(dataset="digits", image_size=32)
    return config
