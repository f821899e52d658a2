"""Time the STA ops and the SuperTokenAttention module against the official algorithm, the
reference and dense attention.

What is measured
    ops        ``affinity`` (stoken_affinity), ``aggregate`` (stoken_aggregate), ``upsample``
               (stoken_upsample), ``associate`` (the fused association of the module,
               ``stvit_kernels.associate``), ``affinity_aggregate`` (the backends' fused
               affinity + aggregation primitive alone, forward only: the kernel of the bandwidth
               target) and ``sta`` (the whole ``SuperTokenAttention`` module).
    providers  ``official`` (``sta`` only): the official STViT ``StokenAttention`` algorithm op for
               op with the module's weights (``benchmarks/official.py``: unfold / fold as identity
               convolutions, the matmuls, ``softmax(dim=-2)`` refine), the baseline a user would
               pick instead and the one the headline ratios are against; ``reference`` (our
               pure-PyTorch oracle, written for clarity: about 2x slower than ``official`` on a GPU,
               so ratios against it flatter); ``<provider>+compile`` (``reference+compile``,
               ``official+compile``, ``cuda+compile``, ...: under ``torch.compile``, mode
               ``--compile-mode``; skipped with a note if compiling fails); every fused backend that
               takes the device and dtype (``cpu``, ``cuda``, ``triton``; ``fused`` in
               ``--providers`` means all of them); for ``sta`` also ``dense-sdpa`` (global
               attention over all H*W tokens, ``F.scaled_dot_product_attention``, same dim and
               heads: ``stvit_kernels.RefineAttention`` on the full map) and ``dense-naive``
               (explicit ``softmax(q k^T) v`` that materialises the N x N map; skipped when that map
               would exceed ``--naive-max-gib``).
    modes      ``fwd`` (under ``torch.no_grad``), ``bwd`` (the backward alone, on a retained graph),
               ``fwd+bwd``. Backward seeds are random tensors, never ones or zeros.
    timing     GPU: ``triton.testing.do_bench`` (median, 20/80 % quantiles, warm-up, L2 flushed),
               one provider after the other. CPU: ``torch.utils.benchmark`` (``Timer.timeit``
               blocks of ~50 ms), the providers of a case and mode interleaved round by round so
               that the load of a shared machine weighs on all of them alike (median and quartiles
               of the blocks; at least ``--min-run-time`` s and 3 rounds each). Every timed call
               takes the next input set of a small pool of distinct random inputs (several times
               the last-level cache in total), so caches do not flatter.
    per call   every row: ``ms``, the wall time per call (above) and ``host_ms``, the host's time per
               call. GPU (``--per-call``; the ``sta`` rows and the target shapes by default):
               ``host_ms`` from blocks of calls enqueued with no synchronisation (host seconds / calls);
               ``gpu_ms``, the replay of a CUDA graph of one call (the device's time without host
               overhead; ``gpu_note`` says why a call could not be captured); ``kernels`` per call
               (``torch.profiler``; ``memops``, ``gpu_busy_ms`` beside). CPU: the host does the work,
               so ``host_ms`` is the wall time, and the GPU-only figures are absent.
    memory     GPU: ``peak_bytes``, ``torch.cuda.max_memory_allocated`` during one call minus what
               was allocated before it, per mode. All devices: ``saved_bytes``, the bytes autograd
               saves for the backward in one forward (inputs and parameters not counted), counted
               with ``torch.autograd.graph.saved_tensors_hooks`` (the activation memory of a
               training step; see ``benchmarks/common.py``).
    bandwidth  GPU, op-level rows: bytes that must move / median time (``gbps``), and its fraction
               of the device's copy bandwidth (``bw_frac``; a 1 GiB device-to-device copy measured
               in the same run). Byte model (elements x dtype size; X = B*C*H*W pixels,
               S = B*C*hh*ww super tokens, A = B*9*H*W affinity, D = B*hh*ww normaliser):
                 affinity            fwd: read X + S, write A          bwd: read gA, A, X, S; write dX, dS
                 aggregate           fwd: read X + A, write S + D      bwd: read gS, gD, X, A; write dX, dA
                 upsample            fwd: read S + A, write X          bwd: read gX, S, A; write dS, dA
                 affinity_aggregate  fwd: read X + S, write A + S + D
                 associate           fwd: read X + S, write A + S      bwd: read gS, D, A; write dX
               (``fwd+bwd`` is the sum). Intermediate tensors a fused kernel keeps on chip are not
               counted; that is the point of fusing.
    targets    computed from the measured figures for the device type of the run (``targets`` in
               the JSON: value, threshold, direction, met). CPU: STA fwd+bwd best fused >= 3x
               official and >= 3x reference at STViT-S stage 1 (B=8, C=64, 56x56, 8x8, 1 head) and
               stage 2 (B=8, C=128, 28x28, 4x4, 2 heads); the proxy: the module's forward with the
               ``cpu`` backend <= 0.25x of the baseline's time (``results/cpu_proxy_baseline.json``).
               GPU (per dtype of the run), at B=64 stage 1 and stage 2: STA wall fwd >= 4x and
               fwd+bwd >= 3x official; host time per call fwd <= 0.20 ms and fwd+bwd <= 0.50 ms;
               at stage 1 STA fwd >= 8x and fwd+bwd >= 5x reference; fused affinity+aggregation
               >= 70 % of copy bandwidth; STA fwd >= 3x faster than dense SDPA at 56x56 tokens and
               >= 30x at 128x128 (sweep batch); for information the fwd time at the largest sweep
               size over the smallest (it should grow with the work).
    proxy      host overhead without a GPU (issue 11): ``SuperTokenAttention`` at B=1, C=64, 16x16
               tokens, 8x8 super tokens, 1 head, float32, on one CPU thread, fwd and fwd+bwd, for
               ``cpu``, ``official`` and ``reference``. The work is tiny, so the time is the Python,
               dispatch and per-op cost of a call. ``--record-baseline`` stores today's figures
               with the commit of the library measured (it refuses a library whose sources differ
               from that commit).

Presets
    --quick (default)  ``sta`` fwd and fwd+bwd, reference / official / fused / dense-sdpa at 56², 96²,
                       128² tokens (batch 1), plus the target shapes of the device (reference /
                       official / fused) and, on a CPU, the proxy. A few minutes on a 2-core CPU:
                       ``make bench``.
    --full             every op, provider and mode over the resolution sweep 224²..1024² input
                       (56²..256² tokens; batch 8 on a GPU, 1 on a CPU), plus the target shapes.
    --proxy            the proxy alone (CPU, a few seconds) -> results/cpu_proxy.json.
    --record-baseline  the proxy, stored as the baseline -> results/cpu_proxy_baseline.json.
    Any of --ops, --sides, --batch, --providers, --modes overrides the preset's sweep.

Examples
    python benchmarks/bench_ops.py --quick --plot                 # CPU: results/cpu_ops.json + PNGs
    python benchmarks/bench_ops.py --proxy                        # CPU: results/cpu_proxy.json
    python benchmarks/bench_ops.py --full --device cuda --no-sweep  # GPU: the targets, per-call figures
    python benchmarks/bench_ops.py --full --device cuda --dtype bfloat16 --plot
    python benchmarks/bench_ops.py --ops affinity upsample --sides 56 112 --modes fwd --no-save
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from official import OfficialStokenAttention  # noqa: E402

import stvit_kernels as sk  # noqa: E402
from stvit_kernels.backends import get_backend  # noqa: E402

OPS = ("affinity", "aggregate", "upsample", "associate", "affinity_aggregate", "sta")
MODES = ("fwd", "bwd", "fwd+bwd")
DENSE = ("dense-sdpa", "dense-naive")
#: The official STViT algorithm op for op (benchmarks/official.py), eager and under torch.compile.
OFFICIAL = ("official", "official+compile")
#: Providers that only run the whole module (``sta``).
MODULE_ONLY = DENSE + OFFICIAL
#: Token-grid sides of the sweep: 224, 320, 384, 512, 640, 768, 896, 1024 input pixels / 4.
FULL_SIDES = (56, 80, 96, 128, 160, 192, 224, 256)
QUICK_SIDES = (56, 96, 128)
#: Sweep sizes at which the compiled reference is measured by default (a compile per size and mode).
FULL_COMPILE_SIDES = (56, 128, 256)
#: STViT-S stage 1 / stage 2 (C, side at 224², super-token size, heads).
STAGE1 = dict(dim=64, side=56, stoken=8, heads=1)
STAGE2 = dict(dim=128, side=28, stoken=4, heads=2)
#: The host-overhead proxy that needs no GPU: a tiny module call, one thread (issue 11).
PROXY = dict(dim=64, side=16, stoken=8, heads=1)
PROXY_BATCH, PROXY_THREADS, PROXY_MIN_RUN_TIME = 1, 1, 1.0
PROXY_PROVIDERS = ("cpu", "official", "reference")
#: Today's proxy figures (``--record-baseline``), the yardstick of the proxy target.
PROXY_BASELINE = os.path.join(common.RESULTS_DIR, "cpu_proxy_baseline.json")
#: The proxy measured head-on against the baseline tree (``proxy_ab.py``).
PROXY_AB = os.path.join(common.RESULTS_DIR, "cpu_proxy_ab.json")
#: The proxy target: the module's forward time at most this fraction of the baseline's.
PROXY_TARGET_FRACTION = 0.25


@dataclass(frozen=True)
class Case:
    op: str
    batch: int
    dim: int
    side: int
    stoken: int
    heads: int
    tag: str = "sweep"
    providers: Optional[Tuple[str, ...]] = None   # None: every provider of the run
    modes: Optional[Tuple[str, ...]] = None       # None: every mode of the run
    threads: Optional[int] = None                 # CPU: torch.set_num_threads for this case only
    min_run_time: Optional[float] = None          # CPU: seconds per measurement, unless --min-run-time

    @property
    def tokens(self) -> int:
        return self.side * self.side

    def describe(self) -> str:
        return (f"{self.op} B={self.batch} C={self.dim} {self.side}x{self.side} "
                f"st={self.stoken} heads={self.heads} [{self.tag}]"
                + (f" {common.threads_str(self.threads)}" if self.threads else ""))


# ------------------------------------------------------------------------------------------------
# Byte model (GPU bandwidth)
# ------------------------------------------------------------------------------------------------

def byte_model(case: Case, elt: int) -> Optional[Dict[str, int]]:
    """Bytes a kernel must move for ``fwd`` and ``bwd`` (see the module docstring), or None."""
    B, C, H, st = case.batch, case.dim, case.side, case.stoken
    X = B * C * H * H
    S = B * C * (H // st) ** 2
    A = B * 9 * H * H
    D = B * (H // st) ** 2
    elems = {
        "affinity": (X + S + A, 2 * A + 2 * X + 2 * S),
        "aggregate": (X + A + S + D, S + D + 2 * X + 2 * A),
        "upsample": (S + A + X, X + 2 * S + 2 * A),
        "affinity_aggregate": (X + S + A + S + D, None),
        "associate": (X + S + A + S, S + D + A + X),
    }.get(case.op)
    if elems is None:
        return None
    fwd, bwd = elems
    out = {"fwd": fwd * elt}
    if bwd is not None:
        out["bwd"] = bwd * elt
        out["fwd+bwd"] = (fwd + bwd) * elt
    return out


# ------------------------------------------------------------------------------------------------
# Inputs and the callables of each provider
# ------------------------------------------------------------------------------------------------

def make_inputs(case: Case, device, dtype, seed: int) -> Tuple[torch.Tensor, ...]:
    """One input set of the op: random, realistic (super tokens = pooled pixels, affinity a
    softmax), leaves that require grad where the op has a gradient."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, C, H, st = case.batch, case.dim, case.side, case.stoken

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def leaf(t, grad=True):
        return t.detach().contiguous().requires_grad_(grad)

    x = randn(B, C, H, H)
    if case.op in ("affinity", "associate", "affinity_aggregate"):
        s = F.avg_pool2d(x.float(), st).to(dtype)
        grad = case.op != "affinity_aggregate"
        return leaf(x, grad), leaf(s, case.op == "affinity")
    if case.op == "aggregate":
        return leaf(x), leaf(randn(B, 9, H, H).float().softmax(1).to(dtype))
    if case.op == "upsample":
        return leaf(randn(B, C, H // st, H // st)), leaf(randn(B, 9, H, H).float().softmax(1).to(dtype))
    if case.op == "sta":
        return (leaf(x),)
    raise ValueError(f"unknown op {case.op!r}")


def op_callable(op: str, backend: str, size: Tuple[int, int], scale: float) -> Callable:
    """The op with a fixed backend: ``f(*inputs) -> outputs``."""
    if op == "affinity":
        return lambda x, s: sk.stoken_affinity(x, s, size, backend=backend)
    if op == "aggregate":
        return lambda x, A: sk.stoken_aggregate(x, A, size, backend=backend)
    if op == "upsample":
        return lambda s, A: sk.stoken_upsample(s, A, size, backend=backend)
    if op == "associate":
        return lambda x, s: sk.associate(x, s, size, backend=backend)
    if op == "affinity_aggregate":
        be = get_backend(backend)
        return lambda x, s: be.affinity_aggregate(x, s, size[0], size[1], scale)
    raise ValueError(op)


class NaiveDenseAttention(nn.Module):
    """Global attention written out: ``softmax(q k^T * scale) v`` with the N x N map materialised,
    sharing the ``qkv`` / ``proj`` weights (and the per-head q, k, v channel order) of a
    :class:`stvit_kernels.RefineAttention`."""

    def __init__(self, attn: sk.RefineAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        B, C, H, W = x.shape
        qkv = a.qkv(x).reshape(B, a.num_heads, 3 * (C // a.num_heads), H * W)
        q, k, v = qkv.chunk(3, dim=2)                                   # [B, heads, hd, N]
        scores = (q.transpose(-1, -2) * a.scale) @ k                    # [B, heads, N, N]
        out = v @ scores.softmax(dim=-1).transpose(-1, -2)              # [B, heads, hd, N]
        return a.proj(out.reshape(B, C, H, W))


class Providers:
    """Builds the callable of a provider for a case, caching modules and compiled functions so
    ``torch.compile`` sees the same function across the sweep (automatic dynamic shapes then
    compile a few graphs per op instead of one per size)."""

    def __init__(self, device, dtype, fused: Sequence[str], naive_max_bytes: int,
                 compile_sides: Optional[Sequence[int]] = None, compile_mode: Optional[str] = None):
        self.device, self.dtype, self.fused = device, dtype, list(fused)
        self.compile_mode = compile_mode
        self.naive_max_bytes = naive_max_bytes
        self.compile_sides = set(compile_sides) if compile_sides else None
        self._modules: Dict[Tuple, nn.Module] = {}
        self._compiled: Dict[Tuple, Callable] = {}
        self.compile_failed: Dict[Tuple, str] = {}

    def _sta(self, case: Case) -> sk.SuperTokenAttention:
        key = ("sta", case.dim, case.stoken, case.heads)
        if key not in self._modules:
            torch.manual_seed(0)
            m = sk.SuperTokenAttention(case.dim, case.stoken, num_heads=case.heads, qkv_bias=True)
            self._modules[key] = m.to(self.device, self.dtype)
        return self._modules[key]

    def _official(self, case: Case) -> OfficialStokenAttention:
        """The official algorithm with the weights of the case's SuperTokenAttention."""
        key = ("official", case.dim, case.stoken, case.heads)
        if key not in self._modules:
            self._modules[key] = OfficialStokenAttention.from_module(self._sta(case))
        return self._modules[key]

    def _dense(self, case: Case) -> sk.RefineAttention:
        key = ("dense", case.dim, case.heads)
        if key not in self._modules:
            torch.manual_seed(0)
            m = sk.RefineAttention(case.dim, num_heads=case.heads, qkv_bias=True)
            self._modules[key] = m.to(self.device, self.dtype)
        return self._modules[key]

    @staticmethod
    def compile_key(case: Case, provider: str) -> Tuple:
        base = provider[:-len("+compile")]
        return (base, case.op, case.stoken) if case.op != "sta" else (base, "sta", case.dim, case.stoken,
                                                                     case.heads)

    def build(self, case: Case, provider: str) -> Tuple[Optional[Callable], List[nn.Parameter], Optional[str]]:
        """``(fn, parameters, skip_note)``; ``fn`` is None when the provider does not apply."""
        size = (case.stoken, case.stoken)
        if provider in DENSE:
            if case.op != "sta":
                return None, [], None
            dense = self._dense(case)
            if provider == "dense-sdpa":
                return dense, list(dense.parameters()), None
            elt = torch.finfo(self.dtype).bits // 8
            need = case.batch * case.heads * case.tokens ** 2 * elt
            if need > self.naive_max_bytes:
                return None, [], (f"skipped: the N x N attention map would take {common.fmt_bytes(need)}"
                                  f" > --naive-max-gib {self.naive_max_bytes / (1 << 30):g}")
            return NaiveDenseAttention(dense), list(dense.parameters()), None
        compiled = provider.endswith("+compile")
        base = provider[:-len("+compile")] if compiled else provider
        if base == "official" and case.op != "sta":
            return None, [], None   # the official algorithm is a module, not a set of ops
        if compiled and case.tag == "sweep" and self.compile_sides and case.side not in self.compile_sides:
            return None, [], None   # not compiled at this size (--compile-sides): not measured
        backend = base
        if base == "official":
            fn = self._official(case)
            params = list(fn.parameters())
        elif case.op == "sta":
            m = copy.copy(self._sta(case))   # shallow: same parameters, its own backend attribute
            m.backend = backend
            fn, params = m, list(m.parameters())
        else:
            fn, params = op_callable(case.op, backend, size, case.dim ** -0.5), []
        if compiled:
            key = self.compile_key(case, provider)
            if key in self.compile_failed:
                return None, [], self.compile_failed[key]
            if key not in self._compiled:
                # static shapes: a graph per size (automatic dynamic shapes hit an inductor error on
                # the reference's index arithmetic in torch 2.14)
                self._compiled[key] = _graph_steps(
                    torch.compile(fn, dynamic=False, mode=self.compile_mode), self.compile_mode)
            fn = self._compiled[key]
        return fn, params, None

    def graphed(self, provider: str) -> bool:
        """Whether the provider's calls are CUDA-graph replays already (``+compile`` under
        ``mode="reduce-overhead"``): its wall time is its GPU time, and a capture of it in a graph
        of the benchmark's own would nest CUDA-graph trees' capture in ours."""
        return provider.endswith("compile") and self.compile_mode == "reduce-overhead"


def _graph_steps(fn: Callable, mode: Optional[str]) -> Callable:
    """Under ``mode="reduce-overhead"``: every call starts a new step of CUDA-graph trees
    (``torch.compiler.cudagraph_mark_step_begin``), the documented way for a caller whose calls do
    not follow one forward / backward per iteration (the benchmark interleaves no-grad forwards,
    forward + backward, and discards outputs): without it the trees' warm-up asserted on the H200
    (results/h200-2026-12-04/bench_reduce_overhead.log)."""
    if mode != "reduce-overhead":
        return fn

    def step(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args)
    return step


# ------------------------------------------------------------------------------------------------
# Steps (what one timed call does) per mode
# ------------------------------------------------------------------------------------------------

def _as_tuple(out) -> Tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _diff(outs) -> List[torch.Tensor]:
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def _leaves(inputs) -> List[torch.Tensor]:
    return [t for t in inputs if t.requires_grad]


def make_step(mode: str, fn: Callable, pool: List[Tuple[torch.Tensor, ...]],
              params: List[nn.Parameter], seed: int, out_specs: Sequence[Tuple[torch.Size, torch.dtype]] = ()
              ) -> Tuple[Callable[[], object], Callable[[], None]]:
    """``(step, release)``: ``step()`` runs one call of the mode on the next input set of the pool;
    ``release()`` drops what the step keeps alive (retained graphs). ``out_specs``: shapes and
    dtypes of the outputs that require grad (found with one forward if not given)."""
    if mode == "fwd":
        cyc = common.Cycle(pool)

        def step():
            with torch.no_grad():
                return fn(*cyc.next())
        return step, lambda: None

    # random output gradients (same shapes for every provider), one per input set
    if not out_specs:
        out_specs = [(o.shape, o.dtype) for o in _diff(_as_tuple(fn(*pool[0])))]
    if not out_specs:
        raise RuntimeError("no output requires grad: nothing to backpropagate")
    g = torch.Generator(device="cpu").manual_seed(seed)
    device = pool[0][0].device
    grads = [[torch.randn(shape, generator=g).to(device, dtype) for shape, dtype in out_specs]
             for _ in pool]

    def zero_grads(inputs):
        for t in _leaves(inputs):
            t.grad = None
        for p in params:
            p.grad = None

    if mode == "fwd+bwd":
        cyc = common.Cycle(list(zip(pool, grads)))

        def step():
            inputs, gs = cyc.next()
            zero_grads(inputs)
            torch.autograd.backward(_diff(_as_tuple(fn(*inputs))), gs)
        return step, lambda: None

    if mode == "bwd":
        graphs = [(inputs, _diff(_as_tuple(fn(*inputs))), gs) for inputs, gs in zip(pool, grads)]
        cyc = common.Cycle(graphs)

        def step():
            inputs, outs, gs = cyc.next()
            zero_grads(inputs)
            torch.autograd.backward(outs, gs, retain_graph=True)
        return step, graphs.clear
    raise ValueError(mode)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def _default_batch(args, device) -> int:
    return args.batch if args.batch is not None else (8 if device.type == "cuda" else 1)


def proxy_case() -> Case:
    """The host-overhead proxy (CPU, one thread): ``cpu`` backend, official algorithm, reference."""
    return Case("sta", PROXY_BATCH, tag="proxy", providers=PROXY_PROVIDERS, modes=("fwd", "fwd+bwd"),
                threads=PROXY_THREADS, min_run_time=PROXY_MIN_RUN_TIME, **PROXY)


def target_cases(device, preset: str, fused_names: Sequence[str]) -> List[Case]:
    """The shapes of the targets of this device type (CPU: with the proxy)."""
    cmp = ("reference", "reference+compile") + OFFICIAL + tuple(fused_names) + \
        tuple(f + "+compile" for f in fused_names)
    if device.type == "cuda":
        return [Case("sta", 64, tag="stage1-b64", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE1),
                Case("sta", 64, tag="stage2-b64", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE2),
                Case("affinity_aggregate", 64, tag="stage1-b64", providers=cmp, modes=("fwd",), **STAGE1),
                Case("associate", 64, tag="stage1-b64", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE1)]
    return [Case("sta", 8, tag="stage1-b8", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE1),
            Case("sta", 8, tag="stage2-b8", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE2),
            proxy_case()]


def build_cases(args, device, fused_names) -> List[Case]:
    if args.preset == "proxy":
        return [proxy_case()]
    quick = args.preset == "quick"
    ops = args.ops or (["sta"] if quick else list(OPS))
    sides = args.sides or (QUICK_SIDES if quick else FULL_SIDES)
    batch = _default_batch(args, device)
    cases = [] if args.no_sweep else [Case(op, batch, args.dim, side, args.stoken, args.heads)
                                      for op in ops for side in sides]
    if not args.no_targets:   # --ops narrows the target shapes too
        cases += [c for c in target_cases(device, args.preset, fused_names) if not args.ops or c.op in args.ops]
    return cases


def resolve_providers(args, fused_names) -> List[str]:
    if args.providers:
        names = []
        for p in args.providers:
            names += (fused_names if p == "fused" else [f + "+compile" for f in fused_names]
                      if p == "fused+compile" else [p])
        return list(dict.fromkeys(names))
    if args.preset == "proxy":
        return ["reference", "official"] + [p for p in fused_names if p in PROXY_PROVIDERS]
    if args.preset == "quick":
        return ["reference", "official"] + list(fused_names) + ["dense-sdpa"]
    return ["reference", "reference+compile", "official"] + list(fused_names) + list(DENSE)


def run_case(case: Case, providers: Sequence[str], modes: Sequence[str], prov: Providers,
             args, device, dtype, copy_gbps: Optional[float]) -> List[Dict]:
    """The rows of one case: every provider that applies, every mode; the case's thread count
    (CPU) holds while it runs."""
    before = torch.get_num_threads()
    if case.threads and device.type == "cpu":
        torch.set_num_threads(case.threads)
    try:
        return _run_case(case, providers, modes, prov, args, device, dtype, copy_gbps)
    finally:
        torch.set_num_threads(before)


def _per_call_wanted(case: Case, args) -> bool:
    """GPU: whether the rows of this case get host time, CUDA-graph time and kernel counts."""
    return args.per_call == "all" or (args.per_call == "sta" and (case.op == "sta" or case.tag != "sweep"))


def _run_case(case: Case, providers: Sequence[str], modes: Sequence[str], prov: Providers,
              args, device, dtype, copy_gbps: Optional[float]) -> List[Dict]:
    rows = []
    min_run_time = args.min_run_time if args.min_run_time is not None else (case.min_run_time or 0.3)
    elt = torch.finfo(dtype).bits // 8
    probe = make_inputs(case, device, dtype, seed=0)
    set_bytes = sum(t.numel() * t.element_size() for t in probe)
    del probe
    n_pool = common.pool_size(set_bytes, device)
    pool = [make_inputs(case, device, dtype, seed=1 + i) for i in range(n_pool)]
    bm = byte_model(case, elt)
    case_providers = [p for p in providers if case.providers is None or p in case.providers]
    case_modes = [m for m in modes if case.modes is None or m in case.modes]
    if case.op == "affinity_aggregate":
        case_modes = [m for m in case_modes if m == "fwd"]
    base = dict(op=case.op, tag=case.tag, batch=case.batch, dim=case.dim, side=case.side,
                tokens=case.tokens, stoken=case.stoken, heads=case.heads, dtype=str(dtype).split(".")[-1],
                pool=n_pool, threads=torch.get_num_threads() if device.type == "cpu" else None)
    print(f"\n{case.describe()}  (pool of {n_pool} input sets)", file=sys.stderr)

    # 1. build every provider, warm it up (torch.compile compiles here, untimed), count saved bytes
    ready: Dict[str, Tuple[Callable, List[nn.Parameter], Optional[int], List]] = {}
    for provider in case_providers:
        fn, params, note = prov.build(case, provider)
        if fn is None and note is None:
            continue  # does not apply (dense attention at op level)
        if fn is None:
            for mode in case_modes:
                rows.append(dict(base, provider=provider, mode=mode, status="skipped", note=note))
            print(f"  {provider:18s} {note}", file=sys.stderr)
            continue
        # warm-up (torch.compile compiles here, untimed): one forward + backward, during which the
        # bytes saved for backward are counted; compiled providers also build their no-grad graph
        out_specs, saved = [], None
        try:
            compiled = provider.endswith("compile")
            if not any(m != "fwd" for m in case_modes):
                with torch.no_grad():
                    fn(*pool[0])
            else:
                box = []
                if compiled:   # compile without hooks first; count the saved bytes afterwards
                    box.append(fn(*pool[0]))
                else:
                    saved = common.saved_bytes(lambda: box.append(fn(*pool[0])), exclude=list(pool[0]) + params)
                outs = _diff(_as_tuple(box.pop()))
                out_specs = [(o.shape, o.dtype) for o in outs]
                if outs:
                    sum(o.float().sum() for o in outs).backward()
                del outs
                if compiled:   # the no-grad graph after the training one, as tests/test_cuda_graphs.py
                    with torch.no_grad():
                        fn(*pool[0])
                # not under CUDA graphs: a recorded forward whose backward never runs, inside
                # saved-tensor hooks, is where cuda+compile failed with mode="reduce-overhead" on
                # the H200 (CUDA-graph trees' assertion; results/h200-2026-12-04/
                # bench_reduce_overhead.log)
                if compiled and not prov.graphed(provider):
                    try:
                        saved = common.saved_bytes(lambda: fn(*pool[0]), exclude=list(pool[0]) + params)
                    except Exception as e:  # noqa: BLE001
                        print(f"  {provider:18s} saved_bytes failed: {_failure_note(e, provider)}",
                              file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            note = _failure_note(e, provider)
            if provider.endswith("+compile"):
                prov.compile_failed[prov.compile_key(case, provider)] = note
            status = "skipped" if _is_oom(e) or provider.endswith("compile") else "error"
            for mode in case_modes:
                rows.append(dict(base, provider=provider, mode=mode, status=status, note=note))
            print(f"  {provider:18s} {note}", file=sys.stderr)
            if provider.endswith("compile"):  # inductor's failures need their frames to be read
                _print_frames(e)
            _free(device)
            continue
        _zero_grads(pool, params)
        ready[provider] = (fn, params, saved, out_specs)

    # 2. time each mode: GPU one provider after the other (do_bench), CPU interleaved rounds
    for mode in case_modes:
        mode_rows: Dict[str, Dict] = {}
        steps: Dict[str, Callable] = {}
        releases: List[Callable] = []

        def fail(provider, e):
            status = "skipped" if _is_oom(e) or provider.endswith("compile") else "error"
            mode_rows[provider].update(status=status, note=_failure_note(e, provider))
            print(f"  {provider:18s} {mode:8s} {mode_rows[provider]['note']}", file=sys.stderr)
            if status == "error" or provider.endswith("compile"):
                _print_frames(e)

        for provider, (fn, params, saved, out_specs) in ready.items():
            mode_rows[provider] = dict(base, provider=provider, mode=mode, saved_bytes=saved)
            if device.type == "cuda":
                release = None
                try:
                    step, release = make_step(mode, fn, pool, params, 1234, out_specs)
                    mode_rows[provider].update(common.time_call(step, device, min_run_time))
                    mode_rows[provider]["peak_bytes"] = common.cuda_peak_bytes(step, device)
                    mode_rows[provider]["status"] = "ok"
                    if _per_call_wanted(case, args):
                        # host time, CUDA-graph replay, kernels per call; each part guarded on its own
                        _zero_grads(pool, params)
                        graphed = prov.graphed(provider)
                        mode_rows[provider].update(common.gpu_per_call(
                            step, device, graphable=mode != "bwd" and not graphed,
                            launches_hint=30 if mode == "fwd" else 60,
                            not_graphable_note="a CUDA-graph replay already (reduce-overhead): its "
                                               "wall time is its GPU time" if graphed else
                                               "bwd replays a graph recorded before the capture: "
                                               "see the fwd+bwd row"))
                except Exception as e:  # noqa: BLE001
                    fail(provider, e)
                finally:
                    if release is not None:
                        release()
                    _zero_grads(pool, params)
                    _free(device)
            else:
                try:
                    steps[provider], release = make_step(mode, fn, pool, params, 1234, out_specs)
                    releases.append(release)
                except Exception as e:  # noqa: BLE001
                    fail(provider, e)
        if steps:
            try:
                timings, errors = common.time_interleaved(steps, min_run_time,
                                                          block_s=min(0.05, min_run_time / 3))
                for provider, t in timings.items():
                    # on a CPU the host does the work: host time per call is the wall time
                    mode_rows[provider].update(t, status="ok", host_ms=t["ms"])
                for provider, e in errors.items():
                    fail(provider, e)
            finally:
                for release in releases:
                    release()
                steps.clear()
                for _, params, _, _ in ready.values():
                    _zero_grads(pool, params)
        for provider, row in mode_rows.items():
            if row.get("status") == "ok":
                if bm is not None and mode in bm and device.type == "cuda":
                    row["bytes_model"] = bm[mode]
                    row["gbps"] = bm[mode] / (row["ms"] * 1e-3) / 1e9
                    if copy_gbps:
                        row["bw_frac"] = row["gbps"] / copy_gbps
                print(f"  {provider:18s} {mode:8s} {common.fmt_ms(row['ms']):>9s} ms"
                      + (f"  peak {common.fmt_bytes(row.get('peak_bytes'))}" if "peak_bytes" in row else "")
                      + (f"  {row['gbps']:.0f} GB/s" if "gbps" in row else "")
                      + (f"  host {common.fmt_ms(row['host_ms'])}" if device.type == "cuda" and "host_ms" in row
                         else "")
                      + (f"  graph {common.fmt_ms(row['gpu_ms'])}" if "gpu_ms" in row else "")
                      + (f"  kernels {row['kernels']:g}" if "kernels" in row else "")
                      + "".join(f"  [{k}: {row[k]}]" for k in ("kernels_note", "host_note", "gpu_note")
                                if k in row), file=sys.stderr)
            rows.append(row)
    ready.clear()
    del pool
    _free(device)
    return rows


def _zero_grads(pool, params) -> None:
    for inputs in pool:
        for t in _leaves(inputs):
            t.grad = None
    for p in params:
        p.grad = None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _failure_note(e: BaseException, provider: str) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    what = "out of memory" if _is_oom(e) else ("torch.compile failed" if provider.endswith("compile")
                                               else "failed")
    return f"{what}: {type(e).__name__}: {msg[:300]}"


def _print_frames(e: BaseException) -> None:
    """A failure's innermost frames, to stderr (where inductor raised, not only what)."""
    traceback.print_exception(type(e), e, e.__traceback__, limit=-12, file=sys.stderr)


def _free(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Targets, computed from the rows
# ------------------------------------------------------------------------------------------------

def _ok(rows, **match) -> List[Dict]:
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]


def _best(rows, providers) -> Optional[Dict]:
    cand = [r for r in rows if r["provider"] in providers]
    return min(cand, key=lambda r: r["ms"]) if cand else None


def _target(name, threshold, value, details, unit="x", direction=">=", note=None) -> Dict:
    """A target row: met when ``value >= threshold`` (speed-ups, bandwidth) or, with
    ``direction="<="``, when ``value <= threshold`` (times)."""
    met = None if value is None or threshold is None else bool(
        value >= threshold if direction == ">=" else value <= threshold)
    return dict(name=name, threshold=threshold, value=value, unit=unit, direction=direction, met=met,
                details=details,
                note=note if note or value is not None else "not measured in this run (case missing or failed)")


def _speedup(rows, slow: Sequence[str], fast: Sequence[str], **match):
    sel = _ok(rows, **match)
    a, b = _best(sel, slow), _best(sel, fast)
    if a is None or b is None:
        return None, {}
    return a["ms"] / b["ms"], dict(slow=a["provider"], slow_ms=a["ms"], fast=b["provider"], fast_ms=b["ms"])


def _threads_of(rows, **match) -> int:
    sel = _ok(rows, **match)
    return (sel[0].get("threads") if sel else None) or torch.get_num_threads()


def load_proxy_baseline(path: str = PROXY_BASELINE) -> Optional[Dict]:
    """The ``baseline`` entry of the proxy's baseline file (``--record-baseline``), or None."""
    try:
        with open(path) as f:
            return json.load(f).get("baseline")
    except (OSError, ValueError):
        return None


def proxy_baseline_summary(rows: List[Dict], meta: Dict) -> Dict:
    """What later runs compare with: the proxy's median ms per provider and mode, and the commit of
    the library that made them."""
    ms: Dict[str, Dict[str, float]] = {}
    for r in _ok(rows, op="sta", tag="proxy"):
        ms.setdefault(r["provider"], {})[r["mode"]] = r["ms"]
    return dict(
        what=(f"host-overhead proxy: SuperTokenAttention B={PROXY_BATCH}, C={PROXY['dim']}, "
              f"{PROXY['side']}x{PROXY['side']} tokens, {PROXY['stoken']}x{PROXY['stoken']} super tokens, "
              f"{PROXY['heads']} head, {common.threads_str(PROXY_THREADS)}, float32; median ms per call"),
        commit=meta.get("stvit_kernels_commit"), library_dirty=meta.get("stvit_kernels_dirty"),
        library_path=meta.get("stvit_kernels_path"), device=meta.get("device"), torch=meta.get("torch"),
        date=meta.get("date"), command=meta.get("command"), ms=ms)


def proxy_targets(rows: List[Dict], baseline: Optional[Dict], dt: str = "float32") -> List[Dict]:
    """The proxy targets: the module's forward time with the ``cpu`` backend <= 0.25x of the
    baseline's, in ms; and the same load-normalised: the forward's time over the official
    algorithm's time in the same run (which the library's changes do not touch), as a fraction of
    that ratio in the baseline. A shared machine's load moves the ms figure by 2x from run to run;
    the normalised one holds within ~10 %. fwd+bwd for information."""
    what = (f"B={PROXY_BATCH}, C={PROXY['dim']}, {PROXY['side']}x{PROXY['side']}, "
            f"{PROXY['stoken']}x{PROXY['stoken']}, {PROXY['heads']} head, {dt}")
    name = f"cpu ({common.threads_str(PROXY_THREADS)}): proxy STA"
    base_ms = (baseline or {}).get("ms", {})
    commit = (baseline or {}).get("commit")
    out = []

    def cell(provider, mode):
        sel = _ok(rows, op="sta", tag="proxy", provider=provider, mode=mode, dtype=dt)
        return sel[0]["ms"] if sel else None

    for mode, thr_frac in (("fwd", PROXY_TARGET_FRACTION), ("fwd+bwd", None)):
        now, base = cell("cpu", mode), base_ms.get("cpu", {}).get(mode)
        thr = None if base is None or thr_frac is None else thr_frac * base
        d = dict(provider="cpu", ms=now, baseline_ms=base, baseline_commit=commit,
                 fraction_of_baseline=None if now is None or base is None else now / base)
        label = (f"<= {thr_frac:g}x of {common.fmt_ms(base)} ms at {commit[:10] if commit else '?'}"
                 if base is not None and thr_frac else "for information")
        out.append(_target(f"{name} {mode}, cpu backend, ms ({what}); {label}", thr, now, d, unit="ms",
                           direction="<=",
                           note=None if base is not None else f"no baseline ({os.path.relpath(PROXY_BASELINE)})"))
    now_c, now_o = cell("cpu", "fwd"), cell("official", "fwd")
    base_c, base_o = base_ms.get("cpu", {}).get("fwd"), base_ms.get("official", {}).get("fwd")
    v = None
    if None not in (now_c, now_o, base_c, base_o):
        v = (now_c / now_o) / (base_c / base_o)
    out.append(_target(f"{name} fwd, cpu backend, load-normalised: (time / official's time in the same run) "
                       f"as a fraction of the baseline's ({what})",
                       None if base_c is None or base_o is None else PROXY_TARGET_FRACTION, v,
                       dict(now_cpu_ms=now_c, now_official_ms=now_o, baseline_cpu_ms=base_c,
                            baseline_official_ms=base_o, baseline_commit=commit), unit="x", direction="<="))
    out.append(proxy_ab_target(commit, what, name, measured=now_c is not None))
    return out


def proxy_ab_target(commit: Optional[str], what: str, name: str, path: str = PROXY_AB,
                    measured: bool = True) -> Dict:
    """The proxy forward head-on: this tree's time over the baseline tree's, the two run in turns
    in the same minutes (``proxy_ab.py``; read from its JSON, not from this run). Listed with a
    value only in runs that measure the proxy (``measured``)."""
    label = (f"{name} fwd, cpu backend, head-on: time / the baseline tree's in the same run "
             f"(benchmarks/proxy_ab.py -> {os.path.relpath(path, common.REPO_ROOT)}; {what})")
    if not measured:
        return _target(label, PROXY_TARGET_FRACTION, None, {}, unit="x", direction="<=")
    try:
        with open(path) as f:
            ab = json.load(f)
    except (OSError, ValueError):
        return _target(label, PROXY_TARGET_FRACTION, None, {}, unit="x", direction="<=",
                       note="no proxy_ab.py result")
    trees = ab["meta"].get("trees", {})
    if commit is None or trees.get("a", {}).get("commit") != commit:
        return _target(label, PROXY_TARGET_FRACTION, None, dict(trees=trees), unit="x", direction="<=",
                       note=f"proxy_ab.py's tree A is not the baseline commit {commit}")
    r = ab["results"]["fwd"]
    return _target(label, PROXY_TARGET_FRACTION, r["ratio"],
                   dict(quartiles=[r["ratio_q1"], r["ratio_q3"]], turns=r["turns"],
                        baseline_ms=r["a_ms"], ms=r["b_ms"], trees=trees, date=ab["meta"].get("date"),
                        command=ab["meta"].get("command")), unit="x", direction="<=")


def evaluate_targets(rows: List[Dict], device, dtype, fused_names: Sequence[str],
                     proxy_baseline: Optional[Dict] = None) -> List[Dict]:
    """The issues' targets for this device type, computed from the measured rows. Entries with
    ``threshold: null`` are reported for information. The headline ratios are against the official
    algorithm (``official``); those against our ``reference`` are kept."""
    dt = str(dtype).split(".")[-1]
    fused = list(fused_names)
    out = []
    if device.type == "cpu":
        for tag, what in (("stage1-b8", "stage 1 (B=8, C=64, 56x56, 8x8, 1 head)"),
                          ("stage2-b8", "stage 2 (B=8, C=128, 28x28, 4x4, 2 heads)")):
            cpu = f"cpu ({common.threads_str(_threads_of(rows, op='sta', tag=tag))})"
            for slow in ("official", "reference"):
                for mode, thr in (("fwd+bwd", 3.0), ("fwd", None)):
                    v, d = _speedup(rows, [slow], fused, op="sta", tag=tag, mode=mode, dtype=dt)
                    out.append(_target(f"{cpu}: STA {mode}, best fused / {slow}, STViT-S {what}, {dt}",
                                       thr, v, d))
        out += proxy_targets(rows, proxy_baseline, dt)
        return out
    for tag, stage in (("stage1-b64", "stage 1"), ("stage2-b64", "stage 2")):
        for mode, thr in (("fwd", 4.0), ("fwd+bwd", 3.0)):
            v, d = _speedup(rows, ["official"], fused, op="sta", tag=tag, mode=mode, dtype=dt)
            out.append(_target(f"gpu: STA {mode} wall, best fused / official, B=64 STViT-S {stage}, {dt}",
                               thr, v, d))
        for mode, thr in (("fwd", 0.20), ("fwd+bwd", 0.50)):
            sel = [r for r in _ok(rows, op="sta", tag=tag, mode=mode, dtype=dt)
                   if r["provider"] in fused and r.get("host_ms") is not None]
            b = min(sel, key=lambda r: r["host_ms"]) if sel else None
            d = dict(provider=b["provider"], host_ms=b["host_ms"], wall_ms=b["ms"], gpu_ms=b.get("gpu_ms"),
                     kernels=b.get("kernels")) if b else {}
            off = _ok(rows, op="sta", tag=tag, mode=mode, dtype=dt, provider="official")
            if off:
                d["official_host_ms"] = off[0].get("host_ms")
            out.append(_target(f"gpu: STA {mode} host time per call, best fused, B=64 STViT-S {stage}, {dt}",
                               thr, b["host_ms"] if b else None, d, unit="ms", direction="<="))
    for mode, thr in (("fwd", 8.0), ("fwd+bwd", 5.0)):
        v, d = _speedup(rows, ["reference"], fused, op="sta", tag="stage1-b64", mode=mode, dtype=dt)
        out.append(_target(f"gpu: STA {mode}, best fused / reference, B=64 STViT-S stage 1, {dt}", thr, v, d))
    for op, thr in (("affinity_aggregate", 0.70), ("associate", None)):
        sel = _ok(rows, op=op, tag="stage1-b64", mode="fwd", dtype=dt)
        b = _best(sel, fused)
        v = b.get("bw_frac") if b else None
        d = dict(provider=b["provider"], ms=b["ms"], gbps=b.get("gbps"), bytes=b.get("bytes_model")) if b else {}
        out.append(_target(f"gpu: fused {op} fwd bandwidth / copy bandwidth, B=64 stage 1, {dt}",
                           thr, v, d, unit="fraction"))
    sweep = _ok(rows, op="sta", tag="sweep", mode="fwd", dtype=dt)
    sides = sorted({r["side"] for r in sweep})
    if len(sides) >= 2:
        lo, hi = sides[0], sides[-1]
        a = _best([r for r in sweep if r["side"] == lo], fused)
        b = _best([r for r in sweep if r["side"] == hi and a and r["provider"] == a["provider"]], fused)
        v = b["ms"] / a["ms"] if a and b else None
        out.append(_target(f"gpu: STA fwd time at {hi}x{hi} / at {lo}x{lo} tokens (B={sweep[0]['batch']}), "
                           f"{a['provider'] if a else 'best fused'}; the work grows {hi * hi / (lo * lo):.1f}x, "
                           f"{dt}", None, v, dict(provider=a["provider"] if a else None,
                                                  ms_lo=a["ms"] if a else None, ms_hi=b["ms"] if b else None,
                                                  work_ratio=hi * hi / (lo * lo))))
    for side, thr in ((56, 3.0), (128, 30.0)):
        for mode, t in (("fwd", thr), ("fwd+bwd", None)):
            sel = _ok(rows, op="sta", tag="sweep", side=side, mode=mode, dtype=dt)
            v, d = _speedup(sel, ["dense-sdpa"], fused or ["reference"])
            batch = sel[0]["batch"] if sel else None
            out.append(_target(f"gpu: STA {mode} vs dense SDPA at {side}x{side} tokens "
                               f"(B={batch}, C={sel[0]['dim'] if sel else '?'}), {dt}", t, v, d))
    return out


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------

def _ratio(slow: Optional[Dict], fast: Optional[Dict]) -> str:
    return "-" if slow is None or fast is None else f"{slow['ms'] / fast['ms']:.1f}x"


def print_table(rows: List[Dict], targets: List[Dict], meta: Dict, copy_bw: Optional[Dict],
                fused_names: Sequence[str], file=sys.stdout) -> None:
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"\nSTA benchmark on {meta['device']} ({common.threads_str(meta['threads'])}), torch {meta['torch']}, "
      f"{rows[0]['dtype'] if rows else ''}; times in ms (median)")
    busy = common.busy_warning(meta)
    if busy:
        p(busy)
    if copy_bw:
        p(f"copy bandwidth: {copy_bw['gbps']:.0f} GB/s")
    groups = list(dict.fromkeys((r["op"], r["tag"]) for r in rows))
    for op, tag in groups:
        sel = [r for r in rows if r["op"] == op and r["tag"] == tag]
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        fused = [x for x in providers if x in fused_names]
        extra = []
        if fused and "official" in providers:
            extra.append("off/fused")
        if fused and "reference" in providers:
            extra.append("ref/fused")
        if "dense-sdpa" in providers:
            extra.append("sdpa/STA")
        if any("bw_frac" in r for r in sel):
            extra.append("fused BW")
        r0 = sel[0]
        threads = f" {common.threads_str(r0['threads'])}" if r0.get("threads") else ""
        p(f"\n{op} [{tag}]  B={r0['batch']} C={r0['dim']} stoken={r0['stoken']} heads={r0['heads']}{threads}")
        head = f"{'tokens':>9s} {'mode':8s}" + "".join(f"{x:>18s}" for x in providers) + \
            "".join(f"{x:>11s}" for x in extra)
        p(head)
        keys = list(dict.fromkeys((r["side"], r["mode"]) for r in sel))
        for side, mode in keys:
            cells = {r["provider"]: r for r in sel if r["side"] == side and r["mode"] == mode}
            line = f"{f'{side}x{side}':>9s} {mode:8s}"
            for x in providers:
                r = cells.get(x)
                cell = common.fmt_ms(r["ms"]) if r and r.get("status") == "ok" else (r or {}).get("status", "-")
                line += f"{cell:>18s}"
            ok = {k: v for k, v in cells.items() if v.get("status") == "ok"}
            bf = _best(list(ok.values()), fused)
            bs = _best(list(ok.values()), fused or ["reference"])
            if "off/fused" in extra:
                line += f"{_ratio(ok.get('official'), bf):>11s}"
            if "ref/fused" in extra:
                line += f"{_ratio(ok.get('reference'), bf):>11s}"
            if "sdpa/STA" in extra:
                line += f"{_ratio(ok.get('dense-sdpa'), bs):>11s}"
            if "fused BW" in extra:
                frac = bf.get("bw_frac") if bf else None
                line += f"{('-' if frac is None else f'{100 * frac:.0f}%'):>11s}"
            p(line)
        per_call = [r for r in sel if r.get("status") == "ok" and any(
            k in r for k in ("gpu_ms", "kernels", "gpu_note", "kernels_note")) or "host_note" in r]
        if per_call:
            p(f"{'':9s} per call: {'provider':18s} {'mode':8s} {'wall':>8s} {'host':>8s} {'graph':>8s} "
              f"{'kernels':>8s}")
            for r in per_call:
                kernels = "-" if r.get("kernels") is None else f"{r['kernels']:g}"
                tokens = f"{r['side']}x{r['side']}"
                p(f"{tokens:>9s} {'':9s} {r['provider']:18s} {r['mode']:8s} {common.fmt_ms(r['ms']):>8s} "
                  f"{common.fmt_ms(r.get('host_ms')):>8s} {common.fmt_ms(r.get('gpu_ms')):>8s} {kernels:>8s}")
    notes = sorted({f"{r['provider']}: {r['note']}" for r in rows if r.get("note")}
                   | {f"{r['provider']} {r['mode']}: {r[k]}" for r in rows
                      for k in ("gpu_note", "host_note", "kernels_note") if r.get(k)})
    if notes:
        p("\nnotes:")
        for n in notes:
            p(f"  {n}")
    if targets:
        p("\ntargets:")
        for t in targets:
            val, thr = common.target_strings(t, ascii_only=True)
            thr = "" if t["threshold"] is None else f" (target {thr})"
            verdict = {True: "MET", False: "NOT MET", None: "info" if t["threshold"] is None else "?"}[t["met"]]
            p(f"  [{verdict:7s}] {t['name']}: {val}{thr}")


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

PER_CALL_DOC_GPU = dict(
    ms="wall time per call: triton.testing.do_bench median (CUDA events, L2 flushed before each call)",
    host_ms=("host time per call: blocks of N calls enqueued with no synchronisation between them "
             "(N keeps a block under ~500 launches), host seconds / N; median of 21 blocks"),
    gpu_ms=("GPU time per call: one call captured into a CUDA graph (after 3 warm-up calls on a side "
            "stream), the replay timed with do_bench; gpu_note says why a call could not be captured"),
    kernels="kernel launches per call, torch.profiler over 3 warm calls (memops: memcpy/memset apart)",
    gpu_busy_ms="the profiled kernels' summed device time per call",
    rows="--per-call: sta rows and target shapes by default")
PER_CALL_DOC_CPU = dict(
    ms="wall time per call (see timing)",
    host_ms="equal to the wall time: on a CPU the host does the work itself",
    gpu_ms="GPU only (CUDA-graph replay): not measured on a CPU",
    kernels="GPU only (torch.profiler): not measured on a CPU")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="the make-bench preset (default)")
    g.add_argument("--full", dest="preset", action="store_const", const="full",
                   help="every op, provider and mode over the 56..256 token sweep")
    g.add_argument("--proxy", dest="preset", action="store_const", const="proxy",
                   help="only the host-overhead proxy (CPU, 1 thread, a few seconds): "
                        "-> results/cpu_proxy.json, target against results/cpu_proxy_baseline.json")
    g.add_argument("--record-baseline", dest="preset", action="store_const", const="baseline",
                   help="measure the proxy and store it as the baseline of the proxy target "
                        "(results/cpu_proxy_baseline.json); refuses when the imported library's "
                        "sources differ from their commit")
    p.set_defaults(preset="quick")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available; the proxy: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ops", nargs="+", choices=OPS, default=None, help="ops of the sweep")
    p.add_argument("--sides", nargs="+", type=int, default=None,
                   help="token-grid sides of the sweep (input resolution / 4), multiples of --stoken")
    p.add_argument("--batch", type=int, default=None, help="sweep batch (default: 8 on a GPU, 1 on a CPU)")
    p.add_argument("--dim", type=int, default=STAGE1["dim"])
    p.add_argument("--heads", type=int, default=STAGE1["heads"])
    p.add_argument("--stoken", type=int, default=STAGE1["stoken"])
    p.add_argument("--providers", nargs="+", default=None,
                   help="official, reference, fused (= every fused backend), cpu, cuda, triton, "
                        "dense-sdpa, dense-naive, and <any of them but dense>+compile, e.g. "
                        "reference+compile, official+compile (default: by preset)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="default: fwd fwd+bwd (quick), all three (full)")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="torch.compile mode of the <provider>+compile providers (reference+compile, "
                        "official+compile, cuda+compile, ...)")
    p.add_argument("--inductor-layout-opt", choices=("off", "auto"), default="off",
                   help="inductor's layout optimisation (channels-last convolutions) for the +compile "
                        "providers: off (default; torch 2.11's inductor asserted on cuDNN's strides "
                        "of the official algorithm's identity-kernel convolution_backward on the "
                        "H200, results/h200-2026-12-04/bench_reduce_overhead.log; the same setting "
                        "for every provider) or auto (inductor's own choice)")
    p.add_argument("--compile-sides", nargs="+", type=int, default=None,
                   help="sweep sides at which the +compile providers run (default: 56 128 256 with the "
                        "preset's sides, every side given with --sides); target shapes always")
    p.add_argument("--no-targets", action="store_true", help="leave out the target shapes (and the CPU proxy)")
    p.add_argument("--no-sweep", action="store_true", help="only the target shapes")
    p.add_argument("--naive-max-gib", type=float, default=None,
                   help="skip dense-naive when its N x N map exceeds this (default: 4 GPU, 0.5 CPU)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help=f"CPU: seconds per measurement (default 0.3; the proxy {PROXY_MIN_RUN_TIME:g})")
    p.add_argument("--per-call", choices=("sta", "all", "none"), default="sta",
                   help="GPU: which rows get host time, CUDA-graph time and kernels per call: the module "
                        "(sta) and target-shape rows (default), every row, or none")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/<device kind>_ops[_<dtype>].json)")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing JSON of the same device and dtype (rows measured again "
                        "replace the old ones; targets are recomputed over all rows): a long GPU sweep "
                        "can run in several commands")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--plot", action="store_true", help="also draw the PNGs next to the JSON (plot.py)")
    return p.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    baseline_run = args.preset == "baseline"
    if baseline_run:
        args.preset = "proxy"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and args.preset != "proxy" else "cpu"
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.preset == "proxy" and (device.type != "cpu" or dtype != torch.float32):
        raise SystemExit("the proxy is a CPU float32 measurement: --device cpu --dtype float32")
    if args.preset == "proxy" and args.threads is None:
        args.threads = PROXY_THREADS   # the run's metadata then says what the proxy measured
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.inductor_layout_opt == "off":
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False
    for name in ("recompile_limit", "cache_size_limit"):   # one compiled function serves a sweep
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    # The bwd mode replays a retained graph (backward(retain_graph=True)), which a compiled backward
    # with donated buffers (a memory optimisation of AOTAutograd) refuses: turn them off.
    try:
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except ImportError:
        pass
    if args.sides:
        bad = [s for s in args.sides if s % args.stoken]
        if bad:
            raise SystemExit(f"--sides must be multiples of --stoken {args.stoken}, got {bad}")
    if args.modes is None:
        args.modes = ["fwd", "fwd+bwd"] if args.preset == "quick" else list(MODES)
    naive_gib = args.naive_max_gib if args.naive_max_gib is not None else (4.0 if device.type == "cuda" else 0.5)

    fused_names = common.fused_backends(device, dtype)
    providers = resolve_providers(args, fused_names)
    cases = build_cases(args, device, fused_names)
    meta = common.metadata(device, argv)
    if baseline_run and meta.get("stvit_kernels_dirty") is not False:
        raise SystemExit(f"--record-baseline: the library imported from {meta.get('stvit_kernels_path')} "
                         f"differs from its commit {meta.get('stvit_kernels_commit')} (or is not in git): "
                         "measure a clean checkout, e.g. git worktree add /tmp/base HEAD and "
                         "PYTHONPATH=/tmp/base (copy the built stvit_kernels/_C*.so there)")
    print(f"device: {meta['device']}; backends: {meta['backends']}; fused here: {fused_names}; "
          f"providers: {providers}", file=sys.stderr)
    if not fused_names:
        print("note: no fused backend can run here; only the reference and dense attention are timed",
              file=sys.stderr)

    copy_bw = common.copy_bandwidth(device) if device.type == "cuda" else None
    if copy_bw:
        print(f"copy bandwidth: {copy_bw['gbps']:.0f} GB/s", file=sys.stderr)
    prov = Providers(device, dtype, fused_names, int(naive_gib * (1 << 30)),
                     compile_sides=args.compile_sides or (None if args.sides else FULL_COMPILE_SIDES),
                     compile_mode=None if args.compile_mode == "default" else args.compile_mode)
    rows: List[Dict] = []
    for case in cases:
        rows += run_case(case, providers, args.modes, prov, args, device, dtype,
                         copy_bw["gbps"] if copy_bw else None)
    if baseline_run:
        default_out = PROXY_BASELINE
    elif args.preset == "proxy":
        default_out = os.path.join(common.RESULTS_DIR, "cpu_proxy.json")
    else:
        default_out = os.path.join(
            common.RESULTS_DIR, f"{meta['device_kind']}_ops{'' if args.dtype == 'float32' else '_' + args.dtype}.json")
    out = args.out or default_out
    meta["commands"] = [meta["command"]]
    if args.append and not args.no_save:
        rows, meta["commands"] = common.merge_results(
            out, rows, ("op", "tag", "batch", "dim", "side", "stoken", "heads", "dtype", "provider", "mode"),
            meta, same={"dtype": args.dtype})
    baseline = proxy_baseline_summary(rows, meta) if baseline_run else None
    targets = evaluate_targets(rows, device, dtype, fused_names,
                               proxy_baseline=baseline if baseline_run else load_proxy_baseline())
    if args.preset == "proxy":   # only the proxy's own targets
        targets = [t for t in targets if "proxy" in t["name"]]
    print_table(rows, targets, meta, copy_bw, fused_names)

    payload = dict(
        kind="ops", meta=meta,
        config=dict(preset=args.preset, args=vars(args), providers=providers, fused_backends=fused_names,
                    cases=[asdict(c) for c in cases],
                    timing=("triton.testing.do_bench median, quantiles 0.2/0.8, warmup 25 ms, rep 100 ms"
                            if device.type == "cuda" else
                            f"torch.utils.benchmark Timer.timeit blocks of ~50 ms, providers interleaved "
                            f"round by round, >= {args.min_run_time or 0.3} s (the proxy "
                            f"{args.min_run_time or PROXY_MIN_RUN_TIME} s) and 3 rounds each; median and "
                            "quartiles of the blocks"),
                    per_call=PER_CALL_DOC_GPU if device.type == "cuda" else PER_CALL_DOC_CPU,
                    proxy=dict(PROXY, batch=PROXY_BATCH, threads=PROXY_THREADS, providers=PROXY_PROVIDERS,
                               baseline=os.path.relpath(PROXY_BASELINE, common.REPO_ROOT),
                               target_fraction=PROXY_TARGET_FRACTION),
                    memory=dict(
                        peak_bytes="GPU: torch.cuda.max_memory_allocated during one call minus "
                                   "memory_allocated before it",
                        saved_bytes="bytes of the distinct storages saved for backward in one forward "
                                    "(saved_tensors_hooks), inputs and parameters not counted"),
                    byte_model=("elements x dtype size, X=B*C*H*W, S=B*C*hh*ww, A=B*9*H*W, D=B*hh*ww; "
                                "affinity fwd X+S+A, bwd 2A+2X+2S; aggregate fwd X+A+S+D, bwd S+D+2X+2A; "
                                "upsample fwd S+A+X, bwd X+2S+2A; affinity_aggregate fwd X+S+A+S+D; "
                                "associate fwd X+S+A+S, bwd S+D+A+X"),
                    naive_max_bytes=prov.naive_max_bytes,
                    compile=dict(providers=["reference+compile", "official+compile"],
                                 options=f"torch.compile(fn, dynamic=False, mode={args.compile_mode!r})",
                                 sweep_sides=sorted(prov.compile_sides) if prov.compile_sides else "all",
                                 donated_buffer=False, layout_optimization=args.inductor_layout_opt)),
        copy_bandwidth=copy_bw, results=rows, targets=targets)
    if baseline is not None:
        payload["baseline"] = baseline
    if not args.no_save:
        common.save_results(out, payload, plot=args.plot)
    return payload


if __name__ == "__main__":
    main()
