"""The Pallas kernels run one batch shard per device under the trainer's mesh
(``ops/pallas/shards.py``): XLA cannot partition them (TPU: no lowering at all; GPU: the
kernels would run on the global batch on every device). On 8 fake CPU devices, in
interpret mode, the sharded layer equals the unsharded one: outputs and every gradient,
the relative tables' included (summed over the shards, not averaged or dropped)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sasa_flax import config_lib
from sasa_flax import train as trainer
from sasa_flax.layers import SelfAttention2D
from sasa_flax.ops.pallas import shards
from tests.helpers import relative_error


def data_mesh(devices: int):
    return trainer.data_mesh(jax.devices()[:devices])


def layer_gradients(impl: str, x, mesh=None, padding="mask"):
    """(y, d loss / d parameters, d loss / d x) of a SelfAttention2D, jitted; under
    ``mesh`` the batch is split over it and the mesh is in context, as in the trainer."""
    layer = SelfAttention2D(
        8, 8, num_heads=2, kernel_size=3, padding=padding, impl=impl, rngs=nnx.Rngs(1)
    )
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x)
        return jnp.sum(y * jnp.cos(y)), y

    step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if mesh is not None:
        step = trainer.on_mesh(mesh, step)
        x = jax.device_put(x, NamedSharding(mesh, P("data")))
        params = jax.device_put(params, NamedSharding(mesh, P()))
    (_, y), (d_params, d_x) = jax.jit(step)(params, x)
    return y, d_params, d_x


@pytest.mark.parametrize("padding", ["mask", "zeros"])
def test_sharded_kernels_equal_unsharded_layer(rng, padding):
    x = jnp.asarray(rng.standard_normal((8, 6, 7, 8)), jnp.float32)
    expected = layer_gradients("patches", x, padding=padding)
    sharded = layer_gradients("pallas", x, mesh=data_mesh(8), padding=padding)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected), strict=True):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-5
    # The tables' gradient is the sum over all 8 shards: a per-shard value (1/8 of it on
    # average) or a mean would be far off.
    d_rel = sharded[1]["rel_row"][...]
    assert relative_error(d_rel, expected[1]["rel_row"][...]) < 1e-5


def test_kernels_are_called_per_shard():
    """Under a mesh the kernels see each device's images: the traced program splits the
    batch with shard_map, and outside a mesh it does not."""
    x = jnp.zeros((8, 6, 7, 8), jnp.float32)
    layer = SelfAttention2D(8, 8, num_heads=2, kernel_size=3, impl="pallas", rngs=nnx.Rngs(0))
    inside = str(jax.make_jaxpr(trainer.on_mesh(data_mesh(4), layer))(x))
    assert "shard_map" in inside and "f32[2,6,7,2,4]" in inside  # 8 images / 4 devices
    assert "shard_map" not in str(jax.make_jaxpr(layer)(x))


def test_batch_axes_split_only_what_divides():
    mesh = jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])
    assert shards.batch_axes(mesh, 16) == ("data", "model")
    assert shards.batch_axes(mesh, 6) == ("data",)  # 6 images: 8 shards do not divide
    assert shards.batch_axes(mesh, 3) == ()


def test_trainer_step_traces_the_kernels_per_shard():
    """The trainer's jitted train step (trainer.compile_steps) enters its mesh itself:
    a model with impl="pallas" gets its kernels inside shard_map, one device's batch."""
    config = config_lib.load_config(
        "configs/imagenet.py:depth=26,variant=conv_stem_attention,runlocal=true"
    )
    config.model.attention_impl = "pallas"
    config.input.update(batch_size=8, eval_batch_size=8)
    setup = trainer.model_setup(
        config, jax.devices()[:4], dataset=None, steps_per_epoch=10, total_steps=10
    )
    abstract = trainer.abstract_state(setup)
    train, _ = trainer.compile_steps(setup, abstract)
    batch = trainer.abstract_batch(setup, 8)
    jaxpr = str(train.trace(abstract, batch).jaxpr)
    assert "shard_map" in jaxpr


def test_attention_plan_names_every_layer_and_its_choice():
    config = config_lib.load_config("configs/imagenet.py:depth=50,variant=conv_stem_attention")
    setup = trainer.model_setup(
        config, jax.devices()[:1], dataset=None, steps_per_epoch=10, total_steps=10
    )
    plan = trainer.attention_plan(setup)
    counts = {line.split(":")[0]: int(line.split(": ")[1].split()[0]) for line in plan}
    assert sum(counts.values()) == 16  # ResNet-50: 3 + 4 + 6 + 3 blocks, one layer each
    assert counts == {
        "56×56 k=7 auto → shifted": 4, "28×28 k=7 auto → shifted": 4,
        "14×14 k=7 auto → shifted": 6, "7×7 k=7 auto → dense": 2,
    }  # fmt: skip
    config.model.attention_impl = "pallas"
    plan = trainer.attention_plan(dataclasses.replace(setup, config=config))
    assert len(plan) == 4 and all(line.split(": ")[0].endswith(" pallas") for line in plan)


def step_failing_to_compile(message: str):
    """A jitted step stand-in whose compile raises ``message``."""

    class Lowered:
        def compile(self):
            raise RuntimeError(message)

    class Step:
        def lower(self, *args):
            return Lowered()

    return Step()


def test_kernel_compile_failure_names_the_way_round():
    failing = step_failing_to_compile("INTERNAL: Mosaic failed to compile TPU kernel: bad\n...")
    with pytest.raises(trainer.TrainError, match="attention_impl=shifted") as e:
        trainer.compile_or_explain(failing)
    assert "\n" not in str(e.value) and "Mosaic failed to compile" in str(e.value)
    # Not a kernel's failure: not ours to explain, raised as it is.
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        trainer.compile_or_explain(step_failing_to_compile("RESOURCE_EXHAUSTED: out of HBM"))
