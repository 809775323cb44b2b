"""The reference for the two-process test: ONE process with 4 devices, fed exactly the
global batches that 2 processes reading their own shards assemble (process 0's half on
devices 0-1, process 1's on 2-3), so that the two runs differ only in where they ran.

    python -m tests.two_shard_reference WORKDIR CONFIG_ARG
"""

import sys

import numpy as np
from absl import logging

from sasa_flax import config_lib, data, trainer

_load, _train_batches = data.load, data.train_batches


def two_shard_batches(dataset, input_config, *, seed, start_step=0):
    shards = [
        _train_batches(
            _load(input_config, process_index=i, process_count=2),
            input_config,
            seed=seed,
            start_step=start_step,
        )
        for i in range(2)
    ]
    for parts in zip(*shards, strict=True):
        yield {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    workdir, config_arg = sys.argv[1:]
    data.train_batches = two_shard_batches
    trainer.train_and_evaluate(
        config_lib.load_config(f"tests/tiny_config.py:{config_arg}"), workdir
    )
