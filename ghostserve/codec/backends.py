"""The codec backends: one small interface and an explicit, lazily-importing registry.

Every Reed-Solomon operation (encode, reconstruct, verify) reduces to one
primitive: ``dst[j] = sum_i coeffs[j, i] * src[i]`` over GF(2^8), byte column by
byte column. :class:`Backend` implements just that; ``RSCode`` builds the
coefficient matrices and validates the arguments.

Contract for ``Backend.matmul``:

* ``coeffs`` is a small (r, k) uint8 matrix; the backend may cache tables built
  from it (keyed by its bytes), so callers must not mutate it afterwards.
* ``src`` and ``dst`` are equal-length 1-D uint8 views (already validated, see
  :mod:`ghostserve.codec.shards`); the backend reads ``src`` and writes every
  byte of ``dst`` in place and nothing else. Non-contiguous views are allowed.
* Buffers stay owned by the caller; nothing is retained after the call returns.
* It is safe to call ``matmul`` from several threads at once on one backend.

Backends are imported only when asked for, so ``import ghostserve.codec`` never
imports CuPy (or loads ISA-L) by itself.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from ghostserve.errors import BackendUnavailable


class Backend(ABC):
    """Applies a GF(2^8) coefficient matrix to byte shards. See the module docstring."""

    name: str = "?"

    @abstractmethod
    def matmul(self, coeffs: np.ndarray, src: Sequence[Any], dst: Sequence[Any]) -> None:
        """dst[j][:] = XOR_i coeffs[j, i] * src[i][:] (in place)."""

    def matmul_arrays(self, coeffs: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        """``matmul`` on C-contiguous 2-D host arrays (already validated by the caller)."""
        self.matmul(coeffs, list(src), list(dst))

    def accepts_device_arrays(self) -> bool:
        """True when ``src``/``dst`` may be device (CuPy) arrays."""
        return False


# name -> "module:Class"; imported on first use.
REGISTRY: dict[str, str] = {
    "reference": "ghostserve.codec.reference:ReferenceBackend",
    "isal": "ghostserve.codec.isal:IsalBackend",
    "cupy": "ghostserve.codec.cupy_backend:CupyBackend",
}


def names() -> list[str]:
    """Registered backend names, plus ``auto``."""
    return ["auto", *REGISTRY]


def load(name: str, **options: Any) -> Backend:
    """A new instance of backend ``name`` (``auto``: cupy with a CUDA device, else isal).

    Raises :class:`BackendUnavailable` when it cannot run here, with the reason.
    """
    if name == "auto":
        if cuda_device_present():
            try:
                return load("cupy", **options)
            except BackendUnavailable:
                pass
        return load("isal", **options)
    try:
        target = REGISTRY[name]
    except KeyError:
        raise BackendUnavailable(name, f"unknown backend; choose one of {names()}") from None
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendUnavailable(name, str(exc)) from exc
    return getattr(module, cls_name)(**options)


def cuda_device_present() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy  # noqa: PLC0415

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError without a driver, ...
        return False
