"""The trainer, one module per job; read ``loop.py`` first.

  setup.py     ``Setup`` (config + devices -> mesh, optimizer, schedule) and ``TrainState``
  steps.py     the train and eval steps' math, jitted over the mesh
  memory.py    what a compiled step needs of the device's memory, how many images fit
  compile.py   the steps compiled for the devices and checked against their memory
  prefetch.py  global batches put on the devices ahead of the loop
  progress.py  log lines and TensorBoard events
  restore.py   a trained model back from its workdir (``eval.py``, ``visualize``)
  evaluate.py  evaluation during training, and of a checkpoint (``eval.py``)
  resume.py    the rules of resuming, the run record, a finished run recognised
  loop.py      ``train_and_evaluate``: the training loop in labelled stages

Where a run keeps its files is ``sasa_flax.run.Workdir``'s; the rules of resuming are
``resume.py``'s.
The names below are the trainer's public API (``from sasa_flax import trainer``): what
``train.py``, ``eval.py`` and the tools (``visualize``, ``aot``, the benchmarks) use. The
rest is each module's own; tests reach it there.
"""

from sasa_flax.errors import TrainError
from sasa_flax.trainer.compile import compile_eval_step, compile_train_step
from sasa_flax.trainer.evaluate import evaluate_checkpoint
from sasa_flax.trainer.loop import train_and_evaluate
from sasa_flax.trainer.restore import Restored, restore
from sasa_flax.trainer.setup import (
    Setup,
    TrainState,
    abstract_state,
    compute_dtype,
    data_mesh,
    default_decay_mask,
    eval_weights,
    init_state,
    make_eval_setup,
    make_setup,
    merged_model,
    model_setup,
)
from sasa_flax.trainer.steps import (
    abstract_batch,
    global_batch,
    jit_eval_step,
    jit_train_step,
    train_step,
)

__all__ = [
    "Setup",
    "TrainError",
    "TrainState",
    "abstract_batch",
    "abstract_state",
    "compile_eval_step",
    "compile_train_step",
    "compute_dtype",
    "data_mesh",
    "default_decay_mask",
    "eval_weights",
    "evaluate_checkpoint",
    "global_batch",
    "init_state",
    "jit_eval_step",
    "jit_train_step",
    "make_eval_setup",
    "make_setup",
    "merged_model",
    "model_setup",
    "Restored",
    "restore",
    "train_and_evaluate",
    "train_step",
]
