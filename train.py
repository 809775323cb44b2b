r"""Train a SASA ResNet: `python train.py --config configs/digits.py --workdir /tmp/sasa-digits`.

The same command on every host of a Cloud TPU pod (`--distributed` detects it). A
restarted run with the same --workdir resumes from its latest checkpoint.
"""

from absl import flags
from ml_collections import config_flags

from sasa_flax import cli, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and results (local or gs://).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' does on multi-host TPU / SLURM / when "
    "JAX_COORDINATOR_ADDRESS is set.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    cli.start(argv, _DISTRIBUTED.value)
    with cli.user_errors():
        results = trainer.train_and_evaluate(
            _CONFIG.value, _WORKDIR.value, command=cli.config_arguments()
        )
    if results.get("already_finished"):
        print(
            f"already finished at step {results['step']}: final test top-1 "
            f"{results['top1']:.2f}%  top-5 {results['top5']:.2f}%; nothing was done."
        )
    elif "stopped_by" in results:
        print(
            f"stopped by {results['stopped_by']} after step {results['step']}, checkpoint "
            "written; the same command resumes."
        )
    elif "top1" in results:
        print(
            f"final test top-1 {results['top1']:.2f}%  top-5 {results['top5']:.2f}%  "
            f"loss {results['loss']:.4f}  ({results['num_examples']} examples, "
            f"step {results['step']})"
        )


if __name__ == "__main__":
    cli.run(main)
