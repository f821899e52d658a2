"""Backends and the dispatch between them.

A backend is one small object with four kernel primitives (the same for every backend)::

    affinity(x, s, h, w, scale, softmax)   -> A [B, 9, H, W]      (softmax=False: the scaled logits)
    aggregate(x, A, h, w)                  -> num [B, C, hh, ww], den [B, 1, hh, ww]
    upsample(s, A, h, w)                   -> y [B, C, H, W]
    affinity_aggregate(x, s, h, w, scale)  -> A, num, den          (one pass over x)

and two predicates that say *why* it cannot run: :meth:`Backend.unavailable_reason` (not usable in
this process at all) and :meth:`Backend.decline_reason` (cannot take these tensors). The backward
passes of every op are written once, in :mod:`stvit_kernels.ops`, in terms of these primitives, so a
backend is only its forward kernels. Inputs reach a backend already validated (shapes, dtypes,
devices); it may assume them and only needs to make them contiguous if its kernels want that.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from . import reference as _ref

logger = logging.getLogger("stvit_kernels")


class Backend:
    """Base class: a name, two predicates and the four primitives."""

    name: str = "?"
    #: True when the primitives are differentiable by plain autograd (the reference only).
    autograd_native: bool = False

    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run in this process, else why not."""
        return None

    def decline_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if this backend takes tensors of this device and dtype, else why not."""
        return None

    def affinity(self, x, s, h, w, scale, softmax=True):
        raise NotImplementedError

    def aggregate(self, x, A, h, w):
        raise NotImplementedError

    def upsample(self, s, A, h, w):
        raise NotImplementedError

    def affinity_aggregate(self, x, s, h, w, scale):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<stvit_kernels backend {self.name!r}>"


class ReferenceBackend(Backend):
    """Pure PyTorch (:mod:`stvit_kernels.reference`): any device, any floating dtype."""

    name = "reference"
    autograd_native = True

    def affinity(self, x, s, h, w, scale, softmax=True):
        return _ref.affinity(x, s, h, w, scale, softmax)

    def aggregate(self, x, A, h, w):
        return _ref.aggregate(x, A, h, w)

    def upsample(self, s, A, h, w):
        return _ref.upsample(s, A, h, w)

    def affinity_aggregate(self, x, s, h, w, scale):
        return _ref.affinity_aggregate(x, s, h, w, scale)


class CompiledBackend(Backend):
    """The C++/CUDA extension ``stvit_kernels._C``: ops ``torch.ops.stvit.*`` that PyTorch's
    dispatcher routes to the CPU or the CUDA kernels by the tensors' device."""

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_type = device_type

    def unavailable_reason(self) -> Optional[str]:
        from . import _ext

        reason = _ext.load_error()
        if reason is not None:
            return reason
        if self.device_type == "cuda":
            if not _ext.built_with_cuda():
                return ("the extension was built without CUDA kernels (no nvcc or a CPU-only torch "
                        "at build time, or STVIT_NO_CUDA=1); rebuild with STVIT_FORCE_CUDA=1")
            if not torch.cuda.is_available():
                return "no CUDA device is available (torch.cuda.is_available() is False)"
        return None

    def decline_reason(self, device, dtype):
        if device.type != self.device_type:
            return f"runs on {self.device_type} tensors only, got a {device.type} tensor"
        return None

    @staticmethod
    def _ops():
        return torch.ops.stvit

    def affinity(self, x, s, h, w, scale, softmax=True):
        return self._ops().affinity(x.contiguous(), s.contiguous(), h, w, scale, softmax)

    def aggregate(self, x, A, h, w):
        return tuple(self._ops().aggregate(x.contiguous(), A.contiguous(), h, w))

    def upsample(self, s, A, h, w):
        return self._ops().upsample(s.contiguous(), A.contiguous(), h, w)

    def affinity_aggregate(self, x, s, h, w, scale):
        return tuple(self._ops().affinity_aggregate(x.contiguous(), s.contiguous(), h, w, scale))


class TritonBackend(Backend):
    """Triton kernels (:mod:`stvit_kernels.triton_kernels`): CUDA tensors, or CPU tensors when the
    Triton interpreter is on (``TRITON_INTERPRET=1``, how CI runs them)."""

    name = "triton"

    def _module(self):
        from . import triton_kernels

        return triton_kernels

    def unavailable_reason(self) -> Optional[str]:
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            return f"triton is not importable ({type(e).__name__}: {e})"
        if not torch.cuda.is_available() and not _triton_interpreting():
            return "no CUDA device is available and TRITON_INTERPRET is not set"
        return None

    def decline_reason(self, device, dtype):
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpreting():
            return None
        return (f"runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got a {device.type} tensor")

    def affinity(self, x, s, h, w, scale, softmax=True):
        return self._module().affinity(x, s, h, w, scale, softmax)

    def aggregate(self, x, A, h, w):
        return self._module().aggregate(x, A, h, w)

    def upsample(self, s, A, h, w):
        return self._module().upsample(s, A, h, w)

    def affinity_aggregate(self, x, s, h, w, scale):
        return self._module().affinity_aggregate(x, s, h, w, scale)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_BACKENDS: Dict[str, Backend] = {
    b.name: b for b in (ReferenceBackend(), CompiledBackend("cpu", "cpu"),
                        CompiledBackend("cuda", "cuda"), TritonBackend())
}

#: What ``auto`` tries, fastest first, for each device type; ``reference`` closes every list.
_AUTO_ORDER: Dict[str, Sequence[str]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

_state = threading.local()


def get_backend(name: str) -> Backend:
    """The backend object of that name, available or not; ``ValueError`` for an unknown name."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; {_describe()}") from None


def available_backends() -> List[str]:
    """Names of the backends that can run in this process, e.g. ``['reference', 'cpu']``."""
    return [name for name, b in _BACKENDS.items() if b.unavailable_reason() is None]


def _describe() -> str:
    parts = []
    for name, b in _BACKENDS.items():
        reason = b.unavailable_reason()
        parts.append(f"{name}: available" if reason is None else f"{name}: unavailable ({reason})")
    return "backends are 'auto' and " + "; ".join(parts)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend (or ``"auto"``) for every op called inside the ``with`` block.

    >>> with stvit_kernels.use_backend("reference"):
    ...     y = sta(x)
    """
    if name != "auto":
        _require_available(get_backend(name))
    previous = getattr(_state, "name", "auto")
    _state.name = name
    try:
        yield
    finally:
        _state.name = previous


def current_backend_name() -> str:
    """The name set by the innermost :func:`use_backend`, ``"auto"`` outside any."""
    return getattr(_state, "name", "auto")


def _require_available(b: Backend) -> None:
    reason = b.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend {b.name!r} is not available: {reason}. "
                         f"Available: {available_backends()}; {_describe()}")


def _auto_candidates(device: torch.device) -> Sequence[str]:
    return _AUTO_ORDER.get(device.type, ("reference",))


def explain(x: torch.Tensor, backend: Optional[str] = None) -> str:
    """Which backend an op would use for tensors like ``x``, and why each other one was declined.

    >>> print(stvit_kernels.explain(torch.randn(1, 64, 56, 56)))
    """
    name = backend or current_backend_name()
    lines = []
    chosen = None
    if name == "auto":
        order = list(_auto_candidates(x.device))
        for cand in order:
            b = _BACKENDS[cand]
            reason = b.unavailable_reason() or b.decline_reason(x.device, x.dtype)
            if reason is None and chosen is None:
                chosen = cand
                lines.append(f"  {cand}: chosen")
            elif reason is None:
                lines.append(f"  {cand}: usable, but {chosen!r} comes first")
            else:
                lines.append(f"  {cand}: declined ({reason})")
        for other in _BACKENDS:
            if other not in order:
                lines.append(f"  {other}: not tried by 'auto' for {x.device.type} tensors")
        head = f"auto on a {x.device.type} {x.dtype} tensor -> {chosen}"
    else:
        b = get_backend(name)
        reason = b.unavailable_reason() or b.decline_reason(x.device, x.dtype)
        chosen = name if reason is None else None
        head = f"forced {name!r} on a {x.device.type} {x.dtype} tensor -> " + (
            name if reason is None else f"error ({reason})")
    return "\n".join([head] + lines)


def resolve(x: torch.Tensor, backend: Optional[str] = None) -> Backend:
    """The backend to run for tensors like ``x``: ``backend`` if given, else the one set by
    :func:`use_backend`, else ``auto``. A forced backend that cannot run raises ``ValueError``
    (never a silent fallback)."""
    name = backend or current_backend_name()
    if name != "auto":
        b = get_backend(name)
        _require_available(b)
        reason = b.decline_reason(x.device, x.dtype)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return b
    for cand in _auto_candidates(x.device):
        b = _BACKENDS[cand]
        reason = b.unavailable_reason() or b.decline_reason(x.device, x.dtype)
        if reason is None:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s", explain(x, "auto"))
            return b
    raise AssertionError("unreachable: the reference backend takes every tensor")
