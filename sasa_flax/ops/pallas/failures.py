"""When Mosaic or Triton refuses one of our kernels: one line naming the way round it.

Every ``pallas_call`` of ``gpu.py`` and ``tpu.py`` is named ``KERNEL_NAME_PREFIX + ...``,
so that an XLA error naming the custom call that failed can be told apart from any other.
A program that uses the layer (our trainer, or anyone's) compiles inside
``kernel_failures_explained()`` to get the line instead of the compiler's pages.
"""

from __future__ import annotations

import contextlib
import traceback

import jax

from sasa_flax.errors import ImplementationError

# The names our Pallas calls give their kernels (``name=`` of every pallas_call); XLA's
# compile errors name the custom call that failed.
KERNEL_NAME_PREFIX = "sasa_local_attention_"


class KernelCompileError(ImplementationError):
    """A fused attention kernel that this device's compiler refused."""


def kernel_failure(error: Exception) -> KernelCompileError | None:
    """A one-line error naming another attention implementation and how to see the whole
    error, if ``error`` came from compiling our fused kernels; else None.

    Recognised by what raised it, not by words a message may contain: Mosaic's own
    exception type (a TPU kernel refused by libtpu), a frame of Pallas' lowering or of
    ``sasa_flax/ops/pallas`` in the traceback (a kernel refused while lowering), or an
    XLA error that names one of our kernels' custom calls (e.g. a Triton kernel over
    the GPU's shared memory)."""
    if not (_raised_by_mosaic(error) or _raised_in_pallas(error) or _names_our_kernel(error)):
        return None
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return KernelCompileError(
        f"the fused attention kernels (impl 'pallas') failed to compile on this device: "
        f"{type(error).__name__}: {first}. Use impl='shifted' (or impl='dense' for small "
        "images) in this layer; the compiler's whole error is this one's cause; please "
        "report it."
    )


@contextlib.contextmanager
def kernel_failures_explained():
    """Re-raises the Mosaic or Triton compiler refusing a Pallas kernel as the one-line
    ``kernel_failure``; any other error as it is."""
    try:
        yield
    except Exception as e:
        if (explained := kernel_failure(e)) is None:
            raise
        raise explained from e


def _raised_by_mosaic(error: Exception) -> bool:
    return any(
        kind.__name__ == "MosaicError" and kind.__module__.startswith("jax._src.pallas")
        for kind in type(error).__mro__
    )


def _raised_in_pallas(error: Exception) -> bool:
    # This module's own frame (the ``with`` the error passed through) does not count.
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename != __file__]
    places = ("/jax/_src/pallas/", "/sasa_flax/ops/pallas/")
    return any(any(place in frame.filename for place in places) for frame in frames)


def _names_our_kernel(error: Exception) -> bool:
    return isinstance(error, jax.errors.JaxRuntimeError) and KERNEL_NAME_PREFIX in str(error)
