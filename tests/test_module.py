"""SuperTokenAttention: semantics (padding, iterations, gradients), state dict, errors."""
import pytest
import torch

import stvit_kernels as sk
from stvit_kernels import SuperTokenAttention

from .sta_naive import sta_forward
from .utils import seed_for

# (C, heads, H, W, stoken_size, n_iter, refine_attention)
MODULE_CASES = [
    pytest.param(16, 2, 16, 16, (8, 8), 1, True, id="C16-16x16-s8-it1"),
    pytest.param(16, 2, 13, 21, (4, 5), 1, True, id="C16-13x21-s4x5-pad"),
    pytest.param(8, 1, 5, 3, (8, 8), 1, True, id="C8-5x3-s8-smaller-than-one-stoken"),
    pytest.param(12, 3, 17, 9, (4, 4), 2, True, id="C12-17x9-s4-it2-pad"),
    pytest.param(8, 2, 12, 12, (3, 2), 3, True, id="C8-12x12-s3x2-it3"),
    pytest.param(10, 1, 11, 14, (4, 3), 2, False, id="C10-11x14-s4x3-it2-convrefine"),
    pytest.param(6, 3, 8, 8, (2, 8), 1, True, id="C6-8x8-s2x8"),
]


def _refine_of(m):
    return m.stoken_refine if m.refine else None


@pytest.mark.parametrize("C,heads,H,W,size,n_iter,refine_attention", MODULE_CASES)
def test_module_matches_naive(C, heads, H, W, size, n_iter, refine_attention):
    torch.manual_seed(seed_for("module", C, H, W, size, n_iter))
    m = SuperTokenAttention(C, size, n_iter=n_iter, refine_attention=refine_attention,
                            num_heads=heads, qkv_bias=True, backend="reference").double()
    x = torch.randn(2, C, H, W, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    g = torch.randn_like(y)
    dx, *dparams = torch.autograd.grad(y, [x, *m.parameters()], g)

    x2 = x.detach().clone().requires_grad_()
    y2 = sta_forward(x2, m.stoken_size, n_iter, C ** -0.5, _refine_of(m))
    dx2, *dparams2 = torch.autograd.grad(y2, [x2, *m.parameters()], g)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx, dx2, rtol=1e-10, atol=1e-10)
    for a, b in zip(dparams, dparams2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradient_flows_through_num_only():
    """The module's input gradient equals the one of the same computation written with the ops and
    the association (and the normaliser) detached."""
    torch.manual_seed(seed_for("detached"))
    C, size = 8, (4, 4)
    m = SuperTokenAttention(C, size, num_heads=2, backend="reference").double()
    x = torch.randn(1, C, 12, 8, dtype=torch.float64, requires_grad=True)
    dx = torch.autograd.grad(m(x).square().sum(), x)[0]

    x2 = x.detach().clone().requires_grad_()
    with torch.no_grad():
        A = sk.stoken_affinity(x2, torch.nn.functional.avg_pool2d(x2, size), size)
        den = sk.stoken_aggregate(x2, A, size)[1]
    num = sk.stoken_aggregate(x2, A, size)[0]
    y2 = sk.stoken_upsample(m.stoken_refine(num / (den + 1e-12)), A, size)
    dx2 = torch.autograd.grad(y2.square().sum(), x2)[0]
    torch.testing.assert_close(dx, dx2, rtol=1e-10, atol=1e-10)


def test_stoken_size_one_is_refine_only():
    torch.manual_seed(seed_for("1x1"))
    m = SuperTokenAttention(16, 1, num_heads=4)
    x = torch.randn(2, 16, 7, 5)
    torch.testing.assert_close(m(x), m.stoken_refine(x))
    m = SuperTokenAttention(16, (1, 1), refine=False)
    assert torch.equal(m(x), x)


def test_refine_attention_head_channel_order():
    """qkv output is split into q, k, v inside each head: [q_h0 k_h0 v_h0 q_h1 k_h1 v_h1 ...]."""
    torch.manual_seed(seed_for("heads"))
    C, heads = 8, 2
    m = sk.RefineAttention(C, num_heads=heads, qkv_bias=True)
    x = torch.randn(1, C, 3, 4)
    d = C // heads
    qkv = m.qkv(x).reshape(1, 3 * C, 12)
    outs = []
    for hd in range(heads):
        base = hd * 3 * d
        q, k, v = (qkv[:, base + i * d: base + (i + 1) * d] for i in range(3))  # [1, d, N]
        attn = (q.transpose(1, 2) @ k * d ** -0.5).softmax(-1)  # [1, N, N]
        outs.append((attn @ v.transpose(1, 2)).transpose(1, 2))
    expected = m.proj(torch.cat(outs, 1).reshape(1, C, 3, 4))
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


def test_state_dict_names_and_official_keys():
    m = SuperTokenAttention(32, 4, num_heads=4, qkv_bias=True)
    assert set(m.state_dict()) == {"stoken_refine.qkv.weight", "stoken_refine.qkv.bias",
                                   "stoken_refine.proj.weight", "stoken_refine.proj.bias"}
    conv = SuperTokenAttention(32, 4, refine_attention=False)
    assert {k.rsplit(".", 1)[0] for k in conv.state_dict()} == {
        "stoken_refine.0", "stoken_refine.1", "stoken_refine.2"}
    official = {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    eye = torch.eye(9).reshape(9, 1, 3, 3)
    official.update({"unfold.weights": eye, "fold.weights": eye.clone()})
    m.load_state_dict(official)  # strict: the two constant buffers are dropped
    for k, v in m.state_dict().items():
        assert torch.equal(v, official[k])


def test_n_iter_changes_output():
    torch.manual_seed(seed_for("iters"))
    x = torch.randn(1, 8, 16, 16)
    m1 = SuperTokenAttention(8, 4, n_iter=1, num_heads=1)
    m2 = SuperTokenAttention(8, 4, n_iter=2, num_heads=1)
    m2.load_state_dict(m1.state_dict())
    assert not torch.allclose(m1(x), m2(x))


def test_module_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SuperTokenAttention(10, 4, num_heads=3)
    with pytest.raises(ValueError, match="n_iter"):
        SuperTokenAttention(8, 4, n_iter=0)
    with pytest.raises(ValueError, match="stoken_size"):
        SuperTokenAttention(8, 0)
    with pytest.raises(ValueError, match=r"x.shape=\(1, 4, 8, 8\)"):
        SuperTokenAttention(8, 4, num_heads=1)(torch.randn(1, 4, 8, 8))


def test_empty_batch():
    m = SuperTokenAttention(8, 4, num_heads=2)
    x = torch.randn(0, 8, 9, 9, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 8, 9, 9)
    y.sum().backward()
    assert x.grad.shape == x.shape


def _sdpa_cases():
    from torch.nn.attention import SDPBackend

    cases = [pytest.param("cpu", torch.float32, SDPBackend.FLASH_ATTENTION, id="cpu-f32-flash")]
    if torch.cuda.is_available():
        cases += [pytest.param("cuda", torch.float32, SDPBackend.EFFICIENT_ATTENTION,
                               id="cuda-f32-efficient", marks=pytest.mark.cuda),
                  pytest.param("cuda", torch.float16, SDPBackend.FLASH_ATTENTION,
                               id="cuda-f16-flash", marks=pytest.mark.cuda),
                  pytest.param("cuda", torch.bfloat16, SDPBackend.FLASH_ATTENTION,
                               id="cuda-bf16-flash", marks=pytest.mark.cuda)]
    return cases


@pytest.mark.parametrize("device,dtype,kernel", _sdpa_cases())
@pytest.mark.parametrize("H,W", [(1, 1), (2, 3), (7, 7)], ids=["N1", "N6", "N49"])
@pytest.mark.parametrize("dim,heads", [(64, 1), (64, 2), (128, 4)])
def test_refine_attention_takes_the_fast_sdpa_kernels(device, dtype, kernel, H, W, dim, heads,
                                                      monkeypatch):
    """The refine's SDPA path (taken beyond REFINE_FUSED_MAX_TOKENS tokens or with attention
    dropout; forced here for every N) hands SDPA q / k / v in a layout its fused kernels accept
    for any number of super tokens, one included (with only that kernel allowed, SDPA raises
    rather than fall back), and the result is the math kernel's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import stvit_kernels.module as module_mod

    monkeypatch.setattr(module_mod, "REFINE_FUSED_MAX_TOKENS", 0)
    torch.manual_seed(seed_for("sdpa-layout", device, dtype, H, W, dim, heads))
    m = sk.RefineAttention(dim, num_heads=heads, qkv_bias=True).to(device=device, dtype=dtype)
    x = torch.randn(2, dim, H, W, device=device, dtype=dtype)
    with sdpa_kernel([kernel]):
        y = m(x)
    with sdpa_kernel([SDPBackend.MATH]):
        y_math = m(x)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_math, **tol)
