"""Seeded random sweep: every public op on every available fused backend against the reference.

For each op (``stoken_affinity``, ``stoken_aggregate``, ``stoken_upsample``, ``associate``) and
each fused backend, random valid cases (batch, channels, image, super-token size, dtype, scale,
``n_iter``), each drawn from its own seed (the case index), compare the outputs and the gradients of
every input with the reference computed in float64 on the same inputs (within tests/utils.TOL, or,
beyond it, within ``FACTOR`` x the error of the reference itself in the case's dtype), with every
fresh output and workspace buffer of the kernels NaN-poisoned. 200 cases per op and backend, 10x
more with larger sizes under ``STVIT_LONG_TESTS=1``. A failure lists every failing case with its
seed and the command that reruns it alone (``STVIT_SWEEP_CASE=<index>``).

The exception is the Triton interpreter (CPU CI without a GPU): it spends ~5 ms per kernel launch
and ~15 ms per program (one super-token cell) of it, ~0.25 s for one case's forward and backward
even with 1-4 cells, so it gets ``INTERPRETER_CASES`` small cases per op (the compiled Triton
kernels on a GPU get the full sweep).
"""
import os
import random

import pytest
import torch

import stvit_kernels as sk

from .utils import LONG, TOL, device_for, make_inputs, op_results, seed_for

OPS = ["affinity", "aggregate", "upsample", "associate"]
FUSED = [b for b in sk.available_backends() if b != "reference"]
CASES = int(os.environ.get("STVIT_SWEEP_CASES", 2000 if LONG else 200))
INTERPRETER_CASES = int(os.environ.get("STVIT_SWEEP_CASES", 400 if LONG else 200))
ONLY_CASE = os.environ.get("STVIT_SWEEP_CASE")

pytestmark = pytest.mark.usefixtures("poison_outputs", "one_thread")


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core machine waiting for the second
    one costs more than the work (the CPU kernels' thread splitting is tested elsewhere)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _interpreted(backend):
    """Whether this backend runs under the Triton interpreter (slow: keep the grids small)."""
    return backend == "triton" and device_for(backend) == "cpu"


def draw_case(seed, small):
    """A random valid case ``dict(B, C, H, W, h, w, dtype, scale, n_iter)`` from ``seed``. With
    ``small`` (for the Triton interpreter), B = 1 and grids of 1 x 1 to 2 x 2, 1 x 4 or 4 x 1 cells."""
    r = random.Random(seed)

    def size():  # one side of a super token: 1 (one dimension of a stoken), small, odd, 4, 8...
        return r.choice([1, 1, 2, 3, 4, 5, 7, 8] + ([6, 9, 12, 16] if LONG else []))

    h, w = size(), size()
    if small:
        B = 1
        hh, ww = r.choice([(1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (1, 4), (4, 1)])
    else:
        B = r.choice([1, 1, 2, 3])
        top = 7 if LONG else 4
        hh, ww = r.randint(1, top), r.randint(1, top)
    C = r.choice([1, 2, 3, 5, 8, 13, 16, 17, 24, 31, 40] + ([64, 67, 96] if LONG else []))
    return dict(B=B, C=C, H=hh * h, W=ww * w, h=h, w=w,
                dtype=torch.float64 if r.random() < 0.25 else torch.float32,
                scale=None if r.random() < 0.7 else r.uniform(0.05, 2.0),
                n_iter=r.choice([1, 1, 1, 2]))


def case_seed(op, i):
    return seed_for("sweep", op, i, LONG)


def _describe(backend, op, i, case):
    c = case
    return (f"case {i} (seed {case_seed(op, i)}): B={c['B']} C={c['C']} H={c['H']} W={c['W']} "
            f"stoken_size=({c['h']}, {c['w']}) dtype={c['dtype']} scale={c['scale']} "
            f"n_iter={c['n_iter']}; rerun: {'STVIT_LONG_TESTS=1 ' if LONG else ''}"
            f"STVIT_SWEEP_CASE={i} pytest tests/test_sweep.py -k '{backend} and {op}'")


# Beyond TOL, a kernel may err by up to this factor times what the reference itself errs in the
# case's dtype (large cells and channel counts of the long sweep: a float32 sum of thousands of
# terms is off by more than TOL whatever the order of summation).
FACTOR = 4


def check_case(backend, op, case, seed):
    """None if the backend matches the reference on this case, else what differs."""
    c = case
    t = make_inputs(c["B"], c["C"], c["H"], c["W"], c["h"], c["w"], dtype=c["dtype"],
                    device=device_for(backend), seed=seed)
    t_cpu = {k: v.cpu() for k, v in t.items()}
    size, kw = (c["h"], c["w"]), dict(scale=c["scale"], n_iter=c["n_iter"])
    got = op_results(op, backend, t, size, **kw)
    truth = op_results(op, "reference", t_cpu, size, torch.float64, **kw)
    same_dtype = None  # the reference in the case's dtype, computed when needed
    for name, want in truth.items():
        out = got[name]
        if out.dtype != c["dtype"] or out.shape != want.shape:
            return (f"{name}: got {out.dtype} {tuple(out.shape)}, "
                    f"want {c['dtype']} {tuple(want.shape)}")
        out = out.cpu().double()
        try:
            torch.testing.assert_close(out, want, **TOL[c["dtype"]])
        except AssertionError as e:
            same_dtype = same_dtype or op_results(op, "reference", t_cpu, size, **kw)
            err = (out - want).abs().max().item()
            ref_err = (same_dtype[name].double() - want).abs().max().item()
            if not err <= FACTOR * ref_err:
                return (f"{name}: error {err:.3g} against the float64 reference, {FACTOR}x more "
                        f"than the reference's own in {c['dtype']} ({ref_err:.3g}): {e}")
    return None


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", FUSED)
def test_sweep_against_reference(backend, op):
    small = _interpreted(backend)
    indices = [int(ONLY_CASE)] if ONLY_CASE else range(INTERPRETER_CASES if small else CASES)
    failures = []
    for i in indices:
        case = draw_case(case_seed(op, i), small)
        problem = check_case(backend, op, case, case_seed(op, i))
        if problem is not None:
            failures.append(f"{_describe(backend, op, i, case)}\n    {problem}")
    assert not failures, (f"{len(failures)} of {len(indices)} cases differ from the reference:\n"
                          + "\n".join(failures))


@pytest.mark.parametrize("small", [False, True], ids=["cpu-cases", "interpreter-cases"])
def test_sweep_covers_the_awkward_cases(small):
    """The drawn cases of every op include each awkward feature the sweep is meant to cover."""
    for op in OPS:
        cases = [draw_case(case_seed(op, i), small)
                 for i in range(INTERPRETER_CASES if small else CASES)]
        features = {
            "odd H": any(c["H"] % 2 for c in cases),
            "odd W": any(c["W"] % 2 for c in cases),
            "h != w": any(c["h"] != c["w"] for c in cases),
            "H != W": any(c["H"] != c["W"] for c in cases),
            "grid of 1 cell": any(c["H"] == c["h"] and c["W"] == c["w"] for c in cases),
            "grid of 2 cells": any(c["H"] * c["W"] == 2 * c["h"] * c["w"] for c in cases),
            "B = 1": any(c["B"] == 1 for c in cases),
            "C = 1": any(c["C"] == 1 for c in cases),
            "C % 8 != 0": any(c["C"] % 8 for c in cases),
            "C >= 16 (tl.dot path)": any(c["C"] >= 16 and c["h"] * c["w"] >= 9 for c in cases),
            "stoken size 1 in one dim": any((c["h"] == 1) != (c["w"] == 1) for c in cases),
            "float64": any(c["dtype"] == torch.float64 for c in cases),
            "explicit scale": any(c["scale"] is not None for c in cases),
            "n_iter = 2": any(c["n_iter"] == 2 for c in cases),
        }
        if not small:
            features["grid of 3x3 or more"] = any(
                c["H"] >= 3 * c["h"] and c["W"] >= 3 * c["w"] for c in cases)
            features["B > 1"] = any(c["B"] > 1 for c in cases)
        missing = [name for name, present in features.items() if not present]
        assert not missing, f"{op}: no case with {missing}"


def test_poison_fixture_fills_triton_buffers_with_nan():
    """The fixture of this module is on: the Triton kernels' allocator returns NaN."""
    if "triton" not in FUSED:
        pytest.skip("the triton backend is not available")
    from stvit_kernels import triton_kernels

    assert torch.isnan(triton_kernels._empty((3, 2), torch.float32, torch.device("cpu"))).all()
