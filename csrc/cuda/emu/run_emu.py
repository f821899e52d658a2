"""Runs the CUDA kernels of csrc/cuda on the CPU, under a host emulator, against the reference.

No GPU needed: emu_ext.cpp compiles sta_kernels.cuh + sta_launch.cuh (the very code the CUDA build
uses) with g++, emu_shim.h standing in for the CUDA built-ins. The threads of a block run one at a
time, in a random / reversed / in-order sequence between two barriers, so a missing __syncthreads
gives wrong numbers; outputs, workspace and shared memory start NaN-poisoned, so an element never
written shows. Plan limits are varied to drive every code path (channel chunks, several batches
per tile, large cells, no x cache, opted-in shared memory).

    python csrc/cuda/emu/run_emu.py            # full sweep, ~8 min on 2 cores
    QUICK=1 python csrc/cuda/emu/run_emu.py    # the sm_90 and sm_80 production limits only, ~2 min
"""
import glob, hashlib, itertools, os, sys, time
import torch
from torch.utils.cpp_extension import load

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT)
from stvit_kernels import reference as ref

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.environ.get("STVIT_CUDA_DIR", os.path.join(ROOT, "csrc", "cuda"))
_h = hashlib.sha1(b"".join(open(f, "rb").read() for f in sorted(glob.glob(CUDA_DIR + "/*.cuh")) + [os.path.join(HERE, "emu_ext.cpp"), os.path.join(HERE, "emu_shim.h")])).hexdigest()[:10]
# the torch release in the name too: venvs with different torches never share a build
_torch = torch.__version__.split("+")[0].replace(".", "_")
emu = load(name=os.environ.get("STVIT_EMU_NAME", "stvit_emu") + f"_{_h}_torch{_torch}", sources=[os.path.join(HERE, "emu_ext.cpp")],
           extra_include_paths=[HERE, CUDA_DIR, os.path.join(ROOT, "csrc")],
           extra_cflags=["-O1", "-std=c++20", "-Wno-unknown-pragmas"], verbose=False)

# poison every at::empty (outputs and workspace) with NaN: an element a kernel forgets shows
torch.use_deterministic_algorithms(True)
torch.utils.deterministic.fill_uninitialized_memory = True

CONFIGS = {  # (max_threads, smem_soft, smem_max, smem_block, max_chunk, cache_x, tile_pixels, cell_units,
             #  upsample_pixels)
    "prod":      (256, 48 * 1024, 227 * 1024, 55 * 1024, 1 << 30, True, 1024, True, 4),  # sm_90's limits
    "sm80":      (256, 48 * 1024, 163 * 1024, 40 * 1024, 1 << 30, True, 1024, True, 4),  # sm_80's limits
    "columns":   (256, 48 * 1024, 227 * 1024, 55 * 1024, 1 << 30, True, 1024, False, 2), # sm_90's, column units, 2-pixel upsample
    "chunk8":    (256, 48 * 1024, 227 * 1024, 48 * 1024, 8, True, 1024, True, 4),       # many s chunks (double: 4)
    "threads32": (32, 48 * 1024, 227 * 1024, 48 * 1024, 1 << 30, True, 1024, True, 4),  # many batches per tile
    "tile1":     (64, 48 * 1024, 227 * 1024, 48 * 1024, 1 << 30, True, 1, True, 1),     # tile = block (large cells loop), 1-pixel upsample
    "nocache":   (64, 48 * 1024, 48 * 1024, 48 * 1024, 8, False, 200, True, 2),         # partial sums re-read x
    "nocache_columns": (64, 48 * 1024, 48 * 1024, 48 * 1024, 8, False, 200, False, 1),  # the same, column units
    "optin":     (256, 20000, 227 * 1024, 20000, 1 << 30, True, 1024, True, 4),         # x cache only with opt-in smem
}
# the production plans of sm_90 and sm_80, and sm_90's with column units and 2-pixel upsampling
# threads (QUICK=1, CI)
QUICK_CONFIGS = ("prod", "sm80", "columns")
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

def rel_err(a, b):
    a, b = a.double(), b.double()
    assert not torch.isnan(a).any(), "NaN in output (unwritten element?)"
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

def check(name, out, want, dtype, info):
    e = rel_err(out, want)
    ok = e <= TOL[dtype]
    if not ok:
        print(f"FAIL {name} {info} err={e:.3e}")
    return ok

def same(name, out, want, info):
    """Bit for bit (the folded casts against the casts done apart), NaN poison included."""
    ok = out.dtype == want.dtype and out.shape == want.shape and torch.equal(out, want)
    if not ok:
        print(f"FAIL {name} {info}: not equal to the cast done apart")
    return ok

def run_case(B, C, H, W, h, w, dtype, cfg_name, order, seed):
    g = torch.Generator().manual_seed(seed)
    hh, ww = H // h, W // w
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    s = torch.randn(B, C, hh, ww, generator=g, dtype=torch.float64)
    A = torch.randn(B, 9, H, W, generator=g, dtype=torch.float64).softmax(1)
    scale = C ** -0.5 if C else 1.0
    xd, sd, Ad = x.to(dtype), s.to(dtype), A.to(dtype)
    x64, s64, A64 = xd.double(), sd.double(), Ad.double()   # truth on the rounded inputs
    half = dtype in (torch.float16, torch.bfloat16)
    x32 = x.float()   # the folded casts' float32 pixels
    cfg = CONFIGS[cfg_name] + (order, seed)
    info = f"B{B} C{C} {H}x{W} s{h}x{w} {str(dtype)[6:]} {cfg_name} order{order}"
    ok = True
    # affinity, softmax and logits
    for sm in (True, False):
        Ao = emu.affinity(xd, sd, h, w, scale, sm, *cfg)
        ok &= check(f"affinity(softmax={sm})", Ao, ref.affinity(x64, s64, h, w, scale, sm), dtype, info)
    # aggregate
    num, den = emu.aggregate(xd, Ad, h, w, False, False, *cfg)
    n_ref, d_ref = ref.aggregate(x64, A64, h, w)
    if C: ok &= check("aggregate.num", num, n_ref, dtype, info)
    ok &= check("aggregate.den", den, d_ref, dtype, info)
    # aggregate with an arbitrary (signed) A, as the backward passes call it: den, then num
    # token-major and ones for den, as sta_backward asks for them (num the same values,
    # channels_last strides)
    Ag = torch.randn(B, 9, H, W, generator=g, dtype=torch.float64).to(dtype)
    num2, den2 = emu.aggregate(xd, Ag, h, w, False, False, *cfg)
    n2, d2 = ref.aggregate(x64, Ag.double(), h, w)
    if C: ok &= check("aggregate(signed A).num", num2, n2, dtype, info)
    ok &= check("aggregate(signed A).den", den2, d2, dtype, info)
    num3, ones = emu.aggregate(xd, Ag, h, w, True, True, *cfg)
    if C:
        ok &= check("aggregate(signed A, token-major).num", num3, n2, dtype, info)
        if not num3.permute(0, 2, 3, 1).is_contiguous():
            print(f"FAIL aggregate(token-major): num strides {num3.stride()} [{info}]"); ok = False
    if not (ones.shape == den2.shape and bool((ones == 1).all())):
        print(f"FAIL aggregate(den_ones): not all ones [{info}]"); ok = False
    # upsample; also with A at an offset of one element (its vectors misaligned: 1 pixel a thread)
    if C:
        y = emu.upsample(sd, Ad, h, w, *cfg)
        ok &= check("upsample", y, ref.upsample(s64, A64, h, w), dtype, info)
        A_off = torch.cat([Ad.flatten(), Ad.flatten()[:1]])[1:].view_as(Ad)
        A_off.copy_(Ad)
        ok &= same("upsample(A misaligned)", emu.upsample(sd, A_off, h, w, *cfg), y, info)
        y2 = emu.upsample(sd, Ag, h, w, *cfg)
        ok &= check("upsample(signed A)", y2, ref.upsample(s64, Ag.double(), h, w), dtype, info)
        # associate_backward's: s token-major (channels_last strides), divided by den + 1e-12
        den = (torch.rand(B, 1, hh, ww, generator=g, dtype=torch.float64) * 8 + 0.5).to(dtype)
        s_tm = sd.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        for s_in in (sd, s_tm):
            y3 = emu.upsample_normalised(s_in, Ag, den, h, w, None, *cfg)
            ok &= check(f"upsample_normalised(token-major={not s_in.is_contiguous()})", y3,
                        ref.upsample(s64 / (den.double() + 1e-12), Ag.double(), h, w), dtype, info)
            if half:  # float32 out: the same values, widened (autograd's cast folded in)
                y4 = emu.upsample_normalised(s_in, Ag, den, h, w, torch.float32, *cfg)
                ok &= same(f"upsample_normalised(float32 out, token-major={not s_in.is_contiguous()})",
                           y4, y3.float(), info)
    # pool (the initial super tokens): contiguous, and at an offset of one element (scalar loads)
    for xp in (xd, torch.cat([xd.flatten(), xd.flatten()[:1]])[1:].view_as(xd)):
        got = emu.pool(xp, h, w, None, *cfg)
        want = xp.double().reshape(B, C, hh, h, ww, w).mean((3, 5))  # avg_pool2d, any C
        ok &= got.shape == want.shape and (C == 0 or check("pool", got, want, dtype, info))
    if half:  # float32 x, the cast to dtype folded in: the results of the cast done apart
        for xp in (x32, torch.cat([x32.flatten(), x32.flatten()[:1]])[1:].view_as(x32)):
            ok &= same("pool(float32 x)", emu.pool(xp, h, w, dtype, *cfg),
                       emu.pool(xp.to(dtype), h, w, None, *cfg), info)
        for norm in (False, True):
            got = emu.affinity_aggregate(x32, sd, h, w, scale, norm, False, *cfg)
            want = emu.affinity_aggregate(x32.to(dtype), sd, h, w, scale, norm, False, *cfg)
            for name, a, b in zip(("A", "num", "den"), got, want):
                ok &= same(f"fused(float32 x, normalise={norm}).{name}", a, b, info)
    # fused
    Af, nf, df = emu.affinity_aggregate(xd, sd, h, w, scale, False, False, *cfg)
    Aa = emu.affinity(xd, sd, h, w, scale, True, *cfg)
    if not torch.equal(Af, Aa):
        print(f"FAIL fused A != affinity A {info}"); ok = False
    ok &= check("fused.A", Af, ref.affinity(x64, s64, h, w, scale), dtype, info)
    # the fused partial sums use the stored (rounded) A: compare with aggregate of that A
    nr, dr = ref.aggregate(x64, Af.double(), h, w)
    if C: ok &= check("fused.num", nf, nr, dtype, info)
    ok &= check("fused.den", df, dr, dtype, info)
    # fused with the normalising reduction (associate): num / (den + 1e-12), den unchanged; the
    # super tokens token-major as sta_forward asks for them, then contiguous (the same values)
    An, sn, dn = emu.affinity_aggregate(xd, sd, h, w, scale, True, True, *cfg)
    if not (torch.equal(An, Af) and torch.equal(dn, df)):
        print(f"FAIL normalised fused A / den != fused {info}"); ok = False
    if C:
        ok &= check("fused.normalised (token-major)", sn, nr / (dr + 1e-12), dtype, info)
        if not sn.permute(0, 2, 3, 1).is_contiguous():
            print(f"FAIL fused.normalised (token-major): strides {sn.stride()} [{info}]"); ok = False
        sc = emu.affinity_aggregate(xd, sd, h, w, scale, True, False, *cfg)[1]
        ok &= sc.is_contiguous() and same("fused.normalised contiguous", sc, sn.contiguous(), info)
    return ok

def refine_truth(s, wqkv, bqkv, wproj, bproj, heads, scale):
    """The refine attention in float64 PyTorch: (out, qkvh, attn, o) as refine_attention_forward."""
    B, C, H, W = s.shape
    N, d = H * W, C // heads
    qkv = s.reshape(B, C, N).transpose(1, 2) @ wqkv.reshape(3 * C, C).T
    if bqkv is not None: qkv = qkv + bqkv
    qkvh = qkv.view(B, N, heads, 3, d).permute(3, 0, 2, 1, 4).reshape(3, B * heads, N, d)
    attn = (scale * qkvh[0] @ qkvh[1].transpose(1, 2)).softmax(-1)
    o = (attn @ qkvh[2]).view(B, heads, N, d).transpose(1, 2).reshape(B * N, C)
    out = o @ wproj.reshape(C, C).T
    if bproj is not None: out = out + bproj
    return out.view(B, N, C).transpose(1, 2).reshape(B, C, H, W), qkvh, attn, o

def run_refine_case(B, C, H, W, heads, bias, dtype, order, seed):
    g = torch.Generator().manual_seed(seed)
    N, d = H * W, C // heads
    scale = d ** -0.5
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    s, wqkv, wproj = rnd(B, C, H, W), rnd(3 * C, C, 1, 1) * C ** -0.5, rnd(C, C, 1, 1) * C ** -0.5
    bqkv, bproj = (rnd(3 * C), rnd(C)) if bias else (None, None)
    dbl = lambda t: None if t is None else t.double()
    want = refine_truth(*map(dbl, (s, wqkv, bqkv, wproj, bproj)), heads, scale)
    cfg = CONFIGS["prod"] + (order, seed)
    info = f"refine B{B} C{C} {H}x{W} heads{heads} bias{int(bias)} {str(dtype)[6:]} order{order}"
    ok = True
    for contiguous in (True, False):
        # s token-major (sta_forward's super tokens) with a token-major out, contiguous with the other
        s_in = s if contiguous else s.contiguous(memory_format=torch.channels_last)
        got = emu.refine_forward(s_in, wqkv, bqkv, wproj, bproj, heads, scale, contiguous, *cfg)
        if got[0].is_contiguous() != (contiguous or N == 1):
            print(f"FAIL refine out layout {info}"); ok = False
        for name, a, b in zip(("out", "qkvh", "attn", "o"), got, want):
            ok &= check(f"refine.{name}", a, b, dtype, info)
    # the attention core's backward: dqkv [B * N, 3C] (channels (h, q/k/v, e)) from go and the
    # forward's qkvh / attn, against autograd in float64
    _, qkvh, attn, _ = got
    go = rnd(B * N, C)
    q, k, v = (t.double().requires_grad_() for t in qkvh.unbind(0))
    o = (scale * q @ k.transpose(1, 2)).softmax(-1) @ v
    go_h = go.double().view(B, N, heads, d).transpose(1, 2).reshape(B * heads, N, d)
    grads = torch.autograd.grad(o, (q, k, v), go_h)
    want_dqkv = torch.stack(grads).view(3, B, heads, N, d).permute(1, 3, 2, 0, 4).reshape(B * N, 3 * C)
    dqkv = emu.refine_core_backward(go, qkvh, attn, B, N, heads, scale, *cfg)
    ok &= check("refine.dqkv", dqkv, want_dqkv, dtype, info)
    return ok

REFINE_SHAPES = [  # (B, C, H, W, heads, bias)
    (2, 16, 2, 2, 1, True),
    (1, 64, 7, 7, 1, True),    # stage 1 of STViT-S at 224: 49 super tokens, 64 channels
    (2, 128, 4, 4, 2, False),  # stage 2: 16 super tokens, 2 heads
    (1, 6, 3, 5, 3, True),     # odd N, head_dim 2
    (3, 5, 1, 1, 1, True),     # one super token
    (1, 12, 1, 7, 4, False),   # odd head_dim (3)
    (1, 8, 10, 10, 2, True),   # 100 tokens: > 48 KB of shared memory (opt-in)
]

SHAPES = [  # (B, C, H, W, h, w)
    (2, 16, 16, 16, 8, 8),   # grid 2x2
    (1, 3, 9, 15, 3, 5),     # odd, h != w
    (2, 5, 8, 8, 8, 8),      # 1x1 grid
    (1, 1, 12, 8, 4, 4),     # C = 1
    (3, 13, 14, 21, 7, 3),
    (2, 8, 8, 16, 8, 8),     # grid 1x2
    (1, 20, 28, 28, 4, 4),   # 7x7 grid (stage-2 like)
    (2, 9, 6, 10, 1, 2),     # h = 1
    (1, 7, 10, 10, 2, 2),    # 5x5 grid
    (1, 6, 5, 7, 1, 1),      # 1x1 cells (tile of many cells)
    (1, 4, 7, 9, 7, 1),      # w = 1
    (1, 5, 32, 16, 16, 16),  # 256-pixel cells, grid 2x1
    (1, 3, 17, 40, 17, 20),  # 340-pixel cells (> 256 threads)
    (1, 70, 16, 24, 8, 8),   # C not a multiple of the vector width, > one chunk of 64
    (1, 0, 8, 8, 4, 4),      # C = 0
    (2, 4, 3, 80, 1, 1),     # wide row of 1x1 cells (> 64 cells per row: several tiles)
    (1, 3, 4, 260, 2, 2),    # 130 cells per row
    (1, 128, 8, 28, 4, 4),   # stage-2 channels and cells: prod 7 x 33 cell units in 256 threads for
                             # 112 pixels (until 2026-12-07 column units)
    (2, 64, 16, 64, 8, 8),   # stage-1 channels and cells, 8 cells a row: cell units without den's
                             # vector (8 x 16 in 128 threads, prod)
    (1, 36, 24, 112, 8, 4),  # C = 9 V, 28 cells a tile: 28 x 9 units in 256 threads, den's 9 sums
                             # on every unit of a cell (prod, float32), 3 cell rows (all 9 used)
]

# sm_90's production plans at the STViT-S stages (fp32): (kind, C, h, w, ww) -> (threads, cells a
# tile, cell units); kind 1 the aggregation (the backward's), 2 the fused affinity + aggregate
SM90 = (227 * 1024, 228 * 1024 // 4 - 1024)  # (smem_max, smem_block)
STVIT_PLANS = {
    (2, 64, 8, 8, 7): (128, 7, 1),    # stage 1 at 224^2: 7 x 17 units
    (1, 64, 8, 8, 7): (128, 7, 1),
    (2, 64, 8, 8, 8): (128, 8, 1),    # 64^2 tokens: 8 x 16 units, den's vector left out
    (2, 64, 8, 8, 16): (256, 16, 1),  # 128^2 tokens: 16 x 16 units, two blocks a SM
    (2, 128, 4, 4, 7): (256, 7, 1),   # stage 2 at 224^2: 7 x 33 units for 112 pixels
    (1, 128, 4, 4, 7): (256, 7, 1),
}

def check_plans():
    ok = True
    for (kind, C, h, w, ww), want in STVIT_PLANS.items():
        BS, NC, NT, CK, SK, XC, CW, cache, smem, units = emu.plan(kind, C, h, w, ww, 4, 4, *SM90)
        if (BS, NC, units) != want or not cache:
            print(f"FAIL plan kind={kind} C={C} {h}x{w} ww={ww}: threads, cells, cell units "
                  f"{(BS, NC, units)} (x cache {cache}), want {want}")
            ok = False
    return ok

def main():
    quick = os.environ.get("QUICK")
    only = os.environ.get("SHAPES")
    if only:
        keep = [int(v) for v in only.split(",")]
        globals()["SHAPES"][:] = [SHAPES[i] for i in keep]
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    total = fails = 0
    t0 = time.time()
    if os.environ.get("DTYPES"):
        dtypes = [getattr(torch, d) for d in os.environ["DTYPES"].split(",")]
    total += 1
    fails += not check_plans()
    for i, shape in enumerate(SHAPES):
        for j, dt in enumerate(dtypes):
            for cfg in CONFIGS:
                order = (i + j) % 3
                if quick and cfg not in QUICK_CONFIGS: continue
                total += 1
                if not run_case(*shape, dt, cfg, order, seed=1000 * i + 10 * j + len(cfg)):
                    fails += 1
    for i, shape in enumerate(REFINE_SHAPES):
        for j, dt in enumerate(dtypes):
            total += 1
            if not run_refine_case(*shape, dt, (i + j) % 3, seed=7000 + 10 * i + j):
                fails += 1
    # B = 0
    x = torch.randn(0, 4, 8, 8); s = torch.randn(0, 4, 2, 2); A = torch.randn(0, 9, 8, 8)
    cfg = CONFIGS["prod"] + (0, 0)
    assert emu.affinity(x, s, 4, 4, 0.5, True, *cfg).shape == (0, 9, 8, 8)
    n, d = emu.aggregate(x, A, 4, 4, False, False, *cfg); assert n.shape == (0, 4, 2, 2) and d.shape == (0, 1, 2, 2)
    assert emu.upsample(s, A, 4, 4, *cfg).shape == (0, 4, 8, 8)
    a, n, d = emu.affinity_aggregate(x, s, 4, 4, 0.5, True, False, *cfg); assert a.shape == (0, 9, 8, 8) and n.shape == (0, 4, 2, 2)
    print(f"{total - fails}/{total} cases passed, {time.time() - t0:.0f}s")
    sys.exit(1 if fails else 0)

if __name__ == "__main__":
    main()
