r"""Evaluate a checkpoint: `python eval.py --config configs/digits.py --workdir /tmp/sasa-digits`.

Restores the latest checkpoint (or --step N) of --workdir into the model the config
describes, evaluates every example of the eval split once (EMA weights when the run kept
them), prints top-1 / top-5 / loss and writes them to the workdir (JSON + TensorBoard).
"""

from absl import flags
from ml_collections import config_flags

from sasa_flax import cli, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "See train.py.")
_OTHER_SETTING = flags.DEFINE_bool(
    "other_setting",
    False,
    "Evaluate a dataset / split / image size / preprocessing other than the run's on purpose; "
    "the results go to eval_results_step_N_<setting>.json.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.start(argv, _DISTRIBUTED.value)
    with cli.user_errors():
        r = trainer.evaluate_checkpoint(
            _CONFIG.value, _WORKDIR.value, step=_STEP.value, other_setting=_OTHER_SETTING.value
        )
    print(
        f"step {r['step']}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  loss {r['loss']:.4f}"
        f"  ({r['num_examples']} examples; setting: {r['setting']})"
    )
    if not r["written"]:
        print(f"(not written: {_WORKDIR.value} is not writable)")


if __name__ == "__main__":
    cli.run(main)
