"""Checkpoints are verified: real damage on disk (a truncated array file, flipped bytes, a
missing item), then the real train.py and eval.py on the damaged workdir."""

import jax
import numpy as np
import pytest

from sasa_flax.run import Workdir
from tests.helpers import (
    Process,
    damage_checkpoint,
    environment,
    final_params,
    tiny_config,
    train,
)

pytestmark = pytest.mark.slow

CONFIG_ARG = "steps=6,checkpoint_every=2"


def _eval(workdir, *flags):
    args = ["eval.py", "--config", f"tests/tiny_config.py:{CONFIG_ARG}", "--workdir"]
    return Process([*args, str(workdir), *flags], environment(1))


@pytest.mark.parametrize("how", ["truncated", "flipped", "missing_meta"])
def test_a_damaged_newest_checkpoint_is_reported_moved_aside_and_redone(tmp_path, how):
    first = train(tmp_path, CONFIG_ARG)
    assert first.finish() == 0, first.output
    config, devices = tiny_config(num_steps=6, checkpoint_every_steps=2), jax.devices()[:1]
    _, expected = final_params(config, str(tmp_path), devices)
    damage_checkpoint(tmp_path / Workdir.CHECKPOINTS / "6", how)

    # eval.py --step 6 refuses it in one line, naming the newest good step.
    refused = _eval(tmp_path, "--step", "6")
    assert refused.finish() == 1, refused.output
    assert "checkpoint step 6" in refused.output
    assert "newest checkpoint that verifies is step 4" in refused.output
    assert "Traceback" not in refused.output and "never retrieved" not in refused.output
    assert "falling back" not in refused.output and "never awaited" not in refused.output
    # eval.py without --step falls back to step 4, saying so.
    fallback = _eval(tmp_path)
    assert fallback.finish() == 0, fallback.output
    assert "falling back" in fallback.output and "step 4: top-1" in fallback.output
    assert "is damaged" in fallback.output and "never awaited" not in fallback.output

    # train.py moves step 6 aside (never deletes it), resumes from 4 and redoes 5 and 6.
    rerun = train(tmp_path, CONFIG_ARG)
    assert rerun.finish() == 0, rerun.output
    assert "checkpoint step 6" in rerun.output and "moved to" in rerun.output
    assert "resumed from step 4" in rerun.output
    assert len(list((tmp_path / "damaged_checkpoints").iterdir())) == 1
    _, params = final_params(config, str(tmp_path), devices)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing lost beyond the redone steps
