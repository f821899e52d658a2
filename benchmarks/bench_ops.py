"""Time the STA ops and the SuperTokenAttention module against the reference and dense attention.

What is measured
    ops        ``affinity`` (stoken_affinity), ``aggregate`` (stoken_aggregate), ``upsample``
               (stoken_upsample), ``associate`` (the fused association of the module,
               ``stvit_kernels.associate``), ``affinity_aggregate`` (the backends' fused
               affinity + aggregation primitive alone, forward only: the kernel of the bandwidth
               target) and ``sta`` (the whole ``SuperTokenAttention`` module).
    providers  ``reference``; ``reference+compile`` (the reference op / module under
               ``torch.compile``; skipped with a note if compiling fails); every fused backend that
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
               the JSON: value, threshold, met). CPU: STA fwd+bwd best fused >= 3x reference at
               STViT-S stage 1 (B=8, C=64, 56x56, 8x8, 1 head) and stage 2 (B=8, C=128, 28x28,
               4x4, 2 heads). GPU (per dtype of the run): STA fwd >= 8x and fwd+bwd >= 5x reference
               at B=64 stage 1; fused affinity+aggregation >= 70 % of copy bandwidth at B=64
               stage 1; STA fwd >= 3x faster than dense SDPA at 56x56 tokens and >= 30x at 128x128
               (sweep batch).

Presets
    --quick (default)  ``sta`` fwd and fwd+bwd, reference / fused / dense-sdpa at 56², 96², 128²
                       tokens (batch 1), plus the target shapes of the device (reference / fused).
                       A few minutes on a 2-core CPU: ``make bench``.
    --full             every op, provider and mode over the resolution sweep 224²..1024² input
                       (56²..256² tokens; batch 8 on a GPU, 1 on a CPU), plus the target shapes.
    Any of --ops, --sides, --batch, --providers, --modes overrides the preset's sweep.

Examples
    python benchmarks/bench_ops.py --quick --plot                 # CPU: results/cpu_ops.json + PNGs
    python benchmarks/bench_ops.py --full --device cuda --dtype bfloat16 --plot
    python benchmarks/bench_ops.py --ops affinity upsample --sides 56 112 --modes fwd --no-save
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import stvit_kernels as sk  # noqa: E402
from stvit_kernels.backends import get_backend  # noqa: E402

OPS = ("affinity", "aggregate", "upsample", "associate", "affinity_aggregate", "sta")
MODES = ("fwd", "bwd", "fwd+bwd")
DENSE = ("dense-sdpa", "dense-naive")
#: Token-grid sides of the sweep: 224, 320, 384, 512, 640, 768, 896, 1024 input pixels / 4.
FULL_SIDES = (56, 80, 96, 128, 160, 192, 224, 256)
QUICK_SIDES = (56, 96, 128)
#: Sweep sizes at which the compiled reference is measured by default (a compile per size and mode).
FULL_COMPILE_SIDES = (56, 128, 256)
#: STViT-S stage 1 / stage 2 (C, side at 224², super-token size, heads).
STAGE1 = dict(dim=64, side=56, stoken=8, heads=1)
STAGE2 = dict(dim=128, side=28, stoken=4, heads=2)


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

    @property
    def tokens(self) -> int:
        return self.side * self.side

    def describe(self) -> str:
        return (f"{self.op} B={self.batch} C={self.dim} {self.side}x{self.side} "
                f"st={self.stoken} heads={self.heads} [{self.tag}]")


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
                 compile_sides: Optional[Sequence[int]] = None):
        self.device, self.dtype, self.fused = device, dtype, list(fused)
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

    def _dense(self, case: Case) -> sk.RefineAttention:
        key = ("dense", case.dim, case.heads)
        if key not in self._modules:
            torch.manual_seed(0)
            m = sk.RefineAttention(case.dim, num_heads=case.heads, qkv_bias=True)
            self._modules[key] = m.to(self.device, self.dtype)
        return self._modules[key]

    def compile_key(self, case: Case) -> Tuple:
        return (case.op, case.stoken) if case.op != "sta" else ("sta", case.dim, case.stoken, case.heads)

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
        compiled = provider == "reference+compile"
        if compiled and case.tag == "sweep" and self.compile_sides and case.side not in self.compile_sides:
            return None, [], None   # not compiled at this size (--compile-sides): not measured
        backend = "reference" if compiled else provider
        if case.op == "sta":
            m = copy.copy(self._sta(case))   # shallow: same parameters, its own backend attribute
            m.backend = backend
            fn, params = m, list(m.parameters())
        else:
            fn, params = op_callable(case.op, backend, size, case.dim ** -0.5), []
        if compiled:
            key = self.compile_key(case)
            if key in self.compile_failed:
                return None, [], self.compile_failed[key]
            if key not in self._compiled:
                # static shapes: a graph per size (automatic dynamic shapes hit an inductor error on
                # the reference's index arithmetic in torch 2.14)
                self._compiled[key] = torch.compile(fn, dynamic=False)
            fn = self._compiled[key]
        return fn, params, None


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


def target_cases(device, preset: str, fused_names: Sequence[str]) -> List[Case]:
    """The shapes of the targets of this device type."""
    cmp = ("reference", "reference+compile") + tuple(fused_names)
    if device.type == "cuda":
        cases = [Case("sta", 64, tag="stage1-b64", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE1),
                 Case("affinity_aggregate", 64, tag="stage1-b64", providers=cmp, modes=("fwd",), **STAGE1),
                 Case("associate", 64, tag="stage1-b64", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE1)]
        if preset == "full":
            cases.append(Case("sta", 64, tag="stage2-b64", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE2))
        return cases
    return [Case("sta", 8, tag="stage1-b8", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE1),
            Case("sta", 8, tag="stage2-b8", providers=cmp, modes=("fwd", "fwd+bwd"), **STAGE2)]


def build_cases(args, device, fused_names) -> List[Case]:
    quick = args.preset == "quick"
    ops = args.ops or (["sta"] if quick else list(OPS))
    sides = args.sides or (QUICK_SIDES if quick else FULL_SIDES)
    batch = _default_batch(args, device)
    cases = [] if args.no_sweep else [Case(op, batch, args.dim, side, args.stoken, args.heads)
                                      for op in ops for side in sides]
    if not args.no_targets:
        cases += target_cases(device, args.preset, fused_names)
    return cases


def resolve_providers(args, fused_names) -> List[str]:
    if args.providers:
        names = []
        for p in args.providers:
            names += fused_names if p == "fused" else [p]
        return list(dict.fromkeys(names))
    if args.preset == "quick":
        return ["reference"] + list(fused_names) + ["dense-sdpa"]
    return ["reference", "reference+compile"] + list(fused_names) + list(DENSE)


def run_case(case: Case, providers: Sequence[str], modes: Sequence[str], prov: Providers,
             args, device, dtype, copy_gbps: Optional[float]) -> List[Dict]:
    rows = []
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
                pool=n_pool)
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
            if compiled or not any(m != "fwd" for m in case_modes):
                with torch.no_grad():
                    fn(*pool[0])
            if any(m != "fwd" for m in case_modes):
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
                if compiled:
                    try:
                        saved = common.saved_bytes(lambda: fn(*pool[0]), exclude=list(pool[0]) + params)
                    except Exception as e:  # noqa: BLE001
                        print(f"  {provider:18s} saved_bytes failed: {_failure_note(e, provider)}",
                              file=sys.stderr)
        except Exception as e:  # noqa: BLE001
            note = _failure_note(e, provider)
            if provider == "reference+compile":
                prov.compile_failed[prov.compile_key(case)] = note
            status = "skipped" if _is_oom(e) or provider.endswith("compile") else "error"
            for mode in case_modes:
                rows.append(dict(base, provider=provider, mode=mode, status=status, note=note))
            print(f"  {provider:18s} {note}", file=sys.stderr)
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
            if status == "error":
                traceback.print_exception(type(e), e, e.__traceback__, limit=4, file=sys.stderr)

        for provider, (fn, params, saved, out_specs) in ready.items():
            mode_rows[provider] = dict(base, provider=provider, mode=mode, saved_bytes=saved)
            if device.type == "cuda":
                release = None
                try:
                    step, release = make_step(mode, fn, pool, params, 1234, out_specs)
                    mode_rows[provider].update(common.time_call(step, device, args.min_run_time))
                    mode_rows[provider]["peak_bytes"] = common.cuda_peak_bytes(step, device)
                    mode_rows[provider]["status"] = "ok"
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
                timings, errors = common.time_interleaved(steps, args.min_run_time,
                                                          block_s=min(0.05, args.min_run_time / 3))
                for provider, t in timings.items():
                    mode_rows[provider].update(t, status="ok")
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
                      + (f"  {row['gbps']:.0f} GB/s" if "gbps" in row else ""), file=sys.stderr)
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


def _target(name, threshold, value, details, unit="x") -> Dict:
    met = None if value is None or threshold is None else bool(value >= threshold)
    return dict(name=name, threshold=threshold, value=value, unit=unit, met=met, details=details,
                note=None if value is not None else "not measured in this run (case missing or failed)")


def _speedup(rows, slow: Sequence[str], fast: Sequence[str], **match):
    sel = _ok(rows, **match)
    a, b = _best(sel, slow), _best(sel, fast)
    if a is None or b is None:
        return None, {}
    return a["ms"] / b["ms"], dict(slow=a["provider"], slow_ms=a["ms"], fast=b["provider"], fast_ms=b["ms"])


def evaluate_targets(rows: List[Dict], device, dtype, fused_names: Sequence[str]) -> List[Dict]:
    """The issue's targets for this device type, computed from the measured rows. Entries with
    ``threshold: null`` are reported for information."""
    dt = str(dtype).split(".")[-1]
    fused = list(fused_names)
    out = []
    if device.type == "cpu":
        cpu = f"cpu ({common.threads_str(torch.get_num_threads())})"
        for tag, what in (("stage1-b8", "stage 1 (B=8, C=64, 56x56, 8x8, 1 head)"),
                          ("stage2-b8", "stage 2 (B=8, C=128, 28x28, 4x4, 2 heads)")):
            for mode, thr in (("fwd+bwd", 3.0), ("fwd", None)):
                v, d = _speedup(rows, ["reference"], fused, op="sta", tag=tag, mode=mode, dtype=dt)
                out.append(_target(f"{cpu}: STA {mode}, best fused / reference, STViT-S {what}, {dt}",
                                   thr, v, d))
        return out
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
        if fused and "reference" in providers:
            extra.append("ref/fused")
        if "dense-sdpa" in providers:
            extra.append("sdpa/STA")
        if any("bw_frac" in r for r in sel):
            extra.append("fused BW")
        r0 = sel[0]
        p(f"\n{op} [{tag}]  B={r0['batch']} C={r0['dim']} stoken={r0['stoken']} heads={r0['heads']}")
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
            if "ref/fused" in extra:
                line += f"{_ratio(ok.get('reference'), bf):>11s}"
            if "sdpa/STA" in extra:
                line += f"{_ratio(ok.get('dense-sdpa'), bs):>11s}"
            if "fused BW" in extra:
                frac = bf.get("bw_frac") if bf else None
                line += f"{('-' if frac is None else f'{100 * frac:.0f}%'):>11s}"
            p(line)
    notes = sorted({f"{r['provider']}: {r['note']}" for r in rows if r.get("note")})
    if notes:
        p("\nnotes:")
        for n in notes:
            p(f"  {n}")
    if targets:
        p("\ntargets:")
        for t in targets:
            if t["value"] is None:
                val = "not measured"
            elif t["unit"] == "fraction":
                val = f"{100 * t['value']:.0f}%"
            else:
                val = f"{t['value']:.2f}x"
            thr = ("" if t["threshold"] is None else
                   f" (target >= {100 * t['threshold']:.0f}%)" if t["unit"] == "fraction" else
                   f" (target >= {t['threshold']:g}x)")
            verdict = {True: "MET", False: "NOT MET", None: "info" if t["threshold"] is None else "?"}[t["met"]]
            p(f"  [{verdict:7s}] {t['name']}: {val}{thr}")


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick",
                   help="the make-bench preset (default)")
    g.add_argument("--full", dest="preset", action="store_const", const="full",
                   help="every op, provider and mode over the 56..256 token sweep")
    p.set_defaults(preset="quick")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ops", nargs="+", choices=OPS, default=None, help="ops of the sweep")
    p.add_argument("--sides", nargs="+", type=int, default=None,
                   help="token-grid sides of the sweep (input resolution / 4), multiples of --stoken")
    p.add_argument("--batch", type=int, default=None, help="sweep batch (default: 8 on a GPU, 1 on a CPU)")
    p.add_argument("--dim", type=int, default=STAGE1["dim"])
    p.add_argument("--heads", type=int, default=STAGE1["heads"])
    p.add_argument("--stoken", type=int, default=STAGE1["stoken"])
    p.add_argument("--providers", nargs="+", default=None,
                   help="reference, reference+compile, fused (= every fused backend), cpu, cuda, "
                        "triton, dense-sdpa, dense-naive (default: by preset)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="default: fwd fwd+bwd (quick), all three (full)")
    p.add_argument("--compile-sides", nargs="+", type=int, default=None,
                   help="sweep sides at which reference+compile runs (default: 56 128 256 with the "
                        "preset's sides, every side given with --sides); target shapes always")
    p.add_argument("--no-targets", action="store_true", help="leave out the target shapes")
    p.add_argument("--no-sweep", action="store_true", help="only the target shapes")
    p.add_argument("--naive-max-gib", type=float, default=None,
                   help="skip dense-naive when its N x N map exceeds this (default: 4 GPU, 0.5 CPU)")
    p.add_argument("--min-run-time", type=float, default=0.3, help="CPU: seconds per measurement")
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
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads:
        torch.set_num_threads(args.threads)
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
    print(f"device: {meta['device']}; backends: {meta['backends']}; fused here: {fused_names}; "
          f"providers: {providers}", file=sys.stderr)
    if not fused_names:
        print("note: no fused backend can run here; only the reference and dense attention are timed",
              file=sys.stderr)

    copy_bw = common.copy_bandwidth(device) if device.type == "cuda" else None
    if copy_bw:
        print(f"copy bandwidth: {copy_bw['gbps']:.0f} GB/s", file=sys.stderr)
    prov = Providers(device, dtype, fused_names, int(naive_gib * (1 << 30)),
                     compile_sides=args.compile_sides or (None if args.sides else FULL_COMPILE_SIDES))
    rows: List[Dict] = []
    for case in cases:
        rows += run_case(case, providers, args.modes, prov, args, device, dtype,
                         copy_bw["gbps"] if copy_bw else None)
    out = args.out or os.path.join(
        common.RESULTS_DIR, f"{meta['device_kind']}_ops{'' if args.dtype == 'float32' else '_' + args.dtype}.json")
    meta["commands"] = [meta["command"]]
    if args.append and not args.no_save:
        rows, meta["commands"] = common.merge_results(
            out, rows, ("op", "tag", "batch", "dim", "side", "stoken", "heads", "dtype", "provider", "mode"),
            meta, same={"dtype": args.dtype})
    targets = evaluate_targets(rows, device, dtype, fused_names)
    print_table(rows, targets, meta, copy_bw, fused_names)

    payload = dict(
        kind="ops", meta=meta,
        config=dict(preset=args.preset, args=vars(args), providers=providers, fused_backends=fused_names,
                    cases=[asdict(c) for c in cases],
                    timing=("triton.testing.do_bench median, quantiles 0.2/0.8, warmup 25 ms, rep 100 ms"
                            if device.type == "cuda" else
                            f"torch.utils.benchmark Timer.timeit blocks of ~50 ms, providers interleaved "
                            f"round by round, >= {args.min_run_time} s and 3 rounds each; median and "
                            "quartiles of the blocks"),
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
                    compile=dict(provider="reference+compile", options="torch.compile(fn, dynamic=False)",
                                 sweep_sides=sorted(prov.compile_sides) if prov.compile_sides else "all",
                                 donated_buffer=False)),
        copy_bandwidth=copy_bw, results=rows, targets=targets)
    if not args.no_save:
        common.save_json(out, payload)
        if args.plot:
            import plot

            plot.plot_file(out)
    return payload


if __name__ == "__main__":
    main()
