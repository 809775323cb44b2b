"""TensorFlow (for tf.data and TFDS only), imported once with its start-up lines silenced.

TensorFlow's C++ start-up lines (oneDNN, "absl::InitializeLog") go to file descriptor 2
before any Python logging applies; they are dropped here, and its later C++ warnings
(TF_CPP_MIN_LOG_LEVEL=2), unless SASA_FLAX_VERBOSE is set.
A failing import still raises its Python exception, after stderr is restored. Import this
before anything that imports TensorFlow (clu, tfds).
"""

import contextlib
import os

# TensorFlow's C++ warnings (a "Local rendezvous is aborting" or "Input file read error"
# line before every decode error the input pipeline reports itself, in one line): errors
# only, unless asked for. jax's import sets "1" (INFO hidden) when nothing was set; a
# value the user chose ("0", "3") is kept.
if not os.environ.get("SASA_FLAX_VERBOSE") and os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1") == "1":
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"


@contextlib.contextmanager
def _quiet_stderr():
    if os.environ.get("SASA_FLAX_VERBOSE"):
        yield
        return
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


with _quiet_stderr():
    import tensorflow as tf

    tf.constant(0)  # the runtime starts (and logs) on first use
    # tf.data must not take the accelerator from JAX.
    tf.config.set_visible_devices([], "GPU")

__all__ = ["tf"]
