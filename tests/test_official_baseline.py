"""The benchmarks' ``official`` provider (benchmarks/official.py) computes what our module computes.

``OfficialStokenAttention`` runs the official STViT algorithm op for op (unfold / fold as
convolutions with an identity kernel, the matmuls, ``softmax(dim=-2)`` refine). With the weights of a
``SuperTokenAttention`` it must give the same output and the same gradients as our module on the
reference backend: to float64 rounding in float64, to float32 rounding in float32, over padded and
odd shapes, ``h != w``, 1..3 iterations, a one-cell grid, attention and conv refine.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import stvit_kernels as sk

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _official_module():
    spec = importlib.util.spec_from_file_location("_bench_official", os.path.join(BENCH_DIR, "official.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


official = _official_module()

# (B, C, H, W, stoken_size, n_iter, refine, refine_attention, num_heads)
CASES = {
    "pad-odd-h!=w-2heads": (2, 16, 13, 10, (4, 3), 1, True, True, 2),
    "iter2-rect-3heads": (1, 12, 9, 14, (2, 5), 2, True, True, 3),
    "iter3-conv-pad": (2, 8, 11, 11, 3, 3, True, False, 1),
    "exact-grid-stage1": (2, 16, 16, 16, 8, 1, True, True, 1),
    "one-cell-iter2": (1, 8, 5, 7, 8, 2, True, True, 2),
    "conv-h!=w-iter1": (1, 16, 10, 7, (4, 2), 1, True, False, 1),
    "two-cells-iter3": (2, 8, 8, 4, 4, 3, True, True, 4),
    "no-refine-iter2": (2, 8, 12, 9, (3, 4), 2, False, True, 1),
    "stoken1-refine-only": (2, 8, 5, 6, 1, 1, True, True, 2),
}


def _pair(seed, case, dtype):
    B, C, H, W, st, n_iter, refine, refine_attention, heads = case
    torch.manual_seed(seed)
    sta = sk.SuperTokenAttention(C, st, n_iter=n_iter, refine=refine, refine_attention=refine_attention,
                                 num_heads=heads, qkv_bias=True, backend="reference").to(dtype)
    off = official.OfficialStokenAttention.from_module(sta).to(dtype)   # refine=False: no parameters
    x = torch.randn(B, C, H, W, dtype=dtype)
    return sta, off, x


def _run(module, x, g):
    x = x.clone().requires_grad_()
    y = module(x)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x] + params, g, allow_unused=True)
    return y.detach(), grads[0], dict(zip([n for n, p in module.named_parameters() if p.requires_grad],
                                          grads[1:]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_official_matches_module(name, dtype):
    case = CASES[name]
    sta, off, x = _pair(list(CASES).index(name), case, dtype)
    g = torch.randn(x.shape, dtype=dtype)
    y_ref, gx_ref, gp_ref = _run(sta, x, g)
    y_off, gx_off, gp_off = _run(off, x, g)
    assert y_off.shape == x.shape
    # float64: the same algorithm, so agreement to float64 rounding; float32: to float32 rounding
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-5, atol=5e-6)
    torch.testing.assert_close(y_off, y_ref, **tol)
    torch.testing.assert_close(gx_off, gx_ref, **tol)
    assert gp_off.keys() == gp_ref.keys()
    for k in gp_ref:
        torch.testing.assert_close(gp_off[k], gp_ref[k], **tol, msg=lambda m: f"grad of {k}: {m}")


def test_official_f32_error_is_float32_rounding():
    """Against a float64 truth, the official path in float32 errs no more than our module in float32
    does (up to a small factor): the two differ by rounding only."""
    case = CASES["iter3-conv-pad"]
    sta, off, x = _pair(7, case, torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    y64, gx64, _ = _run(sta, x, g)
    sta32, off32 = sta.float(), official.OfficialStokenAttention.from_module(sta.float())
    y_ref, gx_ref, _ = _run(sta32, x.float(), g.float())
    y_off, gx_off, _ = _run(off32, x.float(), g.float())
    for truth, ours, theirs in ((y64, y_ref, y_off), (gx64, gx_ref, gx_off)):
        err_ours = (ours.double() - truth).abs().max().item()
        err_theirs = (theirs.double() - truth).abs().max().item()
        assert err_theirs <= 4 * err_ours + 1e-6, (err_theirs, err_ours)


def test_state_dict_round_trip():
    """The official provider has our parameters plus the two identity kernels, as buffers named as
    in the official module; state dicts load both ways."""
    torch.manual_seed(0)
    sta = sk.SuperTokenAttention(16, (4, 2), n_iter=2, num_heads=2, qkv_bias=True)
    off = official.OfficialStokenAttention.from_module(sta)
    ours, theirs = set(sta.state_dict()), set(off.state_dict())
    assert theirs - ours == set(official.IDENTITY_KEYS) == {"unfold.weights", "fold.weights"}
    assert ours <= theirs
    assert {n for n, _ in off.named_buffers()} == set(official.IDENTITY_KEYS)
    assert {n for n, _ in off.named_parameters()} == {n for n, _ in sta.named_parameters()}
    eye = torch.eye(9).reshape(9, 1, 3, 3)
    torch.testing.assert_close(off.state_dict()["unfold.weights"], eye, rtol=0, atol=0)
    torch.testing.assert_close(off.state_dict()["fold.weights"], eye, rtol=0, atol=0)
    # ours -> official (strict: the identity kernels are filled in), official -> ours (dropped)
    fresh = official.OfficialStokenAttention(16, (4, 2), n_iter=2, num_heads=2, qkv_bias=True)
    fresh.load_state_dict(sta.state_dict())
    back = sk.SuperTokenAttention(16, (4, 2), n_iter=2, num_heads=2, qkv_bias=True)
    back.load_state_dict(off.state_dict())
    for k, v in sta.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    # its own copy of the parameters, with the module's configuration
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(off.parameters(), sta.parameters()))
    assert (off.n_iter, off.stoken_size, off.stoken_refine.num_heads) == (2, (4, 2), 2)
    assert off.stoken_refine.scale == sta.stoken_refine.scale


def test_neighbour_order_of_the_identity_kernels():
    """``Unfold`` channel ``c * 9 + k`` is the neighbour ``(k // 3 - 1, k % 3 - 1)`` (zero outside the
    grid), and ``Fold`` adds the 9 slots back to those neighbours: the adjoint of ``Unfold``."""
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    u = official.Unfold().double()(s).reshape(2, 3, 9, 4, 5)
    for k in range(9):
        di, dj = k // 3 - 1, k % 3 - 1
        for a in range(4):
            for b in range(5):
                inside = 0 <= a + di < 4 and 0 <= b + dj < 5
                want = s[:, :, a + di, b + dj] if inside else torch.zeros(2, 3, dtype=torch.float64)
                torch.testing.assert_close(u[:, :, k, a, b], want, rtol=0, atol=0)
    t = torch.randn(6, 9, 4, 5, dtype=torch.float64)
    folded = official.Fold().double()(t)                       # [6, 1, 4, 5]
    lhs = (u.reshape(6, 9, 4, 5) * t).sum()
    rhs = (s.reshape(6, 1, 4, 5) * folded).sum()
    torch.testing.assert_close(lhs, rhs)
