r"""Whole-model training throughput: SASA ResNets against the conv ResNets, in one run.

    python -m benchmarks.train_throughput                       # ResNet-26, 128², batch 8
    python -m benchmarks.train_throughput --depths 26,50 --image-size 224 --batch 32

For every depth and variant (``configs/imagenet.py``: ``baseline`` = conv ResNet,
``conv_stem_attention``, ``full_attention``) it compiles the trainer's own jitted train
step (``trainer.train_step``: forward, backward, Nesterov SGD, EMA; state donated) on
every local device, times --steps steps after a warm-up on random images, and reports
images/sec, the ratio to the conv ResNet of the same depth, the compiled temporaries
and the peak memory of the step (arguments + outputs + temporaries, from
``memory_analysis()``). Variants are measured one after another in the same process.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sasa_flax import config_lib, trainer


def make_setup(depth: int, variant: str, args) -> trainer.Setup:
    """The trainer's Setup for configs/imagenet.py without opening a dataset."""
    config = config_lib.load_config(f"configs/imagenet.py:depth={depth},variant={variant}")
    config.input.update(image_size=args.image_size, batch_size=args.batch)
    config.train.update(compute_dtype=args.dtype, num_steps=1000, warmup_epochs=0.0)
    config.model.attention_impl = args.impl
    return trainer.model_setup(
        config, jax.devices(), dataset=None, steps_per_epoch=1000, total_steps=1000
    )


def measure(setup: trainer.Setup, steps: int) -> dict:
    abstract = trainer.abstract_state(setup)
    state = trainer.init_state(setup, abstract)
    train = trainer.jit_train_step(setup, abstract)
    b, s = setup.config.input.batch_size, setup.config.input.image_size
    rng = np.random.default_rng(0)
    batch = trainer.global_batch(
        setup,
        {
            "image": rng.integers(0, 256, (b, s, s, 3), np.uint8),
            "label": rng.integers(0, 1000, b).astype(np.int32),
            "mask": np.ones(b, np.float32),
        },
    )
    start = time.perf_counter()
    compiled = train.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return dict(
        images_per_sec=b / step_s,
        step_ms=step_s * 1e3,
        compile_s=compile_s,
        temp_mb=memory.temp_size_in_bytes / 2**20,
        peak_mb=peak / 2**20,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="26")
    parser.add_argument("--variants", default="baseline,conv_stem_attention,full_attention")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="global, over all devices")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--impl", default="auto", help="config.model.attention_impl")
    parser.add_argument("--dtype", default="auto", help="config.train.compute_dtype")
    args = parser.parse_args()
    if args.impl == "pallas" and jax.default_backend() == "cpu":
        parser.error("impl pallas runs in Pallas' interpreter on CPU; time it on a GPU.")

    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}) × "
        f"{jax.device_count()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
        f"; jax {jax.__version__}; batch {args.batch} at {args.image_size}²; compute dtype "
        f"{jnp.dtype(trainer.compute_dtype(args.dtype)).name}; attention impl {args.impl}"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"malloc settings: {malloc or 'none'}\n")
    print("| model | images/s | ÷ conv ResNet | step ms | temp MB | peak MB | compile s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for depth in map(int, args.depths.split(",")):
        conv = None
        for variant in args.variants.split(","):
            r = measure(make_setup(depth, variant, args), args.steps)
            conv = r["images_per_sec"] if variant == "baseline" else conv
            ratio = f"{r['images_per_sec'] / conv:.2f}" if conv else "–"
            print(
                f"| R{depth} {variant} | {r['images_per_sec']:.1f} | {ratio} | "
                f"{r['step_ms']:.0f} | {r['temp_mb']:.0f} | {r['peak_mb']:.0f} | "
                f"{r['compile_s']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
