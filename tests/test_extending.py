"""A model that is not a ResNet, defined and registered in this file only, through the
real trainer: LayerNorm instead of BatchNorm (no model state), Dropout (RNG streams),
``SelfAttention2D`` as its token mixer. And an attention implementation, a dataset and an
augmentation, registered here only, that the trainer reads through the same registries as
the built-in ones.

This file is also a config file, so that ``train.py`` and ``eval.py`` can run the model:

    python train.py --config tests/test_extending.py:steps=6 --workdir /tmp/vit
"""

import importlib
import signal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from sasa_flax import config_lib, costs, data, models, ops, trainer
from sasa_flax.errors import ArgumentError
from sasa_flax.layers import SelfAttention2D
from sasa_flax.models import resnet


@models.register("tiny_vit_for_tests")
class TinyViT(nnx.Module):
    """Patches of patch_size² -> ``depth`` pre-norm blocks of local self-attention and an
    MLP, each with Dropout -> mean pool -> classifier."""

    def __init__(
        self,
        *,
        patch_size: int = 4,
        width: int = 16,
        depth: int = 2,
        num_heads: int = 2,
        kernel_size: int = 3,
        dropout: float = 0.2,
        num_classes: int = 10,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if not 0.0 <= dropout < 1.0:
            raise ArgumentError("dropout", dropout, "must be in [0, 1)")
        patch = (patch_size, patch_size)
        self.embed = nnx.Conv(3, width, patch, strides=patch_size, dtype=dtype, rngs=rngs)
        self.norms1 = nnx.List([nnx.LayerNorm(width, dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.mixers = nnx.List(
            [
                SelfAttention2D(
                    width,
                    width,
                    num_heads=num_heads,
                    kernel_size=kernel_size,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(depth)
            ]
        )
        self.norms2 = nnx.List([nnx.LayerNorm(width, dtype=dtype, rngs=rngs) for _ in range(depth)])
        self.mlps = nnx.List(
            [nnx.Linear(width, width, dtype=dtype, rngs=rngs) for _ in range(depth)]
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, images):
        x = self.embed(images)
        for norm1, mixer, norm2, mlp in zip(
            self.norms1, self.mixers, self.norms2, self.mlps, strict=True
        ):
            x = x + self.dropout(mixer(norm1(x)))
            x = x + self.dropout(nnx.gelu(mlp(norm2(x))))
        return self.head(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


# Every call of the implementation registered below, as (H, W, k) when it is traced.
TRACED_ATTENTION: list[tuple[int, int, int]] = []


def _recorded_dense(q, k, v, rel_row, rel_col, *, kernel_size, padding):
    """ "dense", recording each layer that calls it."""
    TRACED_ATTENTION.append((q.shape[1], q.shape[2], kernel_size))
    return ops.local_attention(
        q, k, v, rel_row, rel_col, kernel_size=kernel_size, padding=padding, impl="dense"
    )


ops.register_implementation("recorded_dense_for_tests", _recorded_dense)


@data.register_source("brightness_for_tests")
def brightness(input_config, process_index, process_count):
    """Flat grey images whose class is their brightness band (3 classes): 96 to train on,
    the 30 evaluation images a different draw."""
    del process_index, process_count  # random access: the pipeline shards it

    def split(n, seed, name):
        labels = np.arange(n, dtype=np.int32) % 3
        level = labels * 80 + np.random.default_rng(seed).integers(0, 40, n)
        size = input_config.image_size
        images = np.broadcast_to(level[:, None, None, None], (n, size, size, 3)).astype(np.uint8)
        return data.array_split(np.ascontiguousarray(images), labels, name)

    return data.Dataset(
        train=lambda: split(96, 1, "the brightness training split"),
        eval=lambda: split(30, 2, "the brightness evaluation split"),
        num_classes=3,
    )


# Marks every training image: the top-left pixel is 255, so a test can see it was applied.
data.register_augmentation(
    "mark_for_tests",
    train=lambda image, split, size, seed: tf.tensor_scatter_nd_update(
        tf.cast(image, tf.float32), [[0, 0, 0], [0, 0, 1], [0, 0, 2]], [255.0] * 3
    ),
    eval=lambda image, split, size: tf.cast(image, tf.float32),
)


def get_config(arg=None):
    """Digits at 16², the tiny ViT, a few steps with an EMA."""
    args = config_lib.parse_arg(arg, steps=6, checkpoint_every=2)
    config = config_lib.load_config("configs/digits.py")
    config.model = config_lib.model_config("tiny_vit_for_tests")
    config.input.update(image_size=16, batch_size=32, eval_batch_size=40)
    config.train.update(
        num_steps=args.steps,
        warmup_epochs=0.0,
        base_learning_rate=0.4,
        ema_decay=0.5,
        log_every_steps=1,
        checkpoint_every_steps=args.checkpoint_every,
    )
    return config


def test_the_model_checks_its_own_fields_as_config_fields():
    config = get_config()
    config.model.num_heads = 3
    with pytest.raises(
        config_lib.ConfigError, match=r"config\.model\.num_heads=3: must divide the 16 channels"
    ):
        config_lib.validate(config)
    config = get_config()
    config.model.dropout = 1.5
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.dropout=1\.5: must be in"):
        config_lib.validate(config)
    config = get_config()
    config.model.widht = 8
    with pytest.raises(config_lib.ConfigError, match=r"'widht' \(did you mean 'width'\?\)"):
        config_lib.validate(config)


def test_the_report_counts_what_it_can_and_names_what_it_cannot():
    layers, uncounted = costs.report(
        config_lib.validate(get_config()), get_config().input.image_size
    )
    names = {layer.name for layer in layers}
    assert {"embed", "mixers/0", "mixers/1", "mlps/0", "head"} <= names
    # LayerNorm has no cost rule: named, not silently dropped.
    assert sorted(uncounted) == ["norms1/0", "norms1/1", "norms2/0", "norms2/1"]
    counted = sum(layer.params for layer in layers)
    model = config_lib.build_model(get_config())
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert total - counted == 4 * 2 * 16  # exactly the LayerNorms' scales and biases


def test_default_weight_decay_is_on_matrices_only():
    setup = trainer.model_setup(
        get_config(), jax.devices()[:1], dataset=None, steps_per_epoch=10, total_steps=10
    )
    params = trainer.abstract_state(setup).params
    mask = setup.decay_mask(params)
    flat = {"/".join(map(str, k)): v for k, v in flax.traverse_util.flatten_dict(mask).items()}
    assert flat["embed/kernel"] and flat["mlps/0/kernel"] and flat["mixers/0/rel_row"]
    assert not flat["embed/bias"] and not flat["norms1/0/scale"] and not flat["head/bias"]


def test_dropout_keys_come_from_the_seed_and_the_step():
    config = get_config()
    setup = trainer.model_setup(
        config, jax.devices()[:1], dataset=None, steps_per_epoch=10, total_steps=10
    )
    state = trainer.init_state(setup, trainer.abstract_state(setup))
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))

    @jax.jit
    def run(step):
        model = trainer.merged_model(
            setup, setup.train_graphdef, state.params, state.model_state, step
        )
        return model(images)

    forward = lambda step: np.asarray(run(step))  # noqa: E731

    np.testing.assert_array_equal(forward(3), forward(3))  # a step's masks are fixed
    assert not np.allclose(forward(3), forward(4))  # and differ from step to step


def test_trains_checkpoints_resumes_exactly_and_evaluates(tmp_path):
    config = get_config()
    uninterrupted = trainer.train_and_evaluate(config, str(tmp_path / "a"))
    assert uninterrupted["step"] == 6 and uninterrupted["num_examples"] == 360
    losses = [loss for _, loss in uninterrupted["train_log"]]
    assert np.isfinite(losses).all()
    stopped = trainer.train_and_evaluate(config, str(tmp_path / "b"), stop_after_step=3)
    assert stopped["step"] == 3
    resumed = trainer.train_and_evaluate(config, str(tmp_path / "b"))
    assert [s for s, _ in resumed["train_log"]] == [4, 5, 6]
    assert resumed["top1"] == uninterrupted["top1"] and resumed["loss"] == uninterrupted["loss"]
    again = trainer.evaluate_checkpoint(config, str(tmp_path / "b"))
    assert again["top1"] == pytest.approx(resumed["top1"], abs=1e-9)


def test_an_attention_implementation_registered_here_runs_in_every_attention_layer():
    """``attention_impl`` names it in the config; every attention layer of the model runs it
    (and computes what "dense" does: it is "dense")."""
    from tests.helpers import tiny_config

    config = tiny_config()
    config.model.update(spatial=("conv", "conv", "attention", "attention"))
    config_lib.validate(config)
    dense = config_lib.build_model(config, rngs=nnx.Rngs(0))
    config.model.attention_impl = "recorded_dense_for_tests"
    config_lib.validate(config)
    mine = config_lib.build_model(config, rngs=nnx.Rngs(0))
    layers = [m for _, m in nnx.iter_graph(mine) if isinstance(m, SelfAttention2D)]
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    TRACED_ATTENTION.clear()
    y = mine(images)
    assert len(TRACED_ATTENTION) == len(layers) == 4 + 1  # ResNet-26 (1, 2, 4, 1): groups 3, 4
    assert {k for *_, k in TRACED_ATTENTION} == {config.model.kernel_size}
    np.testing.assert_allclose(y, dense(images), rtol=1e-5, atol=1e-5)


def test_loading_this_file_again_re_registers_it_and_a_clash_is_refused(monkeypatch):
    """A config file is imported afresh at each load (train, then report --results per
    run): its registrations are replaced, not refused; another definition is refused."""
    from sasa_flax.models import registry

    implementations = importlib.import_module("sasa_flax.ops.local_attention")._IMPLEMENTATIONS
    registered = [
        (registry._MODELS, "tiny_vit_for_tests"),
        (implementations, "recorded_dense_for_tests"),
    ]
    for table, name in registered:
        monkeypatch.setitem(table, name, table[name])  # restored after the test
    # New objects, the same definitions; the path as the CLI gets it (relative).
    again = config_lib.load_config_module("tests/test_extending.py")
    assert again.TinyViT is not TinyViT and models.get("tiny_vit_for_tests") is again.TinyViT
    with pytest.raises(ValueError, match=r"\(impl\) 'recorded_dense_for_tests' is already regis"):
        ops.register_implementation("recorded_dense_for_tests", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match="model 'tiny_vit_for_tests' is already registered by"):
        models.register("tiny_vit_for_tests")(SelfAttention2D)


def test_a_dataset_and_augmentation_registered_here_are_what_the_trainer_reads(tmp_path):
    config = get_config()
    config.input.update(
        dataset="brightness_for_tests",
        augment="mark_for_tests",
        batch_size=32,
        eval_batch_size=16,
        random_flip=False,
    )
    config.model.num_classes = 3
    setup = trainer.make_setup(config)
    batch = next(data.train_batches(setup.dataset, config.input, seed=0))
    assert (batch["image"][:, 0, 0] == 255).all()  # the registered augmentation ran
    assert (batch["image"][:, 1:, 1:] // 80 == batch["label"][:, None, None, None]).all()
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert results["num_examples"] == 30  # the source's evaluation split, whole
    config.model.num_classes = 10  # the source's class count is checked against the model
    with pytest.raises(trainer.TrainError, match=r"num_classes=10 but brightness_for_tests"):
        trainer.make_setup(config)


@pytest.mark.slow
def test_train_py_sigterm_resume_and_eval_py(tmp_path):
    """The real entry points on this file as the config: SIGTERM, resume, eval.py."""
    from tests.helpers import Process, environment, final_params

    def train_py(workdir, arg):
        args = ["train.py", "--config", f"tests/test_extending.py:{arg}", "--workdir"]
        return Process([*args, str(workdir)], environment(1))

    reference = train_py(tmp_path / "reference", "steps=24,checkpoint_every=1000")
    assert reference.finish() == 0, reference.output
    run = train_py(tmp_path / "run", "steps=24,checkpoint_every=1000")
    run.wait_for(r"step 5/24")
    run.popen.send_signal(signal.SIGTERM)
    assert run.finish() == 0, run.output
    assert "stopped by SIGTERM" in run.output
    rerun = train_py(tmp_path / "run", "steps=24,checkpoint_every=1000")
    assert rerun.finish() == 0, rerun.output
    assert "resumed from step" in rerun.output
    config = get_config("steps=24,checkpoint_every=1000")
    _, a = final_params(config, str(tmp_path / "reference"), jax.devices()[:1])
    _, b = final_params(config, str(tmp_path / "run"), jax.devices()[:1])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    evaluation = Process(
        [
            "eval.py",
            "--config",
            "tests/test_extending.py:steps=24",
            "--workdir",
            str(tmp_path / "run"),
        ],
        environment(1),
    )
    assert evaluation.finish() == 0, evaluation.output
    assert "step 24: top-1" in evaluation.output


@resnet.register_spatial_layer("pointwise_for_tests", downsamples=True)
def _pointwise(width: int, stride: int, parts, rngs: nnx.Rngs) -> nnx.Module:
    """A spatial layer of this file only: a strided 1×1 convolution."""
    return parts.conv(width, width, (1, 1), strides=stride, rngs=rngs)


def test_a_spatial_layer_registered_here_is_what_the_resnet_builds():
    """docs/extending.md's "an attention layer in the ResNet": registered by name, chosen
    per group by config.model.spatial, built with the model's own convolution factory."""
    config = config_lib.load_config("tests/tiny_config.py")
    config.model.spatial = ("conv", "conv", "pointwise_for_tests", "pointwise_for_tests")
    model = config_lib.build_model(config, rngs=nnx.Rngs(0))
    blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, resnet.Bottleneck)]
    spatial = {m.spec.group: m.spatial for m in blocks}
    assert [spatial[g].kernel_size for g in (2, 3)] == [(1, 1), (1, 1)]
    assert [spatial[g].kernel_size for g in (0, 1)] == [(3, 3), (3, 3)]
    assert not any(isinstance(m, SelfAttention2D) for _, m in nnx.iter_graph(model))
    logits = model(jnp.zeros((2, 16, 16, 3)))
    assert logits.shape == (2, config.model.num_classes)


def _first(*args, **kwargs):
    return None


def _second(*args, **kwargs):
    return None


class _CountedForTests(nnx.Module):
    pass


REGISTRATIONS = {
    "model": lambda fn: models.register("rule_for_tests")(fn),
    "impl": lambda fn: ops.register_implementation("rule_for_tests", fn),
    "dataset": lambda fn: data.register_source("rule_for_tests")(fn),
    "augmentation": lambda fn: data.register_augmentation("rule_for_tests", train=fn, eval=fn),
    "spatial_layer": lambda fn: resnet.register_spatial_layer("rule_for_tests", downsamples=False)(
        fn
    ),
    "cost_rule": lambda fn: importlib.import_module("sasa_flax.costs").register_cost(
        _CountedForTests
    )(fn),
}


@pytest.mark.parametrize("kind", list(REGISTRATIONS))
def test_every_registry_keeps_one_rule(kind):
    """The same definition again is fine (a config file loaded twice); another definition
    under a taken name is refused, naming both places: one rule, for all six registries."""
    from sasa_flax import costs

    tables = [
        models.registry._MODELS,
        importlib.import_module("sasa_flax.ops.local_attention")._IMPLEMENTATIONS,
        data.SOURCES,
        data.AUGMENTATIONS,
        resnet.SPATIAL_LAYERS,
        costs._RULES,
    ]
    before = [dict(t) for t in tables]
    register = REGISTRATIONS[kind]
    try:
        register(_first)
        register(_first)  # the same definition: fine
        refused = r"by _first in .*test_extending\.py; _second in .*test_extending\.py is another"
        with pytest.raises(ValueError, match=refused):
            register(_second)
    finally:
        for table, saved in zip(tables, before, strict=True):
            table.clear()
            table.update(saved)
