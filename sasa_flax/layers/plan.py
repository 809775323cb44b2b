"""Which local-attention implementation each ``SelfAttention2D`` of a model runs on a
platform: what ``impl="auto"`` resolves to, said once per run (the trainer and eval.py
log it) so that a researcher reading the log knows which kernels ran."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sasa_flax import costs, ops
from sasa_flax.layers.attention import SelfAttention2D


def attention_plan(model: nnx.Module, image_size: int, platform: str) -> list[str]:
    """Every attention layer of ``model`` on (1, image_size, image_size, 3) images,
    grouped by input shape, with the implementation it runs on ``platform`` ("cpu",
    "tpu", "cuda", "rocm"): e.g. "56×56 k=7 auto → pallas: 3 layers". [] for a model
    without SASA layers."""
    modules = {"/".join(map(str, path)): m for path, m in nnx.iter_graph(model)}
    layers: dict[str, int] = {}
    for cost in costs.trace(model, (1, image_size, image_size, 3))[0]:
        layer = modules.get(cost.name)
        if not isinstance(layer, SelfAttention2D):
            continue
        height, width = cost.in_shape[1:3]
        impl, k = layer.options.impl, layer.options.kernel_size
        if impl == "auto":
            # What the run's lowering decides (ops.local_attention's "auto"): the same rule
            # on the same widths and dtype (the kernels' VMEM depends on the itemsize).
            head = layer.head_dim
            itemsize = jnp.dtype(layer.dtype or layer.query.param_dtype).itemsize
            chosen = ops.auto_choice(
                platform, height, width, k, head_dim=head, value_dim=head, itemsize=itemsize
            )
            impl = f"auto → {chosen}"
        key = f"{height}×{width} k={k} {impl}"
        layers[key] = layers.get(key, 0) + 1
    return [f"{key}: {n} layer{'s' * (n > 1)}" for key, n in layers.items()]
