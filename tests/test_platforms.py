"""Per-platform choices are made when a program is lowered: exported from this CPU host
for CUDA or TPU, a layer gets that platform's implementation (no GPU or TPU needed).

What this proves: the programs lower, with the right kernels and no loop over the batch.
Triton's PTX compile and XLA's TPU compile run only on the hardware.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sasa_flax import ops
from sasa_flax.layers import SelfAttention2D
from tests.helpers import default_and_slow

TRITON = "__gpu$xla.gpu.triton"
# ResNet-50's four attention stages: (H = W, channels), 8 heads, k = 7.
STAGES = [(56, 64), (28, 128), (14, 256), (7, 512)]


def exported_step(platform: str, size: int, channels: int, impl: str, batch: int = 128) -> str:
    """The MLIR of SelfAttention2D's forward and its gradients w.r.t. the input and every
    parameter (bfloat16), exported for ``platform``."""
    layer = SelfAttention2D(
        channels, channels, num_heads=8, kernel_size=7, impl=impl, dtype=jnp.bfloat16,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32))

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.bfloat16)
    exported = jax.export.export(
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
        platforms=(platform,),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)],
    )(abstract, x)
    return exported.mlir_module()


def test_the_choice_table():
    choices = {p: [ops.auto_choice(p, s, s, 7) for s, _ in STAGES] for p in ("cpu", "cuda", "tpu")}
    assert choices == {
        "cpu": ["shifted", "shifted", "shifted", "dense"],
        "cuda": ["pallas", "pallas", "dense", "dense"],
        "tpu": ["shifted", "shifted", "dense", "dense"],
    }


CASES = [(platform, *stage) for platform in ("cuda", "tpu") for stage in STAGES]


@pytest.mark.parametrize(
    "platform,size,channels", default_and_slow(CASES, default=[("cuda", 56, 64)])
)
def test_auto_exported_for_an_accelerator_gets_its_choice_and_no_batch_loop(
    platform, size, channels
):
    module = exported_step(platform, size, channels, "auto")
    choice = ops.auto_choice(platform, size, size, 7)
    # Forward (recomputed for the residuals), dq and dk/dv: three Triton kernels.
    assert module.count(f"@{TRITON}") == (3 if choice == "pallas" else 0)
    assert "stablehlo.while" not in module  # no lax.map over the batch, no interpreter


def test_the_cpu_export_keeps_the_cpu_rewrites():
    """The check above can fail: on CPU "shifted" maps over the batch (a while loop)."""
    assert "stablehlo.while" in exported_step("cpu", 28, 128, "auto", batch=2)


def test_pallas_exported_for_cuda_from_a_cpu_host_is_compiled_not_interpreted():
    module = exported_step("cuda", 16, 32, "pallas", batch=2)
    assert module.count(f"@{TRITON}") == 3 and "stablehlo.while" not in module
