"""Backends and the dispatch between them.

A backend is one small object with the same differentiable primitives::

    affinity(x, s, h, w, scale, softmax)   -> A [B, 9, H, W]      (softmax=False: the scaled logits)
    aggregate(x, A, h, w)                  -> num [B, C, hh, ww], den [B, 1, hh, ww]
    upsample(s, A, h, w)                   -> y [B, C, H, W]
    affinity_aggregate(x, s, h, w, scale)  -> A, num, den          (one pass over x)
    associate(x, s, h, w, scale)           -> stokens, A           (the STA module's last step)

and two predicates that say *why* it cannot run: :meth:`Backend.unavailable_reason` (not usable in
this process at all) and :meth:`Backend.decline_reason` (cannot take these tensors). A fused
backend is one family of ``torch.library`` custom ops (:mod:`stvit_kernels._library`), whose
autograd formulas are written once for every family in terms of its own forward ops; the reference
is plain PyTorch. Inputs reach a backend already validated (shapes, dtypes, devices).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _library as _lib
from . import reference as _ref
from ._library import Prims

logger = logging.getLogger("stvit_kernels")


class Backend:
    """Base class: a name, two predicates and the primitives. A fused backend is one family of
    custom ops (:class:`stvit_kernels._library.Prims`), which carry their own autograd formulas."""

    name: str = "?"
    #: The kernels of this backend take contiguous NCHW tensors only.
    needs_contiguous: bool = True

    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run in this process, else why not. Probed once, when
        ``stvit_kernels`` is imported (so that ``torch.compile`` traces only a lookup)."""
        if self.name not in _UNAVAILABLE:
            _UNAVAILABLE[self.name] = self._probe()
        return _UNAVAILABLE[self.name]

    def _probe(self) -> Optional[str]:
        return None

    def decline_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if this backend takes tensors of this device and dtype, else why not."""
        return None

    def prims(self) -> Prims:
        raise NotImplementedError

    def _c(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous() if self.needs_contiguous else t

    def affinity(self, x, s, h, w, scale, softmax=True):
        return self.prims().affinity(self._c(x), self._c(s), h, w, scale, softmax)

    def aggregate(self, x, A, h, w):
        return tuple(self.prims().aggregate(self._c(x), self._c(A), h, w))

    def upsample(self, s, A, h, w):
        return self.prims().upsample(self._c(s), self._c(A), h, w)

    def affinity_aggregate(self, x, s, h, w, scale):
        return tuple(self.prims().affinity_aggregate(self._c(x), self._c(s), h, w, scale))

    def pool(self, x, h, w):
        """The mean of every ``h x w`` cell: the module's initial super tokens."""
        return F.avg_pool2d(x, (h, w))

    def associate(self, x, s, h, w, scale):
        """Last association step of STA: ``(num / (den + 1e-12), A)`` from one fused pass, the
        gradient flowing into ``x`` through ``num`` only (``A`` is returned non-differentiable)."""
        stokens, A, _ = self.prims().associate(self._c(x), self._c(s), h, w, scale)
        return stokens, A

    def __repr__(self) -> str:
        return f"<stvit_kernels backend {self.name!r}>"


class ReferenceBackend(Backend):
    """Pure PyTorch (:mod:`stvit_kernels.reference`): any device, any floating dtype; plain
    autograd differentiates it."""

    name = "reference"
    needs_contiguous = False

    def affinity(self, x, s, h, w, scale, softmax=True):
        return _ref.affinity(x, s, h, w, scale, softmax)

    def aggregate(self, x, A, h, w):
        return _ref.aggregate(x, A, h, w)

    def upsample(self, s, A, h, w):
        return _ref.upsample(s, A, h, w)

    def affinity_aggregate(self, x, s, h, w, scale):
        return _ref.affinity_aggregate(x, s, h, w, scale)

    def associate(self, x, s, h, w, scale):
        stokens, A, _ = _lib.reference_associate(x, s, h, w, scale)
        return stokens, A


class CompiledBackend(Backend):
    """The C++/CUDA extension ``stvit_kernels._C``: ops ``torch.ops.stvit.*`` that PyTorch's
    dispatcher routes to the CPU or the CUDA kernels by the tensors' device."""

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_type = device_type

    def _probe(self) -> Optional[str]:
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

    def prims(self) -> Prims:
        return _lib.compiled_prims()

    def pool(self, x, h, w):
        return torch.ops.stvit.pool.default(x.contiguous(), h, w)


class TritonBackend(Backend):
    """Triton kernels (:mod:`stvit_kernels.triton_kernels`, as the ``stvit::triton_*`` ops): CUDA
    tensors, or CPU tensors when the Triton interpreter is on (``TRITON_INTERPRET=1``, how CI runs
    them). The kernels take any strides."""

    name = "triton"
    needs_contiguous = False

    def _probe(self) -> Optional[str]:
        # found, not imported: triton is imported by the first kernel call
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not torch.cuda.is_available() and not _TRITON_INTERPRET:
            return "no CUDA device is available and TRITON_INTERPRET is not set"
        return None

    def decline_reason(self, device, dtype):
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _TRITON_INTERPRET:
            return None
        return (f"runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got a {device.type} tensor")

    def prims(self) -> Prims:
        return _lib.TRITON


#: Triton reads TRITON_INTERPRET once, when its kernels are decorated; so does this module.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Backend name -> why it cannot run in this process (None: it can); see Backend.unavailable_reason.
_UNAVAILABLE: Dict[str, Optional[str]] = {}


_BACKENDS: Dict[str, Backend] = {
    b.name: b for b in (ReferenceBackend(), CompiledBackend("cpu", "cpu"),
                        CompiledBackend("cuda", "cuda"), TritonBackend())
}
for _b in _BACKENDS.values():  # probe now, outside any torch.compile trace (loads the extension)
    _b.unavailable_reason()

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
            if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s", explain(x, "auto"))
            return b
    raise AssertionError("unreachable: the reference backend takes every tensor")
