"""Gradient accumulation (config.train.accumulation_steps): one optimizer step from the
mean gradient of n micro-batches, inside one compiled step."""

import jax
import numpy as np
import pytest

from sasa_flax import trainer
from sasa_flax.errors import TrainError
from sasa_flax.trainer import memory
from sasa_flax.trainer.setup import check_batch_sizes
from tests import test_extending  # registers tiny_vit_for_tests: LayerNorm, no model state
from tests.helpers import final_params, tiny_config


def _setup(config, devices):
    return trainer.model_setup(config, devices, dataset=None, steps_per_epoch=10, total_steps=10)


def _batch(setup, size, seed=0, masked=3):
    rng = np.random.default_rng(seed)
    image = setup.config.input.image_size
    return trainer.global_batch(
        setup,
        dict(
            image=rng.integers(0, 256, (size, image, image, 3), dtype=np.uint8),
            label=rng.integers(0, setup.config.model.num_classes, size).astype(np.int32),
            mask=(np.arange(size) >= masked).astype(np.float32),  # a few undecodable images
        ),
    )


def _one_step(config, devices, batch_seed=0):
    setup = _setup(config, devices)
    abstract = trainer.abstract_state(setup)
    train = trainer.jit_train_step(setup, abstract)
    state = trainer.init_state(setup, abstract)
    state, metrics = train(state, _batch(setup, config.input.batch_size, batch_seed))
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("devices", [1, 4])
def test_micro_batches_give_the_whole_batch_update_without_batchnorm(devices):
    """LayerNorm, no Dropout: 4 micro-batches of 8 per step make the same update, loss,
    accuracy and EMA as 32 images at once (float32 rounding apart), on 1 and 4 devices;
    the masked images count once, in the whole batch's mean."""
    config = test_extending.get_config()
    config.model.dropout = 0.0
    config.train.weight_decay = 1e-3
    whole, whole_metrics = _one_step(config, jax.devices()[:devices])
    config.train.accumulation_steps = 4
    parts, parts_metrics = _one_step(config, jax.devices()[:devices])
    for key in ("loss", "top1", "grad_norm", "learning_rate"):
        np.testing.assert_allclose(parts_metrics[key], whole_metrics[key], rtol=2e-5, err_msg=key)
    for name in ("params", "opt_state", "ema_params"):
        for a, b in zip(
            jax.tree.leaves(getattr(parts, name)),
            jax.tree.leaves(getattr(whole, name)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
    changed = [
        not np.allclose(a, b)
        for a, b in zip(
            jax.tree.leaves(whole.params),
            jax.tree.leaves(_setup_params(config, devices)),
            strict=True,
        )
    ]
    assert any(changed)  # the step did move the parameters


def _setup_params(config, devices):
    setup = _setup(config, jax.devices()[:devices])
    return jax.device_get(trainer.init_state(setup, trainer.abstract_state(setup)).params)


def test_batchnorm_statistics_are_per_micro_batch():
    """With BatchNorm the running averages are updated once per micro-batch (documented):
    the step differs from one of the whole batch, and is not silently the same program."""
    config = tiny_config()
    whole, _ = _one_step(config, jax.devices()[:1])
    config.train.accumulation_steps = 2
    parts, _ = _one_step(config, jax.devices()[:1])
    pairs = zip(jax.tree.leaves(whole.model_state), jax.tree.leaves(parts.model_state), strict=True)
    assert any(not np.allclose(a, b) for a, b in pairs)


@pytest.mark.slow
def test_accumulated_run_resumes_bit_exactly(tmp_path):
    config = tiny_config(accumulation_steps=2)
    devices = jax.devices()[:2]
    trainer.train_and_evaluate(config, str(tmp_path / "whole"), devices=devices)
    stopped = trainer.train_and_evaluate(
        config, str(tmp_path / "cut"), devices=devices, stop_after_step=3
    )
    assert stopped["step"] == 3
    trainer.train_and_evaluate(config, str(tmp_path / "cut"), devices=devices)
    _, a = final_params(config, str(tmp_path / "whole"), devices)
    _, b = final_params(config, str(tmp_path / "cut"), devices)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_compiled_memory_follows_the_micro_batch():
    """CPU's compiled temporaries: 4 micro-batches need far less than the whole batch."""
    temp = {}
    for n in (1, 4):
        config = tiny_config(accumulation_steps=n)
        config.input.batch_size = 64
        setup = _setup(config, jax.devices()[:1])
        abstract = trainer.abstract_state(setup)
        train = trainer.jit_train_step(setup, abstract)
        compiled = train.lower(abstract, trainer.abstract_batch(setup, 64)).compile()
        temp[n] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[4] < 0.5 * temp[1], temp


def test_micro_batches_must_divide_every_devices_images():
    config = tiny_config(accumulation_steps=3)
    with pytest.raises(TrainError, match=r"accumulation_steps=3: .*batch_size=32 on 4 devices"):
        _setup_checked(config, 4)
    with pytest.raises(TrainError, match=r"batch_size=32 on 1 device is not"):  # one, no -s
        _setup_checked(config, 1)
    config.train.accumulation_steps = 0
    with pytest.raises(Exception, match=r"config\.train\.accumulation_steps=0: must be a positive"):
        _setup_checked(config, 4)


def _setup_checked(config, devices):
    from sasa_flax import config_lib

    config_lib.validate(config)
    check_batch_sizes(config, devices, 1)


def test_a_train_step_too_large_is_refused_naming_the_accumulation_that_fits():
    """Before the first step: the compiled step's peak against the device's memory; the
    line names accumulation_steps (and the micro-batch) that would fit."""
    config = tiny_config()
    config.input.batch_size = 64
    setup = _setup(config, jax.devices()[:1])
    abstract = trainer.abstract_state(setup)
    compiled = trainer.compile_train_step(setup, abstract, memory_bytes=2**40)
    analysis = compiled.memory_analysis()
    peak, temp = memory.peak_bytes(analysis), analysis.temp_size_in_bytes
    room = int((peak - temp * 0.7) / memory.HEADROOM)  # about a third of the activations fit
    with pytest.raises(TrainError) as refused:
        trainer.compile_train_step(setup, abstract, memory_bytes=room)
    message = str(refused.value)
    assert "--config.train.accumulation_steps=4" in message, message
    assert "16 images per device at once" in message, message
