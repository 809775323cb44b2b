"""Every shipped config trains sensibly as shipped: recipes per dataset family, an EMA
that warms up, the paper's splits, options that reach every layer, resumption that
refuses a silently changed schedule, the learning rate that was applied."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sasa_flax import config_lib, data, recipes, trainer
from sasa_flax.layers import AttentionStem, SelfAttention2D
from sasa_flax.trainer.steps import ema_decay
from tests.helpers import prepare_tfds, shipped_config_specs, tiny_config, write_image_folder

# Training-split sizes of the shipped configs' datasets (the 96% part under tuning_split).
TRAIN_SIZES = {"imagenet2012": 1_281_167, "cifar10": 50_000, "digits": 1437}


def unvalidated(spec: str):
    path, _, arg = spec.partition(":")
    return config_lib.load_config_module(path).get_config(arg or None)


@pytest.mark.parametrize("spec", shipped_config_specs(), ids=lambda s: s.split("configs/")[-1])
def test_every_shipped_config_has_a_recipe_that_fits_its_dataset(spec):
    config = unvalidated(spec)
    i, t = config.input, config.train
    size = TRAIN_SIZES[i.dataset]
    size = size - round(0.04 * size) if i.tuning_split else size
    steps_per_epoch = size // i.batch_size
    total = t.num_steps or int(np.ceil(t.num_epochs * steps_per_epoch))
    assert steps_per_epoch >= 20 or t.num_steps, f"{steps_per_epoch} steps per epoch"
    assert t.warmup_epochs * steps_per_epoch < total, "warm-up longer than the run"
    if t.ema_decay > 0:
        horizon = 1.0 / (1.0 - t.ema_decay)
        assert t.ema_warmup or horizon <= total / 4, f"EMA horizon {horizon:.0f} of {total}"
    if i.dataset != "imagenet2012":
        assert i.augment == "pad" and i.batch_size <= 256  # not ImageNet's recipe


def test_small_configs_do_not_inherit_the_imagenet_recipe():
    imagenet = config_lib.base_config()
    for spec in ("configs/cifar10.py", "configs/imagenet.py:runlocal=true"):
        config = unvalidated(spec)
        assert config.input.batch_size <= 128 < imagenet.input.batch_size
        steps = config.train.num_steps or config.train.num_epochs * 390
        assert config.train.warmup_epochs * 390 < steps / 2
    cifar = unvalidated("configs/cifar10.py")
    assert (cifar.input.augment, cifar.train.weight_decay) == ("pad", 5e-4)
    assert cifar.train.num_epochs >= 100 and cifar.train.ema_warmup


@pytest.mark.parametrize(
    "spec", ["configs/table3_layer_mix.py:mix=CCAA", "configs/table5_pos_encoding.py"]
)
def test_tables_3_and_5_are_scored_on_the_held_out_four_percent(spec):
    assert unvalidated(spec).input.tuning_split is True


def test_ema_decay_warms_up():
    t = config_lib.base_config().train
    decays = [float(ema_decay(t, step)) for step in (0, 1, 10, 10**6)]
    assert decays[:3] == pytest.approx([0.1, 2 / 11, 11 / 20])
    assert decays[3] == pytest.approx(0.9999)
    t.ema_warmup = False
    assert float(ema_decay(t, 0)) == pytest.approx(0.9999)
    # After a 1,560-step run with warm-up the initial weights are forgotten; without
    # it 0.9999^1560 ≈ 86% of them would remain.
    t.ema_warmup = True
    remaining = np.prod([float(ema_decay(t, s)) for s in range(1560)])
    assert remaining < 1e-3 and 0.9999**1560 > 0.85


def test_one_train_step_applies_the_warm_ema_and_logs_the_applied_rate():
    config = tiny_config(ema_decay=0.9999, warmup_epochs=0.1)  # 4 warm-up steps
    setup = trainer.make_setup(config, devices=jax.devices()[:1])
    abstract = trainer.abstract_state(setup)
    train_fn = trainer.jit_train_step(setup, abstract)
    state = trainer.init_state(setup, abstract)
    # As after four skipped (non-finite) steps: step 5, but one update applied.
    state = state.replace(
        step=jnp.asarray(5, jnp.int32),
        nonfinite_steps=jnp.asarray(4, jnp.int32),
        opt_state=optax.tree_utils.tree_set(state.opt_state, count=jnp.asarray(1, jnp.int32)),
    )
    initial = jax.device_get(state.params)
    batch = next(data.train_batches(setup.dataset, config.input, seed=0))
    new, metrics = train_fn(state, trainer.global_batch(setup, batch))
    assert float(metrics["learning_rate"]) == pytest.approx(float(setup.schedule(1)))
    assert float(setup.schedule(1)) != pytest.approx(float(setup.schedule(5)))
    decay = 6 / 15  # min(0.9999, (1 + 5) / (10 + 5))
    for ema, init, params in zip(
        *(jax.tree.leaves(x) for x in (new.ema_params, initial, jax.device_get(new.params))),
        strict=True,
    ):
        np.testing.assert_allclose(ema, decay * init + (1 - decay) * params, atol=1e-6)


def test_a_resume_with_a_changed_schedule_is_refused_naming_the_fields(tmp_path):
    config = tiny_config()
    trainer.train_and_evaluate(config, str(tmp_path), stop_after_step=2)
    changed = tiny_config(base_learning_rate=0.8, warmup_epochs=0.5)
    with pytest.raises(
        trainer.TrainError,
        match=r"config\.train\.base_learning_rate 0\.4 -> 0\.8, "
        r"config\.train\.warmup_epochs 0\.0 -> 0\.5.*allow_schedule_change=True",
    ):
        trainer.train_and_evaluate(changed, str(tmp_path))
    bigger = tiny_config()
    bigger.input.batch_size = 64
    with pytest.raises(trainer.TrainError, match=r"config\.input\.batch_size 32 -> 64"):
        trainer.train_and_evaluate(bigger, str(tmp_path))


@pytest.mark.slow
def test_allow_schedule_change_extends_a_finished_run(tmp_path):
    config = tiny_config(num_steps=4)
    assert trainer.train_and_evaluate(config, str(tmp_path))["step"] == 4
    extended = tiny_config(num_steps=6, allow_schedule_change=True)
    results = trainer.train_and_evaluate(extended, str(tmp_path))
    assert results["step"] == 6 and [s for s, _ in results["train_log"]] == [5, 6]


def test_every_model_option_reaches_every_layer():
    config = recipes.imagenet_config(26, "full_attention")
    options = dict(
        kernel_size=5,
        num_heads=4,
        pos_encoding="absolute",
        content=False,
        padding="zeros",
        relative_tables="per_head",
        scale_queries=False,
        attention_impl="dense",
        bn_momentum=0.8,
        bn_epsilon=1e-3,
        stem_variant="conv_values",
        stem_num_heads=2,
        stem_block_size=2,
        stem_pool_size=4,
        stem_num_mixtures=3,
        stem_value_kernel_size=5,
    )
    config.model.update(options)
    model = config_lib.build_model(config)
    modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
    norms = [m for m in modules if isinstance(m, nnx.BatchNorm)]
    attention = [m for m in modules if isinstance(m, SelfAttention2D)]
    stems = [m for m in modules if isinstance(m, AttentionStem)]
    assert len(norms) == 29 and len(attention) == 8 and len(stems) == 1  # 8 blocks × 3 + 4 + 1
    assert {(n.momentum, n.epsilon) for n in norms} == {(0.8, 1e-3)}  # the stem's included
    for layer in attention:
        o = layer.options
        got = (
            o.kernel_size,
            o.num_heads,
            o.pos_encoding,
            o.content,
            o.padding,
            o.relative_tables,
            o.scale_queries,
            o.impl,
        )
        assert got == (5, 4, "absolute", False, "zeros", "per_head", False, "dense")
    stem = stems[0].options
    assert (
        stem.variant,
        stem.num_heads,
        stem.block_size,
        stem.pool_size,
        stem.num_mixtures,
        stem.value_kernel_size,
    ) == ("conv_values", 2, 2, 4, 3, 5)
    assert stems[0].value_conv.kernel_size == (5, 5)


def _class_mix_ok(train_labels, held_labels, total):
    """4% held out, and each class's share of it within one image of 4% of the class."""
    assert len(held_labels) == max(1, round(0.04 * total))
    counts = np.bincount(np.concatenate([train_labels, held_labels]))
    held = np.bincount(held_labels, minlength=len(counts))
    np.testing.assert_array_less(np.abs(held - 0.04 * counts), 1.0 + 1e-9)


def _labels(split) -> np.ndarray:
    batches = data.examples(split).batch(4096).as_numpy_iterator()
    return np.concatenate([labels for _, labels, _ in batches])


def test_digits_tuning_split_has_the_class_mix_of_train():
    config = config_lib.base_config().input
    config.update(dataset="digits", image_size=8, tuning_split=True)
    dataset = data.load(config)
    train, held = _labels(dataset.train), _labels(dataset.eval)
    _class_mix_ok(train, held, 1437)


@pytest.mark.parametrize("with_val", [False, True])
def test_folder_tuning_split_has_the_class_mix_of_train(tmp_path, with_val):
    counts = {"a": 300, "b": 100, "c": 50, "d": 25}  # imbalanced on purpose
    write_image_folder(tmp_path / "train" if with_val else tmp_path, counts)
    if with_val:
        write_image_folder(tmp_path / "val", {name: 3 for name in counts})
    config = config_lib.base_config().input
    config.update(dataset="folder", data_dir=str(tmp_path), image_size=4, tuning_split=True)
    dataset = data.load(config)
    train, held = _labels(dataset.train), _labels(dataset.eval)
    total = sum(counts.values()) if with_val else sum(counts.values()) - 47  # 10% is val
    _class_mix_ok(train, held, total)
    assert len(np.unique(held)) == len(counts)  # every class, not the last one only


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec,classes",
    [
        ("configs/digits.py", 10),
        ("configs/cifar10.py", 10),
        ("configs/imagenet.py:depth=26,variant=full_attention,runlocal=true", 1000),
    ],
)
def test_small_configs_train_on_generated_data_with_their_own_recipe(tmp_path, spec, classes):
    """A few steps of each small config, its recipe untouched: only the dataset is
    replaced, by a folder of generated images."""
    per_class = 1 if classes > 100 else 16  # at least one batch (of 128) in the 90% train
    write_image_folder(tmp_path / "data", {f"class{c:04d}": per_class for c in range(classes)})
    config = config_lib.load_config(spec)
    config.input.update(dataset="folder", data_dir=str(tmp_path / "data"))
    results = trainer.train_and_evaluate(config, str(tmp_path / "run"), stop_after_step=2)
    assert results["step"] == 2
    assert all(np.isfinite(loss) for _, loss in results["train_log"])


def test_tfds_tuning_split_has_the_class_mix_of_train(tmp_path):
    """TFDS's held-out 4% is the slice train[96%:]: a random sample, because TFDS shuffles
    the records when it prepares a dataset. Checked on a real TFDS dataset built here whose
    examples are generated sorted by class, so an unshuffled slice would be one class."""
    import tensorflow_datasets as tfds

    def sorted_by_class(n):  # classes 0, 0, ..., 1, 1, ..., 3
        return lambda: (
            {"image": np.zeros((4, 4, 3), np.uint8), "label": 4 * i // n} for i in range(n)
        )

    features = {
        "image": tfds.features.Image(shape=(4, 4, 3)),
        "label": tfds.features.ClassLabel(num_classes=4),
    }
    splits = {"train": sorted_by_class(1000), "test": sorted_by_class(40)}
    assert prepare_tfds(tmp_path, "SortedByClass", features, splits) == "sorted_by_class"
    config = config_lib.base_config().input
    config.update(
        dataset="sorted_by_class", data_dir=str(tmp_path), image_size=4, tuning_split=True
    )
    dataset = data.load(config)
    train, held = _labels(dataset.train), _labels(dataset.eval)
    assert len(held) == 40 and len(train) == 960
    observed = np.bincount(held, minlength=4)
    assert np.all(np.abs(observed - 10) <= 4 * np.sqrt(10 * 0.96)), observed  # binomial, 4σ
