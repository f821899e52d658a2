"""Backends and the dispatch between them.

A backend is one small object with the same differentiable primitives::

    affinity(x, s, h, w, scale, softmax)   -> A [B, 9, H, W]      (softmax=False: the scaled logits)
    aggregate(x, A, h, w)                  -> num [B, C, hh, ww], den [B, 1, hh, ww]
    upsample(s, A, h, w)                   -> y [B, C, H, W]
    affinity_aggregate(x, s, h, w, scale)  -> A, num, den          (one pass over x)
    associate(x, s, h, w, scale, n_iter)   -> stokens, A           (the STA module's association
                                                                    stage; s None: avg-pooled x)
    pool(x, h, w)                          -> s                    (the mean of every cell)

and two predicates that say *why* it cannot run: :meth:`Backend.unavailable_reason` (not usable in
this process at all) and :meth:`Backend.decline_reason` (cannot take these tensors). A fused
backend is one kernel family of raw operators (:class:`stvit_kernels._library.Kernels`) wrapped in
the autograd Functions of :mod:`stvit_kernels._library`, entered only when a gradient is needed;
the reference is plain PyTorch, differentiated by autograd. Inputs reach a backend already
validated (shapes, dtypes, devices).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _library as _lib
from . import reference as _ref
from ._library import Kernels, needs_grad

logger = logging.getLogger("stvit_kernels")


class Backend:
    """Base class: a name, two predicates and the primitives."""

    name: str = "?"
    #: Whether the STA module with its attention refine runs as one C++ call on this backend
    #: (``stvit::sta_forward``, SuperTokenAttention._one_step).
    one_step: bool = False
    #: Whether it runs as one autograd node composed of the backend's kernels in Python instead
    #: (:class:`stvit_kernels._library.FamilyStep`, autocast's cast of x included).
    composed_step: bool = False

    def unavailable_reason(self) -> Optional[str]:
        """None if this backend can run in this process, else why not. Probed once, when
        ``stvit_kernels`` is imported (so that ``torch.compile`` traces only a lookup)."""
        if self.name not in _UNAVAILABLE:
            _UNAVAILABLE[self.name] = self._probe()
        return _UNAVAILABLE[self.name]

    def _probe(self) -> Optional[str]:
        return None

    def decline_reason(self, device: torch.device) -> Optional[str]:
        """None if this backend takes tensors of this device, else why not (a backend takes or
        declines a whole device type, whatever the dtype: the kernels take every float dtype)."""
        return None

    def __repr__(self) -> str:
        return f"<stvit_kernels backend {self.name!r}>"


class ReferenceBackend(Backend):
    """Pure PyTorch (:mod:`stvit_kernels.reference`): any device, any floating dtype; plain
    autograd differentiates it. It computes in its inputs' dtype, with autocast off inside (the
    public functions have already cast the inputs as autocast would), like the fused kernels."""

    name = "reference"

    @staticmethod
    def _no_autocast(t: torch.Tensor):
        return torch.autocast(t.device.type, enabled=False)

    def affinity(self, x, s, h, w, scale, softmax=True):
        with self._no_autocast(x):
            return _ref.affinity(x, s, h, w, scale, softmax)

    def aggregate(self, x, A, h, w):
        with self._no_autocast(x):
            return _ref.aggregate(x, A, h, w)

    def upsample(self, s, A, h, w):
        with self._no_autocast(s):
            return _ref.upsample(s, A, h, w)

    def affinity_aggregate(self, x, s, h, w, scale):
        with self._no_autocast(x):
            return _ref.affinity_aggregate(x, s, h, w, scale)

    def pool(self, x, h, w):
        if x.shape[1] == 0:  # avg_pool2d refuses zero channels
            return x.new_empty(x.shape[0], 0, x.shape[2] // h, x.shape[3] // w)
        return F.avg_pool2d(x, (h, w))

    def associate(self, x, s, h, w, scale, n_iter):
        """The official semantics with plain autograd: the association without gradient, then the
        final aggregation from the constant ``A``, divided by the constant ``den``."""
        with self._no_autocast(x):
            with torch.no_grad():
                s = self.pool(x, h, w) if s is None else s.detach()
                for _ in range(n_iter - 1):
                    _, num, den = _ref.affinity_aggregate(x, s, h, w, scale)
                    s = _lib.normalise(num, den)
                A = _ref.affinity(x, s, h, w, scale)
            num, den = _ref.aggregate(x, A, h, w)
            return _lib.normalise(num, den), A


class FusedBackend(Backend):
    """A kernel family (:class:`stvit_kernels._library.Kernels`): the raw operators when no
    gradient is needed, else the autograd Functions of :mod:`stvit_kernels._library`. The raw
    operators take any layout (the C++ ones copy to contiguous NCHW only what their kernels cannot
    read in place, the Triton ones read through the strides)."""

    def kernels(self) -> Kernels:
        raise NotImplementedError

    def affinity(self, x, s, h, w, scale, softmax=True):
        K = self.kernels()
        if needs_grad(x, s):
            return _lib.Affinity.apply(K.name, x, s, h, w, scale, softmax)
        return K.affinity(x, s, h, w, scale, softmax)

    def aggregate(self, x, A, h, w):
        K = self.kernels()
        if needs_grad(x, A):
            return _lib.Aggregate.apply(K.name, x, A, h, w)
        return tuple(K.aggregate(x, A, h, w))

    def upsample(self, s, A, h, w):
        K = self.kernels()
        if needs_grad(s, A):
            return _lib.Upsample.apply(K.name, s, A, h, w)
        return K.upsample(s, A, h, w)

    def affinity_aggregate(self, x, s, h, w, scale):
        K = self.kernels()
        if needs_grad(x, s):
            return _lib.AffinityAggregate.apply(K.name, x, s, h, w, scale)
        return tuple(K.affinity_aggregate(x, s, h, w, scale))

    def pool(self, x, h, w):
        return self.kernels().pool(x, h, w)

    def associate(self, x, s, h, w, scale, n_iter):
        K = self.kernels()
        if needs_grad(x):
            return _lib.Associate.apply(K.name, x, s, h, w, scale, n_iter)
        stokens, A, _ = K.associate(x, s, h, w, scale, n_iter)
        return stokens, A


class CompiledBackend(FusedBackend):
    """The C++/CUDA extension ``stvit_kernels._C``: ops ``torch.ops.stvit.*`` that PyTorch's
    dispatcher routes to the CPU or the CUDA kernels by the tensors' device."""

    one_step = True

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

    def decline_reason(self, device):
        if device.type != self.device_type:
            return f"runs on {self.device_type} tensors only, got a {device.type} tensor"
        return None

    def kernels(self) -> Kernels:
        return _lib.compiled_kernels()


class TritonBackend(FusedBackend):
    """Triton kernels (:mod:`stvit_kernels.triton_kernels`, as the ``stvit::triton_*`` ops): CUDA
    tensors, or CPU tensors when the Triton interpreter is on (``TRITON_INTERPRET=1``, how CI runs
    them)."""

    name = "triton"
    composed_step = True

    def _probe(self) -> Optional[str]:
        # found, not imported: triton is imported by the first kernel call
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if not torch.cuda.is_available() and not _lib.TRITON_INTERPRET:
            return "no CUDA device is available and TRITON_INTERPRET is not set"
        return None

    def decline_reason(self, device):
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _lib.TRITON_INTERPRET:
            return None
        return (f"runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got a {device.type} tensor")

    def kernels(self) -> Kernels:
        return _lib.TRITON


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
            reason = b.unavailable_reason() or b.decline_reason(x.device)
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
        reason = b.unavailable_reason() or b.decline_reason(x.device)
        chosen = name if reason is None else None
        head = f"forced {name!r} on a {x.device.type} {x.dtype} tensor -> " + (
            name if reason is None else f"error ({reason})")
    return "\n".join([head] + lines)


def _resolve_uncached(name: str, device: torch.device) -> Backend:
    if name != "auto":
        b = get_backend(name)
        _require_available(b)
        reason = b.decline_reason(device)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this call: {reason}")
        return b
    for cand in _auto_candidates(device):
        b = _BACKENDS[cand]
        if (b.unavailable_reason() or b.decline_reason(device)) is None:
            return b
    raise AssertionError("unreachable: the reference backend takes every tensor")


#: (name or "auto", device type) -> the backend resolve() returns: availability is probed once at
#: import and a backend takes or declines a whole device type, so the answer never changes.
_RESOLVED: Dict[tuple, Backend] = {}


def resolve(x: torch.Tensor, backend: Optional[str] = None) -> Backend:
    """The backend to run for tensors like ``x``: ``backend`` if given, else the one set by
    :func:`use_backend`, else ``auto``. A forced backend that cannot run raises ``ValueError``
    (never a silent fallback)."""
    name = backend or getattr(_state, "name", "auto")
    if torch.compiler.is_compiling():  # traced once; a cache dict would only add guards
        return _resolve_uncached(name, x.device)
    key = (name, x.device.type)
    b = _RESOLVED.get(key)
    if b is None:
        b = _RESOLVED[key] = _resolve_uncached(name, x.device)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s", explain(x, name))
    return b
