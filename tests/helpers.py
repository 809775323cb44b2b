"""Helpers shared by the test modules: one place, imported by tests, never by each other.

- attention inputs and comparisons (``make_inputs``, ``relative_error``, ``random_case``,
  ``outputs_and_gradients``);
- the tiny training config and restoring its final parameters; damaging a checkpoint;
- every shipped config spec;
- real ``train.py`` processes for the fault tests (``Process``, ``train``);
- datasets written on the spot: a folder of class folders (``write_image_folder``) and a
  throwaway TFDS dataset (``prepare_tfds``).

The float64 loop references live apart, in ``tests/reference.py``: they are the oracle,
written independently of sasa_flax and of these helpers.
"""

from __future__ import annotations

import functools
import os
import pathlib
import queue
import re
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sasa_flax import config_lib, costs, trainer
from sasa_flax.ops import patches
from sasa_flax.run import Workdir, checkpoints, restoring
from sasa_flax.tools import aot

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

# --- attention inputs -----------------------------------------------------------------

TERMS = [("content", "relative"), ("content",), ("relative",)]  # k / tables present

# Central-difference step for float64 ``check_grads``. jax's default, 1e-4, leaves a
# truncation error of ~eps² × the third derivative / 6, which reached 3.5e-6 (over the
# 1e-6 tolerance) for the softmax at k = 5 for the reference itself; at 1e-5 it is 100×
# smaller and round-off (~1e-16 / eps) stays negligible.
FD_STEP = 1e-5


def make_inputs(rng, shape, kernel_size, terms, dtype=np.float32):
    """(q, k, v, rel_row, rel_col) for shape (batch, height, width, heads, d, dv); k and
    the tables are None where ``terms`` leaves them out."""
    batch, height, width, heads, d, dv = shape
    normal = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    q = normal(batch, height, width, heads, d)
    k = normal(batch, height, width, heads, d) if "content" in terms else None
    v = normal(batch, height, width, heads, dv)
    rel_row = normal(kernel_size, d // 2) if "relative" in terms else None
    rel_col = normal(kernel_size, d // 2) if "relative" in terms else None
    return q, k, v, rel_row, rel_col


FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def relative_error(actual, expected, floor=FLOAT32_TINY):
    """max |actual - expected| relative to the scale of expected (which may be all zero),
    that scale floored at ``floor``."""
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), floor)
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))) / scale


def of_present_inputs(attention, inputs):
    """(f, args): ``attention(*inputs)`` as a function of the inputs that are not None
    (k and the tables may be absent), for ``jax.grad`` and ``check_grads``."""
    present = [i for i, x in enumerate(inputs) if x is not None]

    def f(*arrays):
        full = list(inputs)
        for i, a in zip(present, arrays, strict=True):
            full[i] = a
        return attention(*full)

    return f, tuple(jnp.asarray(inputs[i]) for i in present)


def random_case(seed):
    """A random shape / option combination, borders and odd sizes included:
    (rng, shape, kernel_size, terms, padding)."""
    rng = np.random.default_rng(seed)
    kernel_size = int(rng.choice([1, 3, 5, 7, 9]))
    height, width = (int(x) for x in rng.integers(1, 11, size=2))
    heads, half = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    terms = TERMS[int(rng.integers(len(TERMS)))]
    padding = str(rng.choice(["mask", "zeros"]))
    shape = (int(rng.integers(1, 3)), height, width, heads, 2 * half, int(rng.integers(1, 7)))
    return rng, shape, kernel_size, terms, padding


def outputs_and_gradients(attention, seed, dtype):
    """Random case ``seed`` (``random_case``) in ``dtype``: (y, gradients of every
    present input) of ``attention`` and of ``"patches"``, for the loss Σ y·c with a
    random cotangent c.

    ``attention`` takes (q, k, v, rel_row, rel_col, *, kernel_size, padding).
    """
    rng, shape, kernel_size, terms, padding = random_case(seed)
    inputs = [
        None if x is None else jnp.asarray(x, dtype)
        for x in make_inputs(rng, shape, kernel_size, terms)
    ]
    cotangent = jnp.asarray(rng.standard_normal(shape[:4] + (shape[5],)), dtype)

    options = dict(kernel_size=kernel_size, padding=padding)
    return (
        y_and_gradients(attention, inputs, cotangent, **options),
        y_and_gradients(patches.local_attention, inputs, cotangent, **options),
    )


def y_and_gradients(attention, inputs, cotangent, *, kernel_size, padding):
    """(y, gradients of every present input) of ``attention`` on ``inputs`` (q, k, v,
    rel_row, rel_col; k and the tables may be None), for the loss Σ y·cotangent taken in
    at least float32 (float64 for a float64 cotangent)."""
    f, args = of_present_inputs(
        functools.partial(attention, kernel_size=kernel_size, padding=padding), inputs
    )
    dtype = jnp.promote_types(cotangent.dtype, jnp.float32)

    def loss(*arrays):
        y = f(*arrays)
        return jnp.sum(y.astype(dtype) * cotangent.astype(dtype)), y

    grads, y = jax.jit(jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return y, grads


# --- models and training ----------------------------------------------------------------


def param_count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def model_count(config) -> tuple[int, int]:
    """(parameters, FLOPs) of the config's model at its image size (``costs.count``)."""
    return costs.count(config_lib.validate(config), config.input.image_size)


def tiny_config(**train):
    """tests/tiny_config.py: cheap to compile, six steps, a checkpoint every two."""
    config = config_lib.load_config("tests/tiny_config.py")
    config.train.update(**train)
    return config


def final_params(config, workdir, devices):
    """(step, parameters) of the newest checkpoint in ``workdir``, on the host."""
    setup = trainer.make_setup(config, devices=devices)
    mngr = checkpoints.manager(Workdir.of(workdir), read_only=True)
    step = restoring.step_to_restore(mngr, Workdir.of(workdir), None)
    item = checkpoints.restore(mngr, step, model=trainer.abstract_state(setup).model_item())
    return step, jax.device_get(item["model"])


def shipped_config_specs() -> list[str]:
    """Every shipped config spec (file:arg), for tests that must cover them all."""
    specs = []
    for path in sorted(CONFIG_DIR.glob("*.py")):
        module = config_lib.load_config_module(str(path))
        rows = getattr(module, "PAPER_ROWS", None)
        specs += [f"{path}:{arg}" for arg in rows] if rows else [str(path)]
    return specs


def damage_checkpoint(step_dir: pathlib.Path, how: str) -> None:
    """Real damage on disk to checkpoint directory ``step_dir``: its largest array file
    ``"truncated"`` to half or with 64 bytes ``"flipped"``, its meta item missing
    (``"missing_meta"``), or its model item's metadata not JSON (``"unparsable_metadata"``)."""
    import shutil

    if how in ("truncated", "flipped"):
        arrays = [f for f in (step_dir / "model").rglob("*") if f.is_file() and "/d/" in str(f)]
        target = max(arrays, key=lambda f: f.stat().st_size)
        data = bytearray(target.read_bytes())
        if how == "truncated":
            data = data[: len(data) // 2]
        else:
            middle = len(data) // 2
            data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        target.write_bytes(bytes(data))
    elif how == "missing_meta":
        shutil.rmtree(step_dir / "meta")
    elif how == "unparsable_metadata":
        (step_dir / "model" / "_METADATA").write_text("{not json")
    else:
        raise ValueError(f"unknown damage {how!r}")


# --- real train.py processes --------------------------------------------------------------


def environment(devices: int = 1, **extra: str) -> dict[str, str]:
    """The test's environment with ``devices`` fake CPU devices and the tests' compilation
    cache (so that each process compiles the tiny model's step once per suite)."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


class Process:
    """A subprocess whose merged stdout/stderr is collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.popen = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.popen.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        """Blocks until a line matches ``pattern``; fails with the output so far if the
        process ends or the time runs out first."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if match := re.search(pattern, line):
                return match
        self.popen.kill()
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.output}")

    def finish(self, timeout: float = 180) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output}") from None
        time.sleep(0.05)  # let the reader thread drain the pipe
        return code


def train(workdir, config_arg: str, *flags: str, devices: int = 1, **env: str) -> Process:
    """``python train.py --config tests/tiny_config.py:<config_arg> --workdir <workdir>``."""
    args = ["train.py", "--config", f"tests/tiny_config.py:{config_arg}", "--workdir"]
    return Process([*args, str(workdir), *flags], environment(devices, **env))


# --- default and slow selections ----------------------------------------------------------


def default_and_slow(cases, default):
    """``cases`` for ``pytest.mark.parametrize``: those in ``default`` run in the default
    selection, every other one is marked ``slow`` (it runs in CI with ``-m slow``).

    Each case is a tuple of parameter values (or one value for a single parameter).
    Raises if ``default`` names a case that is not in ``cases``, so that a default subset
    cannot silently drift out of the grid it is taken from.
    """
    cases, default = list(cases), list(default)
    missing = [case for case in default if case not in cases]
    if missing:
        raise ValueError(f"default cases {missing} are not in the grid")
    return [
        case
        if case in default
        else pytest.param(*(case if isinstance(case, tuple) else (case,)), marks=pytest.mark.slow)
        for case in cases
    ]


def exported_step(
    platform: str, size: int, channels: int, impl: str, batch: int = 128, dtype=jnp.bfloat16
) -> str:
    """The MLIR of SelfAttention2D's forward and its gradients w.r.t. the input and every
    parameter (bfloat16 by default), exported for ``platform``."""
    from sasa_flax.layers import SelfAttention2D

    layer = SelfAttention2D(
        channels,
        channels,
        num_heads=8,
        kernel_size=7,
        impl=impl,
        dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32))

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    x = jax.ShapeDtypeStruct((batch, size, size, channels), dtype)
    exported = jax.export.export(
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1))),
        platforms=(platform,),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(aot.KERNEL_TARGETS["cuda"])],
    )(abstract, x)
    return exported.mlir_module()


def write_image_folder(root: pathlib.Path, counts: dict[str, int], size=(4, 4), *, seed=None):
    """``root/<class>/<i>.png``, ``counts[class]`` images per class: black, or with
    ``seed`` random pixels and every other image a JPEG (both decoders exercised)."""
    import tensorflow as tf

    rng = None if seed is None else np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            if rng is None:
                pixels = np.zeros((*size, 3), np.uint8)
            else:
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            jpeg = rng is not None and i % 2 == 0
            encoded = (tf.io.encode_jpeg if jpeg else tf.io.encode_png)(pixels).numpy()
            (root / name / f"{i}.{'jpg' if jpeg else 'png'}").write_bytes(encoded)


def prepare_tfds(data_dir, class_name: str, features: dict, splits: dict) -> str:
    """Prepares a throwaway TFDS dataset into ``data_dir`` (a path or gs://) and returns
    its name, TFDS's snake_case of ``class_name``. ``features``: the FeaturesDict's
    entries; ``splits``: {split: a function returning its examples (dicts)}."""
    import tensorflow_datasets as tfds

    def info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def split_generators(self, dl_manager):
        return {split: self._generate_examples(examples) for split, examples in splits.items()}

    def generate_examples(self, examples):
        yield from enumerate(examples())

    builder = type(
        class_name,
        (tfds.core.GeneratorBasedBuilder,),
        dict(
            VERSION=tfds.core.Version("1.0.0"),
            _info=info,
            _split_generators=split_generators,
            _generate_examples=generate_examples,
        ),
    )(data_dir=str(data_dir))
    builder.download_and_prepare()
    return builder.name
