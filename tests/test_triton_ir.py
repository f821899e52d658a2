"""The Triton kernels as the GPU compiler builds them: no TF32 anywhere, and no ``tt.dot`` but the ones
written in the source. Runs without a GPU.

Why. Tests that run the kernels under ``TRITON_INTERPRET=1`` (CI without a GPU) never run Triton's
compiler, and the compiler rewrites code: its combine pass (``CombineBroadcastMulReducePattern`` in
``lib/Dialect/Triton/Transforms/Combine.cpp``) turns ``tl.sum(a[:, :, None] * b[None, :, :], axis=1)``
into ``tt.dot(a, b)``. Up to Triton 3.6 that dot is built with ``inputPrecision = tf32``, and the
size check (>= 16) looks at M and N, never at K, so a broadcast product over 1..15 channels ran on
TF32 tensor cores: about 5e-4 off with K = 8 and plainly wrong (0.6) with K = 2 or 4 on an H200
(Triton 3.8 builds that dot as IEEE, but still builds it).

How. A subprocess without ``TRITON_INTERPRET`` (which replaces ``@triton.jit`` kernels by the
interpreter; ``conftest.py`` sets it when there is no GPU) loads ``stvit_kernels/triton_kernels.py``,
runs its host functions on small CPU tensors with every kernel launch replaced by a recorder, and
compiles each recorded launch for sm_90 (``GPUTarget("cuda", 90, 32)``) with the specialisation
Triton's own launcher computes from those arguments (strides equal to 1 or divisible by 16, pointer
alignment), down to PTX and a cubin (``ptxas`` ships with Triton): no GPU is needed. Then:
- the TTIR has exactly the ``tt.dot`` ops written in the kernel's source (none made by a compiler
  rewrite), each with every dimension >= 16;
- every ``tt.dot`` with float32 operands has IEEE input precision (no ``inputPrecision`` other than
  ``ieee``); every dot accumulates in float32 (float16 / bfloat16 / float32 operands) or float64;
- no float32 dot runs on tensor cores in the TTGIR (an ``#mma`` operand encoding, or a
  ``warp_group_dot``), and the PTX has no TF32 ``mma`` / ``wgmma`` instruction.
Control kernels show that the check fails where it should (the old broadcast pattern over K = 4,
an explicit TF32 dot) and passes an explicit IEEE dot.

The compiled kernels land in Triton's cache (``~/.triton/cache`` or ``TRITON_CACHE_DIR``), so a
second run takes ~30 s; a cold run compiles ~140 kernels (~1 s each, split over up to 4 processes:
1.5 to 3 minutes on 2 cores), ~180 with ``STVIT_LONG_TESTS=1`` (every float32 pair of channel
count and cell size).
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # the worker compiles; the interpreter would replace the kernels
    os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not importable")
import triton.language as tl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "stvit_kernels" / "triton_kernels.py"
ARCH = 90  # sm_90: H100 / H200, the GPUs this project runs on

# tt.dot ops written in each kernel's source (with the helpers it calls: _cell_logits has one per
# channel chunk, its loop unrolled: +1 for each chunk after the first, see _dots_written)
DOTS_WRITTEN = {
    "_affinity_kernel": 1, "_aggregate_kernel": 1, "_affinity_aggregate_kernel": 2,
    "_upsample_kernel": 1, "_reduce_kernel": 0, "_pool_kernel": 0,
}
#: kernels whose divisions must be IEEE (the pool's mean, num / (den + 1e-12): the C++ family and
#: ATen divide so, and associate is bitwise their composite); the softmax's is not checked
EXACT_DIVISION = ("_reduce_kernel", "_upsample_kernel", "_pool_kernel", "_control_div_kernel")
UNROLLED_OVER_CHUNKS = ("_affinity_kernel", "_affinity_aggregate_kernel")


def _dots_written(report: dict) -> int:
    extra = max(report["N_CC"] - 1, 0) if report["kernel"] in UNROLLED_OVER_CHUNKS else 0
    return DOTS_WRITTEN[report["kernel"]] + extra


def _case(dtype, C, h, w, grid=(2, 2), layout="contiguous", max_block_p=None, logits=False,
          stage=False):
    name = f"{dtype}-C{C}-s{h}x{w}"
    name += "" if grid == (2, 2) else f"-grid{grid[0]}x{grid[1]}"
    name += "" if layout == "contiguous" else f"-{layout}"
    name += "" if max_block_p is None else f"-maxP{max_block_p}"
    return dict(id=name, dtype=dtype, C=C, h=h, w=w, grid=grid, layout=layout,
                max_block_p=max_block_p, logits=logits, stage=stage)


LONG = os.environ.get("STVIT_LONG_TESTS", "0") not in ("", "0")
SMALL_C = (1, 3, 5, 8, 13)
LARGE_C = (16, 64, 128)
# Float32 plans: channel counts on both sides of 16 (a tl.dot dimension: fewer are padded), on
# cells of 2, 15, 16 and 64 pixels (fewer than 16 are padded too); every pair with
# STVIT_LONG_TESTS=1.
if LONG:
    F32 = [(C, h, w) for C in SMALL_C + LARGE_C for h, w in ((1, 2), (3, 5), (4, 4), (8, 8))]
else:
    F32 = ([(C, 1, 2) for C in (1, 13, 64)] + [(C, 3, 5) for C in (3, 8, 16, 128)]
           + [(C, 4, 4) for C in (13, 16)] + [(C, 8, 8) for C in (1, 5, 13, 16, 64, 128)])
# The STViT-S stage shapes as the model runs them (a 7x7 grid of super tokens: 56x56 tokens with
# 8x8 cells, 28x28 with 4x4; the row stride W is then not a multiple of 16, another
# specialisation than the 2x2 grids), in float32 and bfloat16: their resources are checked too.
STAGES = [_case(dt, C, h, w, grid=(7, 7), stage=True)
          for dt in ("float32", "bfloat16") for C, h, w in ((64, 8, 8), (128, 4, 4))]
# Plus every dtype, a 1-cell grid, channels_last inputs (other stride specialisations), cells of
# several pixel blocks, and the affinity without softmax (the logits) on a few of them.
CASES = (
    [_case("float32", C, h, w, logits=(C, h, w) in ((3, 3, 5), (64, 8, 8))) for C, h, w in F32]
    + [_case(dt, C, h, w, logits=C == 3) for dt in ("float16", "bfloat16") for C in (3, 64)
       for h, w in ((3, 5), (8, 8))]
    + [_case("float64", C, h, w) for C in (3, 64) for h, w in ((1, 2), (8, 8))]
    + [_case("float32", 5, 8, 8, grid=(1, 1))]
    + [_case("float32", C, 8, 8, layout="channels_last") for C in (3, 64)]
    + [_case("float32", C, 8, 8, max_block_p=16) for C in (5, 16)]
    + STAGES
)


# ------------------------------------------------------------------------------------------------
# Control kernels: the check must flag the first two and pass the third.
# ------------------------------------------------------------------------------------------------

@triton.jit
def _control_broadcast_kernel(p_x, p_s, p_o, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The old fallback: a 3-D broadcast product summed over its middle axis (K = BLOCK_C)."""
    o_p = tl.arange(0, BLOCK_P)
    o_c = tl.arange(0, BLOCK_C)
    o_k = tl.arange(0, 16)
    b_x = tl.load(p_x + o_p[:, None] * BLOCK_C + o_c[None, :])
    b_s = tl.load(p_s + o_c[:, None] * 16 + o_k[None, :])
    acc = tl.sum(b_x[:, :, None] * b_s[None, :, :], axis=1)
    tl.store(p_o + o_p[:, None] * 16 + o_k[None, :], acc)


@triton.jit
def _control_dot_kernel(p_x, p_s, p_o, PRECISION: tl.constexpr):
    o = tl.arange(0, 16)
    b_x = tl.load(p_x + o[:, None] * 16 + o[None, :])
    b_s = tl.load(p_s + o[:, None] * 16 + o[None, :])
    tl.store(p_o + o[:, None] * 16 + o[None, :], tl.dot(b_x, b_s, input_precision=PRECISION))


CONTROLS = {
    # name: (kernel, constexprs, dots intended)
    "broadcast-K4": ("_control_broadcast_kernel", dict(BLOCK_P=16, BLOCK_C=4), 0),
    "dot-tf32": ("_control_dot_kernel", dict(PRECISION="tf32"), 1),
    "dot-ieee": ("_control_dot_kernel", dict(PRECISION="ieee"), 1),
    "div-f32": ("_control_div_kernel", {}, 0),
}


@triton.jit
def _control_div_kernel(p_x, p_s, p_o):
    """Triton's own float32 ``/``: div.full.f32 on a GPU, which the check must flag."""
    o = tl.arange(0, 16)
    tl.store(p_o + o, tl.load(p_x + o) / tl.load(p_s + o))


# ------------------------------------------------------------------------------------------------
# Reading the IR (in the test process, on the reports of the worker)
# ------------------------------------------------------------------------------------------------

_ELT = r"(?:tensor|memdesc)<((?:\d+x)+)([a-z]+\d*)"


def _dots(ir: str, gpu: bool):
    """Every dot op of a TTIR (``gpu=False``) or TTGIR module: its name, the element types of its
    operands and result, its input precision (None: not printed, i.e. the default, IEEE) and
    whether it runs on tensor cores (an ``#mma`` operand encoding, or a ``warp_group_dot``)."""
    found = []
    for line in ir.splitlines():
        bare = re.sub(r"\{[^{}]*\}", "", line)  # attribute dicts, encodings' parameters
        m = re.search(r"=\s*(tt\.dot|tt\.dot_scaled|ttng\.warp_group_dot)\s", bare)
        if not m:
            continue
        types = bare[bare.index(" : ", m.end()):]
        prec = re.search(r"inputPrecision\s*=\s*(\w+)", line)
        operands = re.findall(_ELT, types)[:3]
        found.append(dict(op=m.group(1), elts=[elt for _, elt in operands],
                          shapes=[[int(n) for n in dims.split("x")[:-1]] for dims, _ in operands],
                          precision=prec.group(1) if prec else None,
                          tensor_cores=gpu and (m.group(1) != "tt.dot" or "parent = #mma" in line),
                          line=re.sub(r"\s*loc\(.*$", "", line.strip())[:300]))
    return found


def _ieee(precision) -> bool:
    # printed values: "ieee" (or 2 in a generic attribute dict, the enum's number, as in
    # "inputPrecision = 0 : i32" for TF32); absent means the attribute's default, IEEE
    return precision in (None, "ieee", "2")


def violations(report: dict, dots_intended: int):
    """Why one compiled kernel breaks the rules (empty: it does not)."""
    bad = []
    ttir = _dots(report["ttir"], gpu=False)
    if len(ttir) != dots_intended:
        bad.append(f"{len(ttir)} tt.dot in the TTIR, {dots_intended} written: "
                   + "; ".join(d["line"] for d in ttir))
    for d in ttir:
        if any(n < 16 for shape in d["shapes"][:2] for n in shape):
            bad.append(f"tt.dot with a dimension < 16: {d['line']}")
        if "f32" in d["elts"][:2] and not _ieee(d["precision"]):
            bad.append(f"float32 tt.dot with inputPrecision = {d['precision']}: {d['line']}")
        if d["elts"][2:] and d["elts"][2] != report["acc"]:
            bad.append(f"tt.dot accumulates in {d['elts'][2]}, not {report['acc']}: {d['line']}")
    for d in _dots(report["ttgir"], gpu=True):
        if "f32" in d["elts"][:2] and d["tensor_cores"]:
            bad.append(f"float32 dot on tensor cores in the TTGIR: {d['line']}")
    mma = sorted(set(re.findall(r"\b(?:mma|wgmma\.mma_async)\.[\w.]+", report["ptx"])))
    if any("tf32" in i for i in mma):
        bad.append(f"TF32 tensor-core instructions in the PTX: {mma}")
    approx = sorted(set(re.findall(r"\bdiv\.(?:full|approx)\.f32\b", report["ptx"])))
    if approx and report["kernel"] in EXACT_DIVISION:
        bad.append(f"approximate float32 division in the PTX ({approx}): _div, not /")
    if dots_intended == 0 and mma:
        bad.append(f"tensor-core instructions in the PTX of a kernel without tl.dot: {mma}")
    return bad


# ------------------------------------------------------------------------------------------------
# The worker (a subprocess: ``python tests/test_triton_ir.py OUT.json CASE_IDS...``)
# ------------------------------------------------------------------------------------------------

def _load_module(name: str, path: Path):
    """The Python file at ``path`` as a module of its own, registered as ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _load_kernels():
    """stvit_kernels/triton_kernels.py as a module of its own (the package's __init__ is not
    needed, nor the compiled extension)."""
    return _load_module("_stvit_triton_kernels_ir", KERNELS)


class _Compiler:
    """Compiles one launch (kernel + keyword arguments) the way ``JITFunction.run`` would, for
    the target alone: Triton's binder computes the signature, constexprs and specialisation."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", ARCH, 32)
        self.backend = make_backend(self.target)
        self.done = {}

    def __call__(self, fn, kwargs):
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs, debug=False)
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound,
                                                              specialization, options)
        key = repr((fn.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                    sorted(options.__dict__.items())))
        if key not in self.done:
            src = ASTSource(fn, signature, constexprs, attrs)
            kernel = triton.compile(src, target=self.target, options=options.__dict__)
            self.done[key] = {k: kernel.asm[k] for k in ("ttir", "ttgir", "ptx")}
            self.done[key].update(_resources(kernel.asm["cubin"]),
                                  num_warps=kernel.metadata.num_warps)
        return self.done[key]


def _resources(cubin: bytes) -> dict:
    """Registers per thread and stack (spill) bytes of a compiled kernel, from ``cuobjdump
    --dump-resource-usage`` (which ships with Triton, as ptxas does)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(3)))


def _record_launches(tk, case):
    """Run every host function of ``tk`` on the case's tensors; return the launches it makes."""
    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda **kwargs: launches.append((self.fn, kwargs))

    saved = {}
    for name in DOTS_WRITTEN:
        saved[name] = getattr(tk, name)
        setattr(tk, name, Recorder(saved[name]))
    saved_max_p = tk._MAX_BLOCK_P
    if case["max_block_p"]:
        tk._MAX_BLOCK_P = case["max_block_p"]
    try:
        dtype = getattr(torch, case["dtype"])
        C, h, w = case["C"], case["h"], case["w"]
        hh, ww = case["grid"]
        B, H, W = 2, hh * h, ww * w
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, C, H, W, generator=g).to(dtype)
        s = torch.randn(B, C, hh, ww, generator=g).to(dtype)
        A = torch.randn(B, 9, H, W, generator=g).softmax(1).to(dtype)
        if case["layout"] == "channels_last":
            x, s, A = (t.to(memory_format=torch.channels_last) for t in (x, s, A))
        scale = C ** -0.5
        tk.affinity(x, s, h, w, scale, True)
        if case["logits"]:
            tk.affinity(x, s, h, w, scale, False)
        tk.aggregate(x, A, h, w)
        tk.upsample(s, A, h, w)
        tk.affinity_aggregate(x, s, h, w, scale)
        tk.pool(x, h, w)
        tk.associate(x, None, h, w, scale, 1)  # the reduction with NORMALISE
        tk.associate_backward(s, A, s[:, :1].abs(), h, w)  # the upsampling with HAS_DEN
    finally:
        for name, fn in saved.items():
            setattr(tk, name, fn)
        tk._MAX_BLOCK_P = saved_max_p
    return launches


def _worker(out_path, case_ids):
    tk = _load_kernels()
    compile_ = _Compiler()
    by_id = {c["id"]: c for c in CASES}
    result = {"triton": triton.__version__, "cases": {}, "controls": {}}
    for cid in case_ids:
        if cid in CONTROLS:
            name, constexprs, _ = CONTROLS[cid]
            fn = globals()[name]
            f32 = torch.zeros(16 * 16)
            asm = compile_(fn, dict(p_x=f32, p_s=f32, p_o=f32, **constexprs))
            result["controls"][cid] = dict(asm, kernel=name, acc="f32")
            continue
        case = by_id[cid]
        acc = "f64" if case["dtype"] == "float64" else "f32"
        reports = []
        for fn, kwargs in _record_launches(tk, case):
            reports.append(dict(compile_(fn, kwargs), kernel=fn.__name__, acc=acc,
                                BLOCK_C=kwargs.get("BLOCK_C"), N_CC=kwargs.get("N_CC")))
        result["cases"][cid] = reports
    Path(out_path).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------

def _has_cuda_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


pytestmark = pytest.mark.skipif(not _has_cuda_backend(), reason="triton has no NVIDIA backend")


def _run_workers(ids, tmp: Path):
    """The worker over ``ids``, split over up to 4 processes (one per core)."""
    n = max(1, min(4, os.cpu_count() or 1, len(ids)))
    parts = [ids[i::n] for i in range(n)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(i):
        out = tmp / f"ir_{i}.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out), *parts[i]],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"IR worker failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        return json.loads(out.read_text())

    merged = {"cases": {}, "controls": {}}
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for part in pool.map(run, range(n)):
            merged["triton"] = part["triton"]
            merged["cases"].update(part["cases"])
            merged["controls"].update(part["controls"])
    return merged


@pytest.fixture(scope="module")
def compiled():
    with tempfile.TemporaryDirectory() as tmp:
        return _run_workers([c["id"] for c in CASES] + list(CONTROLS), Path(tmp))


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_no_tf32_and_dots_only_where_planned(compiled, case):
    reports = compiled["cases"][case["id"]]
    assert {r["kernel"] for r in reports} == set(DOTS_WRITTEN), "a kernel was not launched"
    problems = []
    for r in reports:
        problems += [f"{r['kernel']}: {p}" for p in violations(r, _dots_written(r))]
    assert not problems, f"triton {compiled['triton']}, sm_{ARCH}:\n" + "\n".join(problems)


#: registers of one SM (sm_90, as on every GPU since sm_50), and the programs the stage kernels
#: must fit on one SM by their registers
SM_REGISTERS = 65536
MIN_PROGRAMS_PER_SM = 4


def _programs_per_sm(regs: int, num_warps: int) -> int:
    """Programs of ``num_warps`` warps that fit one SM by registers (allocated per warp in units
    of 256)."""
    per_warp = -(-regs * 32 // 256) * 256
    return SM_REGISTERS // (per_warp * num_warps)


#: the kind of global access of each kernel's pixel tiles, vectorised at the stage shapes
VECTOR_ACCESS = {"_affinity_kernel": "ld", "_aggregate_kernel": "ld",
                 "_affinity_aggregate_kernel": "ld", "_upsample_kernel": "st", "_pool_kernel": "ld"}


@pytest.mark.parametrize("case", STAGES, ids=[c["id"] for c in STAGES])
def test_stage_kernels_fit_several_programs_per_sm_without_spills(compiled, case):
    """At the STViT stage shapes every kernel fits >= 4 programs per SM by its registers, spills
    nothing, and moves a cell's row segments with vector accesses. The fused affinity + aggregate kernel keeps its x tile (one channel chunk) for
    the partial sums: reading it again instead kept its 64-bit addresses live across the softmax,
    176 registers per thread in float32 at stage 1 (Triton 3.6): one program of 8 warps per SM."""
    problems = []
    for r in compiled["cases"][case["id"]]:
        n = _programs_per_sm(r["regs"], r["num_warps"])
        if n < MIN_PROGRAMS_PER_SM or r["stack"] or r["local"]:
            problems.append(f"{r['kernel']}: {r['regs']} registers x {r['num_warps']} warps "
                            f"({n} programs per SM), stack {r['stack']} B, local {r['local']} B")
        if r["kernel"] == "_affinity_aggregate_kernel":
            assert r["N_CC"] == 1, "the stage shapes should fit one channel chunk"
        # the pixel tiles (x, A in; y out of the upsampling): all scalar before ROW_VEC
        access = VECTOR_ACCESS.get(r["kernel"])
        if access and not re.search(rf"{access}\.global\.v[24]\.", r["ptx"]):
            problems.append(f"{r['kernel']}: no vector {access}.global (ROW_VEC, _row_vec)")
    assert not problems, f"triton {compiled['triton']}, sm_{ARCH}:\n" + "\n".join(problems)


def _smem_model():
    """benchmarks/triton_smem_model.py (the shared-memory wavefronts of the products)."""
    return _load_module("_triton_smem_model", ROOT / "benchmarks" / "triton_smem_model.py")


#: modelled shared-memory wavefronts per program (one cell) of the float32 products at stage 1
#: (benchmarks/triton_smem_model.py): at most these. The products read pixel rows of x at a row
#: length's stride across the lanes until 2026-12-07: fused 11488, aggregate 8608 (Triton 3.6;
#: 9952 and 8608 in 3.8), then 310 and 152 us on an H200. Now 3264 and 2208 (3.6), 3008 and 2208
#: (3.8).
STAGE1_WAVEFRONTS = {"_affinity_aggregate_kernel": 4000, "_aggregate_kernel": 3000,
                     "_upsample_kernel": 1000, "_affinity_kernel": 2000}


def test_stage1_float32_products_read_shared_memory_with_few_bank_conflicts(compiled):
    model = _smem_model()
    case = next(c for c in STAGES if c["dtype"] == "float32" and c["C"] == 64)
    got = {}
    for r in compiled["cases"][case["id"]]:
        if r["kernel"] in STAGE1_WAVEFRONTS:
            rows = model.analyse(r["ttgir"])
            assert rows, f"{r['kernel']}: no FMA operand loads found in the TTGIR"
            got[r["kernel"]] = max(got.get(r["kernel"], 0), sum(x["wavefronts"] for x in rows))
    assert got.keys() == STAGE1_WAVEFRONTS.keys()
    over = {k: v for k, v in got.items() if v > STAGE1_WAVEFRONTS[k]}
    assert not over, f"triton {compiled['triton']}: modelled wavefronts {got}"


def test_smem_model_counts_bank_conflicts():
    """The model on the layouts of 2026-12-04's fused kernel (Triton 3.6, stage 1, 8 warps): x
    [64 pixels, 64 channels] in shared memory with the pixels contiguous, read as operand B of
    ``A^T [16, P] @ x [P, C]`` by lanes each owning 2 channels: 32 lanes a row of 64 floats
    apart, 32 wavefronts per 16-byte load instead of 4. The same tile read as operand A of
    ``x^T [C, P] @ A [P, 16]``, where the lanes of a warp share their rows: no conflict."""
    model = _smem_model()
    pixels_contiguous = dict(vec=1, per_phase=1, max_phase=1, order=[0, 1])
    parent = dict(spt=[2, 2], tpw=[1, 32], wpc=[8, 1], order=[1, 0])
    wf, ideal, n = model.operand_load([64, 64], pixels_contiguous, 1, parent, 4)
    assert (n, wf, ideal) == (32, 8 * 32 * 32, 8 * 32 * 4)  # 8 warps x 32 loads x 32 (4)
    transposed = dict(pixels_contiguous, order=[1, 0])      # x^T [C, P]: P contiguous
    parent_t = dict(spt=[2, 2], tpw=[1, 32], wpc=[8, 1], order=[1, 0])  # M = C: one row a warp
    wf, ideal, n = model.operand_load([64, 64], transposed, 0, parent_t, 4)
    assert wf == ideal


def test_row_vec_divides_every_row_stride():
    tk = _load_kernels()
    t = lambda *shape: torch.empty(shape).stride(2)  # noqa: E731 (the row stride of a tensor)
    assert tk._row_vec(t(2, 64, 56, 56), t(2, 9, 56, 56)) == 8
    assert tk._row_vec(t(2, 128, 28, 28)) == 4
    assert tk._row_vec(t(2, 3, 30, 30), t(2, 9, 30, 30)) == 2
    assert tk._row_vec(t(2, 3, 15, 15)) == 1
    assert tk._row_vec(t(2, 64, 56, 56), t(2, 9, 56, 15)) == 1  # the least of the tensors
    assert tk._row_vec(t(2, 3, 12, 12), t(2, 3, 8, 8)) == 4
    cl = torch.empty(2, 3, 8, 8).to(memory_format=torch.channels_last)  # row stride W * C = 24
    assert tk._row_vec(cl.stride(2)) == 8
    assert tk._row_vec(torch.empty(2, 64, 56, 56)[:, :, :, 1:].stride(2)) == 8  # a view's strides
    assert tk._row_vec(torch.empty(2, 3, 1, 8).expand(2, 3, 8, 8).stride(2), t(2, 3, 4, 4)) == 4
    assert tk._row_vec(0) == 8  # an expanded row: every row is the same addresses


def test_programs_per_sm_arithmetic():
    assert _programs_per_sm(44, 8) == 5     # 48 registers per thread allocated: 12288 per program
    assert _programs_per_sm(176, 8) == 1
    assert _programs_per_sm(64, 8) == 4
    assert _programs_per_sm(65, 8) == 3     # 72 allocated


def test_check_flags_the_old_broadcast_pattern(compiled):
    """``tl.sum(x[:, :, None] * s[None, :, :], axis=1)`` over K = 4 channels: the compiler makes a
    tt.dot of it (TF32 up to Triton 3.6, IEEE later), which the check reports either way."""
    report = compiled["controls"]["broadcast-K4"]
    problems = violations(report, CONTROLS["broadcast-K4"][2])
    assert any("1 tt.dot in the TTIR, 0 written" in p for p in problems), problems
    assert any("dimension < 16" in p for p in problems), problems


def test_check_flags_a_tf32_dot(compiled):
    report = compiled["controls"]["dot-tf32"]
    problems = violations(report, CONTROLS["dot-tf32"][2])
    assert any("inputPrecision = tf32" in p for p in problems), problems
    assert any("TF32 tensor-core instructions in the PTX" in p for p in problems), problems


def test_check_flags_an_approximate_division(compiled):
    report = compiled["controls"]["div-f32"]
    problems = violations(report, CONTROLS["div-f32"][2])
    assert any("approximate float32 division" in p for p in problems), problems


def test_check_passes_an_ieee_dot(compiled):
    report = compiled["controls"]["dot-ieee"]
    assert violations(report, CONTROLS["dot-ieee"][2]) == []


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
