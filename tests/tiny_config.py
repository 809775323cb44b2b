"""The tests' training config: SASA ResNet-26 (attention in group 4) at width 1/8 on 16²
digits, cheap to compile. A config file, so that subprocess tests can pass it to train.py:

    python train.py --config tests/tiny_config.py:steps=40 --workdir ...
"""

import pathlib

from sasa_flax import config_lib

DIGITS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "digits.py"


def get_config(arg=None):
    args = config_lib.parse_arg(arg, steps=6, checkpoint_every=2, batch=32)
    config = config_lib.load_config(str(DIGITS))
    config.model.update(width=0.125, num_heads=2, spatial=("conv", "conv", "conv", "attention"))
    config.input.update(image_size=16, batch_size=args.batch, eval_batch_size=40)
    config.train.update(
        num_steps=args.steps,
        warmup_epochs=0.0,
        base_learning_rate=0.4,  # lr 0.05: a few steps from scratch, no warm-up
        log_every_steps=1,
        checkpoint_every_steps=args.checkpoint_every,
    )
    return config
