"""The Pallas kernels in users' programs on several devices (``ops/pallas/shards.py``):
every way a researcher shards a program gives the unsharded layer's outputs and every
gradient (the relative tables' summed over the shards, not averaged or dropped), and
moves no activations between devices. On 8 fake CPU devices with the GPU kernels in
Pallas' interpreter; ``tests/test_compile.py`` compiles the same programs for TPU and
H100 with the vendors' compilers."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.pallas.mosaic.error_handling import MosaicError
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sasa_flax import config_lib, trainer
from sasa_flax.errors import TrainError
from sasa_flax.layers import SelfAttention2D, attention_plan
from sasa_flax.ops import local_attention
from sasa_flax.ops.pallas import gpu, shards
from sasa_flax.ops.pallas.failures import KernelCompileError, kernel_failures_explained
from sasa_flax.tools import aot
from sasa_flax.trainer.compile import compile_or_explain
from tests import reference
from tests.helpers import make_inputs, relative_error

AUTO = (AxisType.Auto, AxisType.Auto)


def mesh(shape=(8,), names=("data",), explicit=False):
    types = None if explicit else AUTO[: len(shape)]
    return jax.make_mesh(
        shape, names, axis_types=types, devices=jax.devices()[: int(np.prod(shape))]
    )


def layer_and_loss(impl="pallas", **options):
    layer = SelfAttention2D(
        8, 8, num_heads=2, kernel_size=3, impl=impl, rngs=nnx.Rngs(1), **options
    )
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x)
        return jnp.sum(y * jnp.cos(y)), y

    return params, loss


def gradients(params, loss, x, x_sharding=None, params_sharding=None):
    """(y, d loss / d parameters, d loss / d x) under jit, the inputs placed as given
    (no mesh in context); and the compiled program's text."""
    if x_sharding is not None:
        x = jax.device_put(x, x_sharding)
        params = jax.device_put(params, params_sharding)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, y), (d_params, d_x) = step(params, x)
    return (y, d_params, d_x), step.lower(params, x).compile().as_text()


def assert_same(got, want, tolerance=1e-5):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        assert relative_error(g, w) < tolerance


def assert_no_moved_activations(text, largest_parameter: int):
    """Every collective carries at most a parameter's worth of elements."""
    moved = [(op, n) for op, n in aot.collective_sizes(text) if n > largest_parameter]
    assert not moved, f"collectives carrying activations: {moved}"


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).standard_normal((8, 6, 7, 8)), jnp.float32)


@pytest.mark.parametrize("padding", ["mask", "zeros"])
def test_jit_with_sharded_inputs_and_no_mesh_in_context(images, padding):
    """The most common program: jax.jit, a batch-sharded input, Auto axes, nothing in
    context. The tables' gradient is the sum over all 8 shards: a per-shard value (1/8 of
    it on average) or a mean would be far off."""
    params, loss = layer_and_loss(padding=padding)
    want, _ = gradients(params, layer_and_loss("patches", padding=padding)[1], images)
    on = mesh()
    got, text = gradients(
        params, loss, images, NamedSharding(on, P("data")), NamedSharding(on, P())
    )
    assert_same(got, want)
    assert relative_error(got[1]["rel_row"][...], want[1]["rel_row"][...]) < 1e-5
    assert_no_moved_activations(text, largest_parameter=64)


@pytest.mark.parametrize("in_context", [False, True], ids=["no_mesh_in_context", "set_mesh"])
def test_explicit_mesh_axes(images, in_context):
    """jax.make_mesh's default (Explicit axes): the split is read from the types, with or
    without jax.set_mesh; a replicated input stays replicated."""
    params, loss = layer_and_loss()
    want, _ = gradients(params, layer_and_loss("patches")[1], images)
    on = mesh(explicit=True)
    for spec in (P("data"), P()):
        with jax.set_mesh(on) if in_context else contextlib.nullcontext():
            got, text = gradients(
                params, loss, images, NamedSharding(on, spec), NamedSharding(on, P())
            )
        assert_same(got, want)
        assert_no_moved_activations(text, largest_parameter=64)


def test_heads_and_batch_sharded_on_a_two_axis_mesh():
    """Tensor parallel: q, k, v split over heads on "model" and batch on "data"
    (Explicit axes): each device runs its own images and heads, nothing is gathered,
    and every gradient equals the float64 reference's."""
    rng = np.random.default_rng(1)
    inputs = make_inputs(rng, (4, 5, 6, 4, 4, 4), 3, ("content", "relative"))
    on = mesh((2, 4), ("data", "model"), explicit=True)
    split = NamedSharding(on, P("data", None, None, "model"))
    replicated = NamedSharding(on, P())
    placed = [jax.device_put(x, split if x.ndim == 5 else replicated) for x in inputs]

    def loss(*arrays):
        y = local_attention(*arrays, kernel_size=3, padding="mask", impl="pallas")
        return jnp.sum(y * jnp.sin(y))

    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5))))
    _, grads = step(*placed)
    # The tables' gradient crosses devices as the per-offset sums, (k² → 16, d) = 64
    # elements; one device's q alone has 240.
    assert_no_moved_activations(step.lower(*placed).compile().as_text(), largest_parameter=64)
    for g, w in zip(
        grads, float64_gradients(inputs, "mask", lambda y: y * jnp.sin(y)), strict=True
    ):
        assert relative_error(g, w) < 1e-5


def float64_gradients(inputs, padding, of_y):
    """Gradients of Σ of_y(y) in float64 on one device, by "patches" (the reference
    expression, itself checked against the float64 loops and central differences), after
    checking its output against the float64 loop reference."""
    y_loops, _ = reference.local_attention(*inputs, 3, padding)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in inputs]

        def loss(*arrays):
            y = local_attention(*arrays, kernel_size=3, padding=padding, impl="patches")
            return jnp.sum(of_y(y)), y

        grads, y = jax.grad(loss, argnums=tuple(range(5)), has_aux=True)(*f64)
        assert relative_error(y, y_loops) < 1e-12
        return [np.asarray(g) for g in grads]


def test_inside_a_users_shard_map_with_check_vma(images):
    """A researcher's own data-parallel step: jax.shard_map over the batch with JAX's
    default check_vma=True. The kernels see the local batch; the parameters' gradients,
    the tables' included, come out summed over the shards, as JAX sums every other
    parameter's there."""
    params, loss = layer_and_loss()
    want, _ = gradients(params, layer_and_loss("patches")[1], images)
    on = mesh()

    def step(params, x):
        (value, y), (d_params, d_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, x
        )
        return (jax.lax.psum(value, "data"), y), (d_params, d_x)

    mapped = jax.jit(
        jax.shard_map(
            step,
            mesh=on,
            in_specs=(P(), P("data")),
            out_specs=((P(), P("data")), (P(), P("data"))),
        )
    )
    (_, y), (d_params, d_x) = mapped(params, images)
    assert_same((y, d_params, d_x), want)
    assert_no_moved_activations(mapped.lower(params, images).compile().as_text(), 64)


def test_a_batch_that_no_axis_divides(images):
    """6 images (a slice inside the program) on 8 devices: correct, the work split
    over the heads where the batch cannot be."""
    params, loss = layer_and_loss()

    def sliced(params, x):
        return loss(params, x[:6])

    want, _ = gradients(params, layer_and_loss("patches")[1], images[:6])
    on = mesh()
    got, _ = gradients(params, sliced, images, NamedSharding(on, P("data")), NamedSharding(on, P()))
    assert_same(got[:2], want[:2])
    assert relative_error(got[2][:6], want[2]) < 1e-5


def test_per_head_tables_vmap_the_kernels(images):
    """relative_tables="per_head" vmaps the attention over heads: one kernel call per
    head, each on every device's images."""
    params, loss = layer_and_loss(relative_tables="per_head")
    want, _ = gradients(params, layer_and_loss("patches", relative_tables="per_head")[1], images)
    on = mesh()
    got, _ = gradients(params, loss, images, NamedSharding(on, P("data")), NamedSharding(on, P()))
    assert_same(got, want)


def test_bfloat16_several_tiles_and_images_per_device():
    """4 images of 7 tiles each per device (tile 16), bfloat16 inputs: the kernels on each
    device's block against the float64 reference, every gradient."""
    rng = np.random.default_rng(2)
    inputs = make_inputs(rng, (16, 9, 10, 2, 4, 4), 3, ("content", "relative"))
    on = mesh((4,), ("data",))
    split, replicated = NamedSharding(on, P("data")), NamedSharding(on, P())
    placed = [
        jax.device_put(jnp.asarray(x, jnp.bfloat16), split if x.ndim == 5 else replicated)
        for x in inputs
    ]
    attend = functools.partial(gpu.local_attention, kernel_size=3, padding="zeros", tile=16)

    def loss(*arrays):
        return jnp.sum(attend(*arrays).astype(jnp.float32) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*placed)
    as_bf16 = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in inputs]
    want = float64_gradients(as_bf16, "zeros", lambda y: y**2)
    for g, w in zip(grads, want, strict=True):
        assert relative_error(g, w) < 3e-2  # bfloat16 inputs, outputs and gradients


def test_split_for_prefers_the_batch_then_the_heads():
    on = mesh((2, 4), ("data", "model"))
    assert shards.split_for(on, batch=16, heads=8) == P(("data", "model"), None)
    assert shards.split_for(on, batch=6, heads=8) == P(("data",), ("model",))
    assert shards.split_for(on, batch=3, heads=8) == P(None, ("data", "model"))
    assert shards.split_for(on, batch=3, heads=3) == P(None, None)


def test_trainer_train_step_runs_the_kernels_per_device():
    """The trainer's jitted train step (trainer.jit_train_step) on 4 devices, nothing in
    context: the kernels' calls are split at lowering; no collective moves activations."""
    config = config_lib.load_config(
        "configs/imagenet.py:depth=26,variant=conv_stem_attention,runlocal=true"
    )
    config.model.attention_impl = "pallas"
    config.input.update(batch_size=8, eval_batch_size=8)
    setup = trainer.model_setup(
        config, jax.devices()[:4], dataset=None, steps_per_epoch=10, total_steps=10
    )
    abstract = trainer.abstract_state(setup)
    train = trainer.jit_train_step(setup, abstract)
    batch = trainer.abstract_batch(setup, 8)
    assert "sasa_per_group" in str(train.trace(abstract, batch).jaxpr)
    text = train.lower(abstract, batch).compile().as_text()
    largest = max(x.size for x in jax.tree.leaves(abstract.params))
    assert_no_moved_activations(text, largest_parameter=largest)


def test_attention_plan_names_every_layer_and_its_choice():
    config = config_lib.load_config("configs/imagenet.py:depth=50,variant=conv_stem_attention")
    plan = attention_plan(config_lib.build_model(config), 224, "cpu")
    counts = {line.split(":")[0]: int(line.split(": ")[1].split()[0]) for line in plan}
    assert sum(counts.values()) == 16  # ResNet-50: 3 + 4 + 6 + 3 blocks, one layer each
    assert counts == {
        "56×56 k=7 auto → shifted": 4,
        "28×28 k=7 auto → shifted": 4,
        "14×14 k=7 auto → shifted": 6,
        "7×7 k=7 auto → dense": 2,
    }
    config.model.attention_impl = "pallas"
    plan = attention_plan(config_lib.build_model(config), 224, "cpu")
    assert len(plan) == 4 and all(line.split(": ")[0].endswith(" pallas") for line in plan)


class _OneLayer(nnx.Module):
    """RGB -> 512 channels -> one SASA layer (k = 9, heads of 64) in ``dtype``."""

    def __init__(self, dtype):
        self.lift = nnx.Linear(3, 512, dtype=dtype, rngs=nnx.Rngs(0))
        self.attention = SelfAttention2D(
            512, 512, num_heads=8, kernel_size=9, dtype=dtype, rngs=nnx.Rngs(0)
        )

    def __call__(self, x):
        return self.attention(self.lift(x))


PLAN_CASES = [(jnp.bfloat16, "pallas"), (jnp.float32, "shifted")]


@pytest.mark.parametrize("dtype, chosen", PLAN_CASES)
def test_the_plan_decides_with_the_layers_dtype(dtype, chosen):
    """At 56², k = 9, heads of 64 a tile of the TPU kernels fits VMEM in bfloat16, not in
    float32: the plan, like the run, decides with the layer's own dtype."""
    model = nnx.eval_shape(lambda: _OneLayer(dtype))
    assert attention_plan(model, 56, "tpu") == [f"56×56 k=9 auto → {chosen}: 1 layer"]


@pytest.mark.slow  # lowers the Mosaic kernels at k = 9, heads of 64: 20 s
@pytest.mark.parametrize("dtype, chosen", PLAN_CASES)
def test_the_plan_says_what_the_run_lowers(dtype, chosen):
    """What the plan says (above) is what the program lowered for TPU runs."""
    q = jnp.zeros((1, 56, 56, 8, 64), dtype)
    lowered = (
        jax.jit(lambda q: local_attention(q, q, q, None, None, kernel_size=9, impl="auto"))
        .trace(q)
        .lower(lowering_platforms=("tpu",))
    )
    kernels = "tpu_custom_call" in lowered.as_text()
    assert kernels == (chosen == "pallas")


def step_failing_to_compile(error: Exception):
    """A jitted step stand-in whose compile raises ``error``."""

    class Lowered:
        def compile(self):
            raise error

    class Step:
        def lower(self, *args):
            return Lowered()

    return Step()


def raised_in(filename: str, error: Exception) -> Exception:
    """``error`` with a traceback whose frame is in ``filename``."""
    try:
        exec(compile("raise error", filename, "exec"), {"error": error})
    except Exception as e:  # noqa: BLE001 - caught to be returned with its traceback
        return e
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    "error",
    [
        MosaicError("INTERNAL: Mosaic failed to compile TPU kernel: bad\n..."),
        raised_in("/site-packages/jax/_src/pallas/triton/lowering.py", ValueError("shape")),
        jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: shared memory in sasa_local_attention_dq"),
    ],
    ids=["mosaic", "pallas_lowering", "xla_names_our_kernel"],
)
def test_kernel_compile_failure_names_the_way_round(error):
    """In the library's words (impl='shifted'), and in the trainer's the config field."""
    library_error = pytest.raises(KernelCompileError, match="impl='shifted'")
    with library_error as e, kernel_failures_explained():
        step_failing_to_compile(error).lower().compile()
    assert "\n" not in str(e.value) and "config" not in str(e.value)
    with pytest.raises(TrainError, match="--config.model.attention_impl=shifted ") as e:
        compile_or_explain(step_failing_to_compile(error))
    assert "\n" not in str(e.value) and "--verbose" in str(e.value)
    assert isinstance(e.value.__cause__, KernelCompileError)


@pytest.mark.parametrize(
    "error",
    [
        # Words alone do not make a kernel failure: a sharding error quoting Mosaic's name,
        # raised elsewhere, is not ours to explain.
        NotImplementedError("Mosaic kernels cannot be automatically partitioned."),
        jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of HBM"),
    ],
)
def test_other_compile_failures_are_raised_as_they_are(error):
    with pytest.raises(type(error)):
        compile_or_explain(step_failing_to_compile(error))
