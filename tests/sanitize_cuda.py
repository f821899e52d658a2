"""Every CUDA kernel of the extension on a few shapes, for NVIDIA compute-sanitizer (part of
``make test-gpu``)::

    compute-sanitizer --tool memcheck  --error-exitcode 1 python3 tests/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 tests/sanitize_cuda.py

Shapes: odd sizes, h != w, 1 x 1 grids, C = 1, channels beyond one shared-memory chunk, cells of
more pixels than a thread block, rows of more cells than one tile (masked threads, partial tiles and
chunks), in every dtype; every op: affinity (softmax and logits), aggregate (with x cached on chip
and not), upsample, the fused affinity + aggregation with and without the normalising reduction
(associate, its pooling, n_iter 2) and associate_backward; the refine attention's kernels
(forward, and the attention core of the backward) on REFINE_SHAPES. The outputs are checked against the
reference too, so a run that the sanitizer passes also computed the right numbers.
"""
import sys

import torch

import stvit_kernels  # noqa: F401  (loads the extension)
from stvit_kernels import reference as ref

# (B, C, H, W, h, w)
SHAPES = [
    (2, 16, 16, 16, 8, 8),
    (1, 3, 9, 15, 3, 5),
    (2, 5, 8, 8, 8, 8),
    (1, 1, 12, 8, 4, 4),
    (1, 70, 16, 24, 8, 8),
    (1, 3, 17, 40, 17, 20),
    (2, 4, 3, 80, 1, 1),
    (1, 300, 8, 8, 4, 4),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def check(name, got, want, dtype, info):
    err = (got.double() - want).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    if not err <= TOL[dtype] * scale:
        print(f"FAIL {name} {info}: max error {err:.3g}")
        return False
    return True


def run(B, C, H, W, h, w, dtype):
    ops = torch.ops.stvit
    g = torch.Generator().manual_seed(B * 1000 + C * 10 + h)
    x64 = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    s64 = torch.randn(B, C, H // h, W // w, generator=g, dtype=torch.float64)
    A64 = torch.randn(B, 9, H, W, generator=g, dtype=torch.float64).softmax(1)
    x, s, A = (t.to("cuda", dtype) for t in (x64, s64, A64))
    x64, s64, A64 = (t.to(dtype).double() for t in (x64, s64, A64))  # truth on the rounded inputs
    scale = C ** -0.5
    info = f"B{B} C{C} {H}x{W} s{h}x{w} {dtype}"
    ok = True
    for softmax in (True, False):
        ok &= check(f"affinity(softmax={softmax})", ops.affinity(x, s, h, w, scale, softmax).cpu(),
                    ref.affinity(x64, s64, h, w, scale, softmax), dtype, info)
    num, den = ops.aggregate(x, A, h, w)
    n_ref, d_ref = ref.aggregate(x64, A64, h, w)
    ok &= check("aggregate.num", num.cpu(), n_ref, dtype, info)
    ok &= check("aggregate.den", den.cpu(), d_ref, dtype, info)
    ok &= check("upsample", ops.upsample(s, A, h, w).cpu(), ref.upsample(s64, A64, h, w), dtype, info)
    Af, nf, df = ops.affinity_aggregate(x, s, h, w, scale)
    nr, dr = ref.aggregate(x64, Af.cpu().double(), h, w)
    ok &= check("affinity_aggregate.num", nf.cpu(), nr, dtype, info)
    stokens, A2, den2 = ops.associate(x, None, h, w, scale, 2)
    torch.testing.assert_close(ops.pool(x, h, w).cpu().double(),
                               torch.nn.functional.avg_pool2d(x64, (h, w)),
                               rtol=TOL[dtype], atol=TOL[dtype])
    n2, d2 = ref.aggregate(x64, A2.cpu().double(), h, w)
    ok &= check("associate.stokens", stokens.cpu(), n2 / (d2 + 1e-12), dtype, info)
    want_gx = ref.upsample(s64 / (den2.cpu().double() + 1e-12), A2.cpu().double(), h, w)
    for g in (s, s.to(memory_format=torch.channels_last)):  # token-major: read in place
        gx = ops.associate_backward(g, A2, den2, h, w)
        ok &= check("associate_backward", gx.cpu(), want_gx, dtype, info)
    if dtype in (torch.float16, torch.bfloat16):
        ok &= run_folded_casts(B, C, H, W, h, w, dtype, info)
    return ok


def run_folded_casts(B, C, H, W, h, w, dtype, info):
    """The module step under autocast (sta_forward's dtype, sta_backward's x_dtype): float32 x
    read by the pool and fused kernels, the gradient into x written as float32 by the normalised
    upsampling; the same bits as the casts done apart."""
    ops = torch.ops.stvit
    g = torch.Generator().manual_seed(C * 7 + h)
    xf = torch.randn(B, C, H, W, generator=g).cuda()
    W_ = [torch.randn(3 * C, C, 1, 1, generator=g).cuda() * C ** -0.5, None,
          torch.randn(C, C, 1, 1, generator=g).cuda() * C ** -0.5, torch.randn(C, generator=g).cuda()]
    half_W = [None if t is None else t.to(dtype) for t in W_]
    args = (h, w, C ** -0.5, 1, 1, C ** -0.5)
    got = ops.sta_forward(xf, *W_, *args, dtype)
    want = ops.sta_forward(xf.to(dtype), *half_W, *args)
    ok = all(torch.equal(a, b) for a, b in zip(got, want))
    gy = torch.randn(B, C, H, W, generator=g).to("cuda", dtype)
    dx = ops.sta_backward(gy, *got[1:], W_[0], W_[2], h, w, 1, C ** -0.5, torch.float32)[0]
    dx_half = ops.sta_backward(gy, *want[1:], half_W[0], half_W[2], h, w, 1, C ** -0.5)[0]
    ok &= dx.dtype == torch.float32 and torch.equal(dx, dx_half.float())
    if not ok:
        print(f"FAIL folded casts {info}: not the results of the casts done apart")
    return ok


# (B, C, H, W, heads, bias): STViT-S stages 1 and 2; odd tokens and head_dim 2; > 48 KB of
# shared memory (opt-in)
REFINE_SHAPES = [(2, 64, 7, 7, 1, True), (2, 128, 4, 4, 2, False), (1, 6, 3, 5, 3, True),
                 (1, 8, 10, 10, 2, True)]


def run_refine(B, C, H, W, heads, bias, dtype):
    """refine_attention_forward and _backward on CUDA (the refine kernels take these shapes)
    against the same operators in float64 on the CPU."""
    g = torch.Generator().manual_seed(B * 1000 + C * 10 + heads)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    args64 = [rnd(B, C, H, W), rnd(3 * C, C, 1, 1) * C ** -0.5, rnd(3 * C) if bias else None,
              rnd(C, C, 1, 1) * C ** -0.5, rnd(C) if bias else None]
    grad64 = rnd(B, C, H, W)
    args64 = [None if t is None else t.to(dtype).double() for t in args64]
    grad64 = grad64.to(dtype).double()
    scale = (C // heads) ** -0.5
    ops = torch.ops.stvit

    def both(args, grad):
        out, qkvh, attn, o = ops.refine_attention_forward(*args, heads, scale)
        grads = ops.refine_attention_backward(grad, args[0], qkvh, attn, o, args[1], args[3], heads,
                                              scale)
        return [out, o] + list(grads)

    got = both([None if t is None else t.to("cuda", dtype) for t in args64], grad64.to("cuda", dtype))
    want = both(args64, grad64)
    info = f"refine B{B} C{C} {H}x{W} heads{heads} {dtype}"
    names = ("out", "o", "ds", "dqkv_w", "dqkv_b", "dproj_w", "dproj_b")
    return all([check(f"refine.{n}", a.cpu(), w, dtype, info) for n, a, w in zip(names, got, want)])


def main():
    assert torch.cuda.is_available(), "needs a GPU"
    assert "cuda" in stvit_kernels.available_backends(), stvit_kernels.explain(torch.empty(1, device="cuda"))
    ok = True
    n = 0
    for shape in SHAPES:
        for dtype in DTYPES:
            ok &= run(*shape, dtype)
            n += 1
    for shape in REFINE_SHAPES:
        for dtype in DTYPES:
            ok &= run_refine(*shape, dtype)
            n += 1
    torch.cuda.synchronize()
    print(f"{n} cases, {'all passed' if ok else 'FAILURES'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
