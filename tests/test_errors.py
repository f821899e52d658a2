"""Bad inputs get clear errors: ``ValueError`` / ``TypeError`` naming the offending shapes (or
values) from every public function on every backend, the module's own checks, and ``RuntimeError``
(TORCH_CHECK) from the registered C++ ops called directly; never a crash or a silent result.

tests/test_dispatch.py checks the basic messages through ``stoken_affinity`` with the default
backend and tests/test_module.py the module's constructor checks; this file covers every public
function, every backend and the remaining mismatches.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import stvit_kernels as sk
from stvit_kernels import _ext

from .utils import device_for, other_device

BACKENDS = sk.available_backends()

# Valid shapes: x [2, 4, 8, 12], 4 x 4 super tokens, a 2 x 3 grid.
B, C, H, W, S = 2, 4, 8, 12, 4
SHAPES = dict(x=(B, C, H, W), stokens=(B, C, H // S, W // S), affinity=(B, 9, H, W))



def _call(fn, backend, size=S, **shapes):
    """``fn`` on valid random tensors, some replaced (by a shape tuple, or an object as it is)."""
    dev = device_for(backend)
    args = {}
    for name in ("x", "stokens", "affinity"):
        t = shapes.get(name, SHAPES[name])
        args[name] = torch.rand(t, device=dev) if isinstance(t, tuple) else t
    if fn == "affinity":
        return sk.stoken_affinity(args["x"], args["stokens"], size, backend=backend)
    if fn == "aggregate":
        return sk.stoken_aggregate(args["x"], args["affinity"], size, backend=backend)
    if fn == "upsample":
        return sk.stoken_upsample(args["stokens"], args["affinity"], size, backend=backend)
    return sk.associate(args["x"], args["stokens"], size, backend=backend)


FUNCTIONS = ["affinity", "aggregate", "upsample", "associate"]
# the tensors each public function takes
TAKES = {"affinity": ("x", "stokens"), "aggregate": ("x", "affinity"),
         "upsample": ("stokens", "affinity"), "associate": ("x", "stokens")}


def _shape_text(shape):
    return re.escape(str(tuple(shape)))


def _bad_shapes():
    """(function, tensor name, bad shape) for every wrong rank and every mismatch."""
    cases = []
    for fn in FUNCTIONS:
        for name in TAKES[fn]:
            shape = SHAPES[name]
            cases += [(fn, name, shape[1:]), (fn, name, (1,) + shape)]  # rank 3 and 5
            cases.append((fn, name, (B + 1,) + shape[1:]))  # batch
            if name != "x" and (fn, name) != ("upsample", "stokens"):  # any C: test below
                cases.append((fn, name, (shape[0], shape[1] + 1) + shape[2:]))  # channels / slots
                cases.append((fn, name, shape[:2] + (shape[2] + 1, shape[3])))  # grid / pixels
                cases.append((fn, name, shape[:3] + (shape[3] - 1,)))
    # x of another grid than stokens / affinity (upsample: affinity H, W not multiples of 4)
    cases += [("affinity", "x", (B, C, H + S, W)), ("aggregate", "x", (B, C, H, W + S)),
              ("upsample", "affinity", (B, 9, H + 1, W)), ("associate", "x", (B, C, H, W - S))]
    return [pytest.param(*c, id=f"{c[0]}-{c[1]}{list(c[2])}") for c in cases]


@pytest.mark.parametrize("fn,name,shape", _bad_shapes())
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_shapes(backend, fn, name, shape):
    with pytest.raises(ValueError, match=_shape_text(shape)):
        _call(fn, backend, **{name: shape})


def test_upsample_accepts_any_channel_count():
    """Not an error: the super tokens of the upsampling may have any number of channels."""
    y = sk.stoken_upsample(torch.rand(B, 7, H // S, W // S), torch.rand(SHAPES["affinity"]), S)
    assert y.shape == (B, 7, H, W)


@pytest.mark.parametrize("size,err,match", [
    (0, ValueError, "positive"), (-4, ValueError, "positive"), ((4, 0), ValueError, "positive"),
    ((-4, 4), ValueError, "positive"), ((4, 4, 4), ValueError, "length 3"),
    ([4], ValueError, "length 1"), ((), ValueError, "length 0"), (True, TypeError, "int"),
    ((True, 4), TypeError, "int"), (4.0, TypeError, "int"), ((4.0, 4), TypeError, "int"), ("4", TypeError, "int"),
    (None, TypeError, "int"), (torch.tensor(4), TypeError, "int"),
    (3, ValueError, "divisible by stoken_size"), ((4, 5), ValueError, "divisible by stoken_size"),
], ids=repr)
@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_stoken_size(backend, fn, size, err, match):
    with pytest.raises(err, match=match):
        _call(fn, backend, size=size)


@pytest.mark.parametrize("dtypes,match", [
    ((torch.int64, torch.int64), "floating-point"),
    ((torch.int32, torch.float32), "floating-point"),
    ((torch.float32, torch.uint8), "floating-point"), ((torch.bool, torch.bool), "floating-point"),
    ((torch.complex64, torch.complex64), "floating-point"),
    ((torch.float32, torch.float64), "same dtype"), ((torch.float16, torch.float32), "same dtype"),
    ((torch.bfloat16, torch.float16), "same dtype"),
], ids=str)
@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_dtypes(backend, fn, dtypes, match):
    dev = device_for(backend)
    tensors = {name: torch.ones(SHAPES[name], device=dev).to(dt)
               for name, dt in zip(TAKES[fn], dtypes)}
    with pytest.raises(TypeError, match=match) as info:
        _call(fn, backend, **tensors)
    assert any(str(dt) in str(info.value) for dt in dtypes), str(info.value)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_different_devices(backend, fn):
    first, second = TAKES[fn]
    other = other_device(backend)
    for moved in (first, second):
        t = torch.rand(SHAPES[moved], device=other)
        with pytest.raises(ValueError, match=f"same device.*{other}"):
            _call(fn, backend, **{moved: t})


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_not_a_tensor(fn):
    name = TAKES[fn][1]
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
        _call(fn, "reference", **{name: torch.rand(SHAPES[name]).tolist()})


@pytest.mark.parametrize("scale,err", [("a", TypeError), (None, None), (True, TypeError),
                                       (float("nan"), ValueError), (float("inf"), ValueError)],
                         ids=repr)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_scale(backend, scale, err):
    x = torch.rand(SHAPES["x"], device=device_for(backend))
    s = torch.rand(SHAPES["stokens"], device=device_for(backend))
    if err is None:
        sk.stoken_affinity(x, s, S, scale, backend=backend)
        return
    with pytest.raises(err, match="scale"):
        sk.stoken_affinity(x, s, S, scale, backend=backend)
    with pytest.raises(err, match="scale"):
        sk.associate(x, s, S, scale=scale, backend=backend)


@pytest.mark.parametrize("n_iter,err", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                         ("2", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_n_iter(n_iter, err):
    x, s = torch.rand(SHAPES["x"]), torch.rand(SHAPES["stokens"])
    with pytest.raises(err, match="n_iter"):
        sk.associate(x, s, S, n_iter=n_iter)
    with pytest.raises(err, match="n_iter"):
        sk.SuperTokenAttention(SHAPES["x"][1], S, n_iter=n_iter)


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_module_bad_inputs(backend):
    dev = device_for(backend)
    m = sk.SuperTokenAttention(C, S, num_heads=2, backend=backend).to(dev)
    for shape in [(B, C + 1, H, W), (B, C - 1, H, W), (C, H, W), (1, B, C, H, W)]:
        with pytest.raises(ValueError, match=re.escape(f"x.shape={shape}")):
            m(torch.rand(shape, device=dev))
    with pytest.raises(ValueError, match=r"x.shape=list"):
        m([1.0])
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(B, C, H, W, dtype=torch.int64, device=dev))
    # float64 input, float32 parameters: a clear error, not the conv's
    for refine_attention in (True, False):
        m = sk.SuperTokenAttention(C, S, num_heads=2, refine_attention=refine_attention,
                                   backend=backend).to(dev)
        with pytest.raises(TypeError, match=r"torch.float32 parameters but got x.dtype=torch.float64"):
            m(torch.rand(B, C, H, W, dtype=torch.float64, device=dev))
    # fine without parameters, or under autocast
    m = sk.SuperTokenAttention(C, S, refine=False, backend=backend).to(dev)
    assert m(torch.rand(B, C, H, W, dtype=torch.float64, device=dev)).dtype == torch.float64


@pytest.mark.parametrize("dim,heads", [(10, 3), (8, 0), (8, -2), (6, 4)])
def test_module_dim_not_divisible_by_heads(dim, heads):
    with pytest.raises(ValueError, match=f"dim={dim}, num_heads={heads}"):
        sk.SuperTokenAttention(dim, 4, num_heads=heads)


@pytest.mark.parametrize("size", [0, -1, (4, 4, 4), (0, 4), 4.0, True])
def test_module_bad_stoken_size(size):
    with pytest.raises((ValueError, TypeError), match="stoken_size"):
        sk.SuperTokenAttention(8, size, num_heads=2)


# ------------------------------------------------------------------------------------------------
# The registered C++ ops called directly: TORCH_CHECK, the second line behind the Python checks
# ------------------------------------------------------------------------------------------------

def _ops():
    if _ext.load_error() is not None:
        pytest.skip(f"the compiled extension is not available ({_ext.load_error()})")
    return torch.ops.stvit


def _direct_calls():
    """(id, op name, args) of direct calls with bad inputs (the ones tests/test_compiled.py's
    test_registered_ops_check_their_inputs does not make)."""
    x, s, A = (torch.rand(SHAPES[k]) for k in ("x", "stokens", "affinity"))
    calls = [
        ("affinity-batch", "affinity", (x, s[:1].contiguous(), S, S, 1.0, True)),
        ("affinity-channels", "affinity", (x, s[:, :2].contiguous(), S, S, 1.0, True)),
        ("affinity-rank", "affinity", (x, s[0], S, S, 1.0, True)),
        ("affinity-int", "affinity", (x.int(), s.int(), S, S, 1.0, True)),
        ("aggregate-batch", "aggregate", (x, A[:1].contiguous(), S, S)),
        ("aggregate-dtype", "aggregate", (x, A.half(), S, S)),
        ("aggregate-negative-size", "aggregate", (x, A, -S, S)),
        ("aggregate-rank", "aggregate", (x[0], A, S, S)),
        ("upsample-batch", "upsample", (s[:1].contiguous(), A, S, S)),
        ("upsample-not-divisible", "upsample", (s, A, 3, S)),
        ("upsample-slots", "upsample", (s, A[:, :8].contiguous(), S, S)),
        ("affinity_aggregate-channels", "affinity_aggregate",
         (x, s[:, :3].contiguous(), S, S, 1.0)),
        ("affinity_aggregate-zero-size", "affinity_aggregate", (x, s, S, 0, 1.0)),
        ("associate-n_iter", "associate", (x, None, S, S, 1.0, 0)),
        ("associate-grid", "associate", (x, s[:, :, :1].contiguous(), S, S, 1.0, 1)),
        ("associate-not-divisible", "associate", (x, None, 3, S, 1.0, 1)),
        ("associate_backward-den", "associate_backward", (s, A, s, S, S)),
        ("associate_backward-grid", "associate_backward",
         (s[:, :, :1].contiguous(), A, s[:, :1, :1].contiguous(), S, S)),
        ("pool-not-divisible", "pool", (x, S, 5)),
    ]
    params = [pytest.param(op, args, id=i) for i, op, args in calls]
    # Another device. With 'meta' the dispatcher runs the op's fake implementation (register_fake),
    # which checks the devices itself.
    other = other_device("cpu")
    params += [pytest.param("affinity", (x, s.to(other), S, S, 1.0, True), id="affinity-device"),
               pytest.param("upsample", (s, A.to(other), S, S), id="upsample-device")]
    return params


@pytest.mark.parametrize("op,args", _direct_calls())
def test_registered_ops_raise(op, args):
    with pytest.raises(RuntimeError):  # NotImplementedError (no kernel for a device) is one
        getattr(_ops(), op)(*args)


def test_triton_ops_refuse_cpu_tensors():
    """Without the interpreter, the Triton ops given CPU tensors say what they need instead of
    failing inside Triton's launcher (a fresh process: TRITON_INTERPRET is read at import)."""
    code = textwrap.dedent(f"""
        import torch, stvit_kernels
        x, s, A = torch.rand{SHAPES["x"]}, torch.rand{SHAPES["stokens"]}, torch.rand{SHAPES["affinity"]}
        calls = dict(affinity=(x, s, {S}, {S}, 1.0, True), aggregate=(x, A, {S}, {S}),
                     upsample=(s, A, {S}, {S}), affinity_aggregate=(x, s, {S}, {S}, 1.0),
                     associate=(x, None, {S}, {S}, 1.0, 1))
        for name, args in calls.items():
            try:
                getattr(torch.ops.stvit, "triton_" + name)(*args)
            except ValueError as e:
                assert "runs on CUDA tensors" in str(e) and "TRITON_INTERPRET" in str(e), e
            else:
                raise AssertionError(name + " ran on CPU tensors")
        print("refused")
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "refused" in proc.stdout, proc.stdout + proc.stderr
