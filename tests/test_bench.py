"""CPU performance regressions (pytest-benchmark) and smoke tests of the benchmark scripts.

The ``benchmark`` tests time tiny op and module calls on the best CPU backend and the reference
(``pytest tests/test_bench.py --benchmark-autosave`` keeps a history; ``--benchmark-compare``
compares with it); without pytest-benchmark options they run as ordinary, fast tests that also
check the outputs. The script tests run ``benchmarks/bench_ops.py``, ``bench_model.py`` and
``plot.py`` on tiny shapes, so the scripts a GPU machine will run later stay runnable; the targets,
the host-overhead proxy and its baseline, and the GPU per-call tables are checked on synthetic rows.
(The ``official`` provider's agreement with our module is tests/test_official_baseline.py.)
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import stvit_kernels as sk

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

B, C, H, ST = 2, 32, 32, 4   # 8 x 8 super tokens


def _load(name: str):
    """Import a script of benchmarks/ as a module (they are scripts, not a package)."""
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCH_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _with_root(pythonpath):
    """PYTHONPATH with this tree first, for a script run in a child process (a tree that is not
    installed, as CI's torch 2.11 pass, is found only that way)."""
    root = os.path.dirname(BENCH_DIR)
    return root if not pythonpath else root + os.pathsep + pythonpath


def _cpu_backends():
    """The reference and every fused backend that runs CPU tensors natively (not Triton's
    interpreter, which the test session turns on)."""
    names = ["reference"]
    for name in sk.available_backends():
        if name in ("reference", "triton"):
            continue
        if sk.backends.get_backend(name).decline_reason(torch.device("cpu")) is None:
            names.append(name)
    return names


BACKENDS = _cpu_backends()
#: the extension has the CUDA kernels (their plan overrides exist)
_C_CUDA = "cpu" in BACKENDS and sk._ext.load_error() is None and __import__(
    "stvit_kernels._C", fromlist=["_C"]).built_with_cuda()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny calls time more steadily (a shared CI machine's second core is
    often busy), and the numbers compare across machines with different core counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, H, generator=g)
    s = F.avg_pool2d(x, ST)
    A = torch.randn(B, 9, H, H, generator=g).softmax(1)
    return x, s, A


class _Once:
    """Stands in for pytest-benchmark's fixture when the plugin is absent or disabled
    (``-p no:benchmark``): the cases then run once each, as plain tests."""

    group = None

    def pedantic(self, fn, args=(), kwargs=None, **_):
        return fn(*args, **(kwargs or {}))

    def __call__(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


@pytest.fixture
def bench(request):
    if request.config.pluginmanager.hasplugin("benchmark"):
        return request.getfixturevalue("benchmark")
    return _Once()


def _run(bench, fn, *args):
    return bench.pedantic(fn, args=args, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_affinity(bench, backend):
    bench.group = "affinity"
    x, s, _ = _inputs()
    A = _run(bench, lambda: sk.stoken_affinity(x, s, ST, backend=backend))
    assert A.shape == (B, 9, H, H)
    torch.testing.assert_close(A.sum(1), torch.ones(B, H, H))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_aggregate(bench, backend):
    bench.group = "aggregate"
    x, _, A = _inputs()
    num, den = _run(bench, lambda: sk.stoken_aggregate(x, A, ST, backend=backend))
    ref_num, ref_den = sk.stoken_aggregate(x, A, ST, backend="reference")
    torch.testing.assert_close(num, ref_num, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(den, ref_den, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_upsample(bench, backend):
    bench.group = "upsample"
    _, s, A = _inputs()
    y = _run(bench, lambda: sk.stoken_upsample(s, A, ST, backend=backend))
    torch.testing.assert_close(y, sk.stoken_upsample(s, A, ST, backend="reference"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_associate(bench, backend):
    bench.group = "associate"
    x, s, _ = _inputs()
    s1, A = _run(bench, lambda: sk.associate(x, s, ST, backend=backend))
    assert s1.shape == s.shape and A.shape == (B, 9, H, H)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_sta_fwd_bwd(bench, backend):
    bench.group = "sta fwd+bwd"
    torch.manual_seed(0)
    sta = sk.SuperTokenAttention(C, ST, num_heads=2, qkv_bias=True, backend=backend)
    x = _inputs()[0].requires_grad_()
    g = torch.randn(B, C, H, H)

    def step():
        x.grad = None
        sta.zero_grad(set_to_none=True)
        y = sta(x)
        y.backward(g)
        return y

    y = _run(bench, step)
    assert y.shape == x.shape and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------
# The scripts
# ------------------------------------------------------------------------------------------------

def test_bench_ops_script(tmp_path):
    bench_ops, plot = _load("bench_ops"), _load("plot")
    out = tmp_path / "ops.json"
    payload = bench_ops.main([
        "--device", "cpu", "--ops", *bench_ops.OPS, "--sides", "8", "--dim", "8", "--heads", "2",
        "--stoken", "4", "--batch", "1", "--providers", "reference", "official", "fused", "dense-sdpa",
        "dense-naive",
        "--modes", "fwd", "bwd", "fwd+bwd", "--no-targets", "--min-run-time", "0.002",
        "--naive-max-gib", "0.00001", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["command"] and data["meta"]["torch"] == torch.__version__
    rows = data["results"]
    assert rows == json.loads(json.dumps(payload["results"]))
    errors = [r for r in rows if r["status"] == "error"]
    assert not errors, errors
    got = {(r["op"], r["provider"], r["mode"]) for r in rows if r["status"] == "ok"}
    for op in bench_ops.OPS:
        for mode in (("fwd",) if op == "affinity_aggregate" else bench_ops.MODES):
            assert (op, "reference", mode) in got
            for be in BACKENDS[1:]:
                assert (op, be, mode) in got
    assert ("sta", "dense-sdpa", "fwd+bwd") in got
    # the official algorithm is a module: measured for sta only, every mode
    assert {(op, m) for op, p, m in got if p == "official"} == {("sta", m) for m in bench_ops.MODES}
    # on a CPU, host time per call is the wall time; the GPU-only figures are absent
    assert all(r["host_ms"] == r["ms"] for r in rows if r["status"] == "ok")
    assert not any(k in r for r in rows for k in ("gpu_ms", "kernels", "gpu_note"))
    assert all(r["threads"] == 1 for r in rows)
    # the naive dense map of 8x8 tokens, 2 heads (32 KiB) is over the 0.00001 GiB limit: skipped
    naive = [r for r in rows if r["provider"] == "dense-naive"]
    assert naive and all(r["status"] == "skipped" and "N x N" in r["note"] for r in naive)
    assert all(r["ms"] > 0 for r in rows if r["status"] == "ok")
    assert any(r.get("saved_bytes") for r in rows if r["op"] == "sta")
    # the CPU targets are listed even when their shapes were not run, as not measured
    assert data["targets"] and all(t["value"] is None and t["met"] is None for t in data["targets"])
    md = plot.markdown(str(out))
    assert "| tokens | mode | reference |" in md and "`sta`" in md
    assert "official / fused" in md and "host time per call is the wall time" in md
    assert "Per call (GPU)" not in md
    assert data["config"]["per_call"]["host_ms"].startswith("equal to the wall time")


def test_plot_ops_png(tmp_path):
    pytest.importorskip("matplotlib")
    bench_ops, plot = _load("bench_ops"), _load("plot")
    out = tmp_path / "ops.json"
    bench_ops.main(["--device", "cpu", "--ops", "sta", "--sides", "8", "16", "--dim", "8", "--stoken", "4",
                    "--providers", "reference", "fused", "dense-sdpa", "dense-naive", "--no-targets",
                    "--min-run-time", "0.002", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    written = plot.plot_file(str(out))
    assert sorted(os.path.basename(p) for p in written) == ["ops_memory.png", "ops_time.png"]
    assert all(os.path.getsize(p) > 10_000 for p in written)


def test_targets_are_computed():
    bench_ops = _load("bench_ops")
    base = dict(op="sta", tag="stage1-b8", dtype="float32", status="ok", side=56, batch=8, dim=64)
    rows = [dict(base, provider="reference", mode="fwd+bwd", ms=30.0),
            dict(base, provider="official", mode="fwd+bwd", ms=24.0),
            dict(base, provider="cpu", mode="fwd+bwd", ms=12.0),
            dict(base, provider="reference", mode="fwd", ms=10.0),
            dict(base, provider="official", mode="fwd", ms=5.0),
            dict(base, provider="cpu", mode="fwd", ms=1.0)]
    t = bench_ops.evaluate_targets(rows, torch.device("cpu"), torch.float32, ["cpu"])
    s1 = next(x for x in t if "stage 1" in x["name"] and "fwd+bwd" in x["name"] and "/ reference" in x["name"])
    assert s1["value"] == pytest.approx(2.5) and s1["threshold"] == 3.0 and s1["met"] is False
    # the headline: against the official algorithm
    o1 = next(x for x in t if "stage 1" in x["name"] and "fwd+bwd" in x["name"] and "/ official" in x["name"])
    assert o1["value"] == pytest.approx(2.0) and o1["threshold"] == 3.0 and o1["met"] is False
    assert o1["details"]["slow"] == "official" and o1["details"]["fast"] == "cpu"
    s2 = next(x for x in t if "stage 2" in x["name"] and "fwd+bwd" in x["name"])
    assert s2["value"] is None and s2["met"] is None
    # GPU: against the official algorithm (wall), host time per call, bandwidth, dense SDPA
    g = dict(dtype="bfloat16", status="ok", batch=8, dim=64)
    st = dict(g, op="sta", tag="stage1-b64", side=56, batch=64)
    rows = [dict(st, mode="fwd", provider="official", ms=0.94, host_ms=1.04, gpu_ms=0.45),
            dict(st, mode="fwd", provider="cuda", ms=0.20, host_ms=0.18, gpu_ms=0.19, kernels=9),
            dict(st, mode="fwd", provider="triton", ms=0.30, host_ms=0.25, gpu_ms=0.28),
            dict(st, mode="fwd+bwd", provider="official", ms=2.43, host_ms=2.8),
            dict(st, mode="fwd+bwd", provider="cuda", ms=0.9, host_ms=0.6),
            dict(g, op="affinity_aggregate", tag="stage1-b64", side=56, mode="fwd", provider="cuda",
                 ms=0.02, bw_frac=0.75),
            dict(g, op="affinity_aggregate", tag="stage1-b64", side=56, mode="fwd", provider="triton",
                 ms=0.03, bw_frac=0.5),
            dict(g, op="sta", tag="sweep", side=128, mode="fwd", provider="dense-sdpa", ms=40.0),
            dict(g, op="sta", tag="sweep", side=128, mode="fwd", provider="cuda", ms=1.0)]
    t = bench_ops.evaluate_targets(rows, torch.device("cuda"), torch.bfloat16, ["cuda", "triton"])
    by = {x["name"]: x for x in t}
    fwd = by["gpu: STA fwd wall, best fused / official, B=64 STViT-S stage 1, bfloat16"]
    assert fwd["value"] == pytest.approx(4.7) and fwd["threshold"] == 4.0 and fwd["met"] is True
    fb = by["gpu: STA fwd+bwd wall, best fused / official, B=64 STViT-S stage 1, bfloat16"]
    assert fb["value"] == pytest.approx(2.7) and fb["threshold"] == 3.0 and fb["met"] is False
    host = by["gpu: STA fwd host time per call, best fused, B=64 STViT-S stage 1, bfloat16"]
    assert host["value"] == 0.18 and host["threshold"] == 0.20 and host["direction"] == "<="
    assert host["met"] is True and host["details"]["provider"] == "cuda" and host["details"]["official_host_ms"] == 1.04
    hfb = by["gpu: STA fwd+bwd host time per call, best fused, B=64 STViT-S stage 1, bfloat16"]
    assert hfb["value"] == 0.6 and hfb["met"] is False
    assert by["gpu: STA fwd wall, best fused / official, B=64 STViT-S stage 2, bfloat16"]["value"] is None
    bw = next(x for x in t if "affinity_aggregate" in x["name"])
    assert bw["value"] == 0.75 and bw["met"] is True and bw["details"]["provider"] == "cuda"
    dense = next(x for x in t if "128x128" in x["name"] and " fwd " in x["name"])
    assert dense["value"] == pytest.approx(40.0) and dense["met"] is True
    assert next(x for x in t if "56x56" in x["name"] and " fwd " in x["name"])["met"] is None


def test_proxy_targets_against_a_baseline():
    bench_ops = _load("bench_ops")
    base = dict(op="sta", tag="proxy", dtype="float32", status="ok", side=16, batch=1, dim=64, threads=1)
    rows = [dict(base, provider=p, mode=m, ms=ms) for p, m, ms in (
        ("cpu", "fwd", 0.8), ("official", "fwd", 1.6), ("reference", "fwd", 2.0),
        ("cpu", "fwd+bwd", 2.0), ("official", "fwd+bwd", 4.0), ("reference", "fwd+bwd", 5.0))]
    meta = dict(stvit_kernels_commit="abc123", stvit_kernels_dirty=False, device="cpu x", date="2026-11-27")
    baseline = bench_ops.proxy_baseline_summary(rows, meta)
    assert baseline["commit"] == "abc123" and baseline["ms"]["cpu"] == {"fwd": 0.8, "fwd+bwd": 2.0}
    later = [dict(r, ms=r["ms"] * (0.2 if r["provider"] == "cpu" else 1.1)) for r in rows]
    t = bench_ops.proxy_targets(later, baseline)
    fwd = t[0]
    assert "proxy" in fwd["name"] and " fwd," in fwd["name"]
    assert fwd["threshold"] == pytest.approx(0.2) and fwd["value"] == pytest.approx(0.16)
    assert fwd["direction"] == "<=" and fwd["met"] is True
    assert fwd["details"]["fraction_of_baseline"] == pytest.approx(0.2)
    assert fwd["details"]["baseline_commit"] == "abc123"
    assert t[1]["threshold"] is None and t[1]["value"] == pytest.approx(0.4)          # fwd+bwd: info
    # load-normalised by the official algorithm of the same run
    assert t[2]["threshold"] == 0.25 and t[2]["value"] == pytest.approx(0.2 / 1.1) and t[2]["met"] is True
    # without a baseline: listed, no threshold, a note
    t = bench_ops.proxy_targets(later, None)
    assert t[0]["threshold"] is None and t[0]["met"] is None and "no baseline" in t[0]["note"]
    assert t[2]["threshold"] is None and t[2]["value"] is None


def test_proxy_head_on_target(tmp_path):
    """The head-on proxy figure (proxy_ab.py's JSON) counts only against the baseline commit."""
    bench_ops = _load("bench_ops")
    path = tmp_path / "ab.json"
    t = bench_ops.proxy_ab_target("abc", "w", "n", path=str(path))
    assert t["value"] is None and "no proxy_ab.py result" in t["note"]
    ab = dict(meta=dict(trees=dict(a=dict(commit="abc"), b=dict(commit="def"))),
              results={"fwd": dict(ratio=0.24, ratio_q1=0.2, ratio_q3=0.3, turns=9, a_ms=1.0, b_ms=0.24)})
    path.write_text(json.dumps(ab))
    t = bench_ops.proxy_ab_target("abc", "w", "n", path=str(path))
    assert t["value"] == 0.24 and t["threshold"] == 0.25 and t["met"] is True
    t = bench_ops.proxy_ab_target("other", "w", "n", path=str(path))
    assert t["value"] is None and "not the baseline commit" in t["note"]
    t = bench_ops.proxy_ab_target("abc", "w", "n", path=str(path), measured=False)
    assert t["value"] is None and t["met"] is None   # a run without the proxy lists no figure


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_proxy_ab_script(tmp_path, backend):
    """proxy_ab.py against the same tree: both children import that tree, the ratio is near 1
    (``triton``: the host path under the interpreter, the kernel launches stubbed out)."""
    if backend == "triton":
        pytest.importorskip("triton")
    proxy_ab = _load("proxy_ab")
    root = os.path.dirname(BENCH_DIR)
    res = proxy_ab.measure(root, root, turns=2, backend=backend)
    assert set(res) == {"fwd", "fwd+bwd"}
    assert all(r["a_ms"] > 0 and r["b_ms"] > 0 and 0.2 < r["ratio"] < 5 for r in res.values())


def test_host_profile_places():
    host_profile = _load("host_profile")
    assert host_profile.place("~") == "C"
    assert host_profile.place("/x/site-packages/torch/nn/modules/module.py") == "torch"
    assert host_profile.place("/x/site-packages/triton/runtime/jit.py") == "triton"
    assert host_profile.place("/work/stvit_kernels/module.py") == "stvit_kernels"
    assert host_profile.place("/usr/lib/python3.12/contextlib.py") == "other"
    assert host_profile._is_triton_run(("/x/triton/runtime/jit.py", 600, "run"))
    assert not host_profile._is_triton_run(("/x/triton/runtime/autotuner.py", 200, "run"))


def test_host_profile_script(tmp_path):
    """host_profile.py on the CPU at a tiny shape: the per-place shares add up to the profile, the
    module's forward is among the profiled functions, and no Triton launch is counted."""
    host_profile = _load("host_profile")
    out = tmp_path / "hp.json"
    host_profile.main(["--device", "cpu", "--backend", "reference", "--batch", "1", "--dim", "8",
                       "--side", "8", "--stoken", "4", "--calls", "5", "--out", str(out)])
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"fwd", "fwd+bwd"}
    for r in res.values():
        assert r["host_us"] > 0 and r["profiled_us"] > 0
        assert sum(r["by_place_us"].values()) == pytest.approx(r["profiled_us"])
        assert r["by_place_us"]["stvit_kernels"] > 0
        assert any("forward" in t["function"] for t in r["top"])
        assert r["triton_launches"] == 0 and r["triton_run_us"] == 0


def test_host_profile_counts_the_triton_launches(tmp_path):
    """The Triton path's launches per module call, counted by host_profile.py under the
    interpreter (a fresh process: TRITON_INTERPRET is read at import): the forward is the pool,
    the fused pass, the normalising reduction and the upsampling; the backward adds the
    association's gradient (one normalised upsampling) and the upsampling's gradient into the
    super tokens (an aggregation and its reduction)."""
    pytest.importorskip("triton")
    out = tmp_path / "hp.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=_with_root(os.environ.get("PYTHONPATH")))
    subprocess.run([sys.executable, os.path.join(BENCH_DIR, "host_profile.py"), "--device", "cpu",
                    "--backend", "triton", "--batch", "1", "--dim", "8", "--side", "8",
                    "--stoken", "4", "--calls", "2", "--out", str(out)],
                   env=env, check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())["results"]
    assert res["fwd"]["triton_launches"] == 4
    assert res["fwd+bwd"]["triton_launches"] == 7
    assert 0 < res["fwd"]["triton_run_us"] <= res["fwd"]["profiled_us"]


def test_triton_launch_cost_script(tmp_path):
    """triton_launch_cost.py (a fresh process, without the interpreter): one row per launch of a
    module forward (4) and backward (3), each timed through Triton's own launcher."""
    pytest.importorskip("triton")
    out = tmp_path / "launch.json"
    code = (f"import sys; sys.path.insert(0, {BENCH_DIR!r}); import triton_launch_cost as t; "
            f"import json; json.dump(t.measure(n=20, batch=1, side=16), open({str(out)!r}, 'w'))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = _with_root(env.get("PYTHONPATH"))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                   timeout=600)
    rows = json.loads(out.read_text())
    assert [(r["step"], r["kernel"]) for r in rows] == [
        ("fwd", "_pool_kernel"), ("fwd", "_affinity_aggregate_kernel"), ("fwd", "_reduce_kernel"),
        ("fwd", "_upsample_kernel"), ("bwd", "_aggregate_kernel"), ("bwd", "_reduce_kernel"),
        ("bwd", "_upsample_kernel")]
    assert all(r["us"] > 0 and r["args"] > 10 for r in rows)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
def test_tune_cuda_script(tmp_path):
    """tune_cuda.py --smoke on the CPU (the knobs change nothing there): every op, both dtypes,
    the default and one more configuration per op with knobs, consistent with each other."""
    tune = _load("tune_cuda")
    res = tune.run(torch.device("cpu"), [torch.float32, torch.bfloat16], smoke=True, copy_gbs=None)
    assert {(s["op"], s["dtype"]) for s in res["summary"]} == {
        (op, dt) for op in tune.OPS for dt in ("float32", "bfloat16")}
    assert all(r["ok"] and r["ms"] > 0 for r in res["rows"]), res["rows"]
    assert sum(r["default"] for r in res["rows"]) == 8
    assert "| affinity_aggregate | smoke | float32 |" in tune.table(res["summary"])
    # the grid of a GPU run: every knob of the aggregating ops, the default first
    full = tune.configs("affinity_aggregate", smoke=False)
    assert full[0] == tune.DEFAULT and len(full) == 3 * 4 * 4 + 3
    assert full[-2:] == [dict(tune.DEFAULT, cache_x=0), dict(tune.DEFAULT, cell_units=0)]
    assert tune.configs("pool", smoke=False) == [tune.DEFAULT]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
def test_tuning_saves_as_it_goes(tmp_path):
    """The sweep's JSON is written after every op (a GPU step's time box may cut it short), marked
    partial until the end; the command line writes the last one whole, with its metadata."""
    tune = _load("tune_cuda")
    tuning = sys.modules["tuning"]
    saved = []
    res = tuning.sweep(tune.TUNER, torch.device("cpu"), [torch.float32], True, None,
                       save=lambda r: saved.append(dict(r)))
    assert len(saved) == len(tune.OPS) and all(s["partial"] for s in saved)
    assert [len(s["rows"]) for s in saved] == sorted(len(s["rows"]) for s in saved)
    assert saved[-1]["rows"] == res["rows"] and not res["partial"]
    out = tmp_path / "tune.json"
    tuning.main(tune.TUNER, "doc", argv=["--device", "cpu", "--smoke", "--dtypes", "float32",
                                         "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["partial"] is False and data["meta"]["device"] and len(data["summary"]) == len(tune.OPS)


@pytest.mark.skipif("triton" not in sk.available_backends(), reason="the triton backend is not available")
def test_tune_triton_script():
    """tune_triton.py --smoke (the interpreter on the CPU, or a GPU): every op, both dtypes, each
    configuration's output within the tolerance of the default's; a configuration whose plan is
    the default's at that shape is skipped, not timed twice."""
    from .utils import device_for
    tune = _load("tune_triton")
    device = torch.device(device_for("triton"))
    res = tune.run(device, [torch.float32, torch.bfloat16], smoke=True, copy_gbs=None)
    assert {(s["op"], s["dtype"]) for s in res["summary"]} == {
        (op, dt) for op in tune.OPS for dt in ("float32", "bfloat16")}
    assert all(r["ok"] and r["ms"] > 0 for r in res["rows"]), res["rows"]
    assert sum(r["default"] for r in res["rows"]) == 8
    # at the smoke shape (C=16, 4x4 cells) num_warps=2, tile=1024 is the upsampling's default plan
    ran = {(r["op"], r["dtype"]): 0 for r in res["rows"]}
    for r in res["rows"]:
        ran[r["op"], r["dtype"]] += 1
    assert ran["upsample", "float32"] == 1 and ran["affinity_aggregate", "float32"] == 2
    full = tune.configs("affinity_aggregate", smoke=False)
    assert full[0] == tune.DEFAULT and len(full) == 4 * 3 * 2 and len(set(map(str, full))) == len(full)


@pytest.mark.skipif("cpu" not in BACKENDS or not _C_CUDA, reason="needs the CUDA build")
def test_cuda_plan_overrides_are_checked_and_restored():
    from stvit_kernels import _C
    before = _C._set_cuda_plan(128, 512, 40 * 1024, 0, 0, 2)
    try:
        assert _C._set_cuda_plan(*before) == (128, 512, 40 * 1024, 0, 0, 2)
        for bad in (dict(max_threads=100), dict(max_threads=512), dict(tile_pixels=-1),
                    dict(cache_x=2), dict(smem_block=-5), dict(cell_units=3),
                    dict(upsample_pixels=3), dict(upsample_pixels=8)):
            with pytest.raises(RuntimeError):
                _C._set_cuda_plan(**bad)
        assert _C._set_cuda_plan(*before) == before   # a failed call changes nothing
    finally:
        _C._set_cuda_plan(*before)


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", [dict(max_threads=64, tile_pixels=256), dict(max_threads=256, tile_pixels=4096),
                                 dict(cache_x=0), dict(smem_block=20 * 1024), dict(cell_units=0),
                                 dict(cache_x=0, cell_units=0), dict(upsample_pixels=1),
                                 dict(upsample_pixels=2)],
                         ids=["t64-tile256", "t256-tile4096", "reread-x", "smem20k", "column-units",
                              "reread-x-column-units", "upsample1", "upsample2"])
def test_cuda_plan_overrides_keep_results(cfg):
    """The plans tune_cuda.py tries compute the same function on the GPU: the CUDA ops under
    each override against the reference (odd sizes: partial tiles, masked cells; 4 x 5 cells,
    where the upsampling takes a pixel a thread, and 4 x 8 cells of 28 x 56 pixels, where it may
    take 4, plus its normalised form, associate_backward's)."""
    from stvit_kernels import _C, reference
    from .utils import make_inputs
    ops = torch.ops.stvit
    for (H, W, h, w) in ((20, 35, 4, 5), (28, 56, 4, 8)):
        t = make_inputs(3, 40, H, W, h, w, device="cuda", seed=7)
        x, s, A = t["x"], t["s"], t["A"]
        den = torch.rand_like(s[:, :1]) + 0.5
        before = _C._set_cuda_plan(cfg.get("max_threads", 0), cfg.get("tile_pixels", 0),
                                   cfg.get("smem_block", 0), cfg.get("cache_x", -1),
                                   cfg.get("cell_units", -1), cfg.get("upsample_pixels", 0))
        try:
            got = [*ops.affinity_aggregate(x, s, h, w, 0.3), *ops.aggregate(x, A, h, w),
                   ops.upsample(s, A, h, w), ops.associate_backward(t["gnum"], A, den, h, w)]
        finally:
            _C._set_cuda_plan(*before)
        want = [*reference.affinity_aggregate(x, s, h, w, 0.3), *reference.aggregate(x, A, h, w),
                reference.upsample(s, A, h, w), reference.upsample(t["gnum"] / (den + 1e-12), A, h, w)]
        for g, w_ in zip(got, want):
            torch.testing.assert_close(g, w_, rtol=1e-4, atol=1e-5)


def test_ncu_report_parses_ncu_csv(tmp_path):
    """ncu_kernels.py report: per launch, time, DRAM bytes and share of the copy bandwidth, on rows
    as ncu 2025 prints them with --csv --nvtx on the H200 (benchmarks/results/h200-2026-12-04/
    ncu.log: units "ns" and "byte", values with thousands separators, the NVTX range inside the
    push/pop column); an unknown unit stops the report instead of being read as 1."""
    ncu = _load("ncu_kernels")
    lines = ["==PROF== Connected to process 4143", *NCU_ROWS]
    csv_path, out = tmp_path / "ncu.csv", tmp_path / "ncu.json"
    csv_path.write_text("\n".join(lines) + "\n")
    ncu.report(str(csv_path), 4000.0, str(out))
    (r,) = json.loads(out.read_text())["launches"]
    assert r["case"] == "stage1-cuda-float32" and r["kernel"].startswith("void stvit::pool_kernel")
    assert r["us"] == pytest.approx(17.568)
    assert r["dram_mb"] == pytest.approx((51398656 + 2380544) / 1e6)
    assert r["dram_gbs"] == pytest.approx((51398656 + 2380544) / 17.568e-6 / 1e9)
    assert r["share_of_copy"] == pytest.approx(r["dram_gbs"] / 4000.0)
    assert r["dram_pct_of_peak"] == pytest.approx(63.76)
    csv_path.write_text("\n".join(lines).replace('"ns","17,568"', '"furlong","17,568"') + "\n")
    with pytest.raises(SystemExit, match="unknown ncu unit 'furlong'"):
        ncu.report(str(csv_path), 4000.0, None)


#: the header and the first launch's four metric rows of the H200 run's ncu.log (2026-12-04)
NCU_ROWS = [
    '"ID","Process ID","Process Name","Host Name","thread Domain:Push/Pop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg","Id:Domain:Start/Stop_Range:PL_Type:PL_Value:CLR_Type:Color:Msg_Type:Msg","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"',
    '"0","4143","python3.12","127.0.0.1","4143  ""<default domain>:stage1-cuda-float32:none:none:none:none:none:none"" ","","void stvit::pool_kernel<float, 4, float>(stvit::PoolParams<T1, T3>)","1","7","(256, 1, 1)","(784, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","51,398,656"',
    '"0","4143","python3.12","127.0.0.1","4143  ""<default domain>:stage1-cuda-float32:none:none:none:none:none:none"" ","","void stvit::pool_kernel<float, 4, float>(stvit::PoolParams<T1, T3>)","1","7","(256, 1, 1)","(784, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","2,380,544"',
    '"0","4143","python3.12","127.0.0.1","4143  ""<default domain>:stage1-cuda-float32:none:none:none:none:none:none"" ","","void stvit::pool_kernel<float, 4, float>(stvit::PoolParams<T1, T3>)","1","7","(256, 1, 1)","(784, 1, 1)","0","9.0","Command line profiler metrics","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","63.76"',
    '"0","4143","python3.12","127.0.0.1","4143  ""<default domain>:stage1-cuda-float32:none:none:none:none:none:none"" ","","void stvit::pool_kernel<float, 4, float>(stvit::PoolParams<T1, T3>)","1","7","(256, 1, 1)","(784, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","ns","17,568"',
]


def test_committed_proxy_baseline():
    """The baseline of the proxy target is committed with the commit of the library it measured."""
    bench_ops = _load("bench_ops")
    with open(bench_ops.PROXY_BASELINE) as f:
        data = json.load(f)
    b = data["baseline"]
    assert len(b["commit"]) == 40 and b["library_dirty"] is False
    assert set(b["ms"]) == {"cpu", "official", "reference"}
    assert all(set(v) == {"fwd", "fwd+bwd"} and min(v.values()) > 0 for v in b["ms"].values())
    assert data["meta"]["threads"] == 1 and all(r["threads"] == 1 for r in data["results"])
    fwd = next(t for t in data["targets"] if "proxy STA fwd, cpu backend, ms" in t["name"])
    assert fwd["threshold"] == pytest.approx(0.25 * b["ms"]["cpu"]["fwd"]) and fwd["direction"] == "<="


def test_proxy_script(tmp_path, monkeypatch):
    bench_ops, plot = _load("bench_ops"), _load("plot")
    threads = torch.get_num_threads()
    out = tmp_path / "proxy.json"
    bench_ops.main(["--proxy", "--min-run-time", "0.005", "--out", str(out)])
    assert torch.get_num_threads() == threads
    data = json.loads(out.read_text())
    rows = data["results"]
    want = {"reference", "official"} | ({"cpu"} if "cpu" in BACKENDS else set())
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in want for m in ("fwd", "fwd+bwd")}
    assert all(r["status"] == "ok" and r["tag"] == "proxy" and r["threads"] == 1 for r in rows), rows
    assert all((r["batch"], r["dim"], r["side"], r["stoken"], r["heads"]) == (1, 64, 16, 8, 1) for r in rows)
    assert data["meta"]["threads"] == 1 and data["targets"] and all("proxy" in t["name"] for t in data["targets"])
    assert "baseline" not in data
    assert "`sta` (proxy" in plot.markdown(str(out))
    # --record-baseline refuses a library that differs from its commit, else stores the baseline
    base_out = tmp_path / "baseline.json"
    monkeypatch.setattr(bench_ops.common, "library_provenance", lambda: dict(
        stvit_kernels_path="x", stvit_kernels_commit="f" * 40, stvit_kernels_dirty=True))
    with pytest.raises(SystemExit, match="differs from its commit"):
        bench_ops.main(["--record-baseline", "--min-run-time", "0.005", "--out", str(base_out)])
    monkeypatch.setattr(bench_ops.common, "library_provenance", lambda: dict(
        stvit_kernels_path="x", stvit_kernels_commit="f" * 40, stvit_kernels_dirty=False))
    bench_ops.main(["--record-baseline", "--min-run-time", "0.005", "--out", str(base_out)])
    data = json.loads(base_out.read_text())
    assert data["baseline"]["commit"] == "f" * 40 and set(data["baseline"]["ms"]) == want
    if "cpu" in want:
        fwd = data["targets"][0]
        assert fwd["threshold"] == pytest.approx(0.25 * data["baseline"]["ms"]["cpu"]["fwd"])
        assert fwd["met"] is False


def test_cases_of_the_presets():
    """The CPU quick run holds the proxy (1 thread) and the official provider at the target shapes."""
    bench_ops = _load("bench_ops")
    args = bench_ops.parse_args(["--quick"])
    cases = bench_ops.build_cases(args, torch.device("cpu"), ["cpu"])
    proxy = [c for c in cases if c.tag == "proxy"]
    assert len(proxy) == 1 and proxy[0].threads == 1 and set(proxy[0].providers) == {"cpu", "official", "reference"}
    assert (proxy[0].batch, proxy[0].dim, proxy[0].side, proxy[0].stoken, proxy[0].heads) == (1, 64, 16, 8, 1)
    for tag in ("stage1-b8", "stage2-b8"):
        c = next(c for c in cases if c.tag == tag)
        assert "official" in c.providers and "cpu" in c.providers and c.batch == 8
    assert "official" in bench_ops.resolve_providers(args, ["cpu"])
    gpu = bench_ops.target_cases(torch.device("cuda"), "quick", ["cuda", "triton"])
    assert {c.tag for c in gpu if c.op == "sta"} == {"stage1-b64", "stage2-b64"}
    assert all("official" in c.providers for c in gpu)
    assert bench_ops.build_cases(bench_ops.parse_args(["--proxy"]), torch.device("cpu"), ["cpu"]) == proxy
    with pytest.raises(SystemExit, match="CPU float32"):
        bench_ops.main(["--proxy", "--device", "cuda", "--no-save"])


def test_markdown_gpu_per_call(tmp_path):
    """A GPU results file: the per-call table (wall, host, CUDA-graph GPU time, kernels) per provider,
    with the reason where a call could not be captured; the official ratio first."""
    plot = _load("plot")
    g = dict(op="sta", tag="stage1-b64", batch=64, dim=64, side=56, tokens=3136, stoken=8, heads=1,
             dtype="float32", status="ok", threads=None)
    rows = [dict(g, provider="official", mode="fwd", ms=0.944, host_ms=1.041, gpu_ms=0.449, kernels=27,
                 memops=0, peak_bytes=3 << 20),
            dict(g, provider="cuda", mode="fwd", ms=0.2, host_ms=0.15, gpu_ms=0.19, kernels=9, memops=0),
            dict(g, provider="reference+compile", mode="fwd", ms=0.5, host_ms=0.3, kernels=12,
                 gpu_note="CUDA-graph capture failed: RuntimeError: operation not permitted when stream "
                          "is capturing"),
            dict(g, provider="cuda", mode="bwd", ms=0.3, host_ms=0.3, kernels=20,
                 gpu_note="bwd replays a graph recorded before the capture: see the fwd+bwd row")]
    payload = dict(kind="ops", meta=dict(device="NVIDIA H200", device_type="cuda", threads=16,
                                         torch="2.14.1", date="2026-11-27T00:00:00", command="x"),
                   config=dict(fused_backends=["cuda"]), results=rows, targets=[
                       dict(name="gpu: STA fwd host time per call", threshold=0.2, value=0.15, unit="ms",
                            direction="<=", met=True)])
    path = tmp_path / "h200_ops.json"
    path.write_text(json.dumps(payload))
    md = plot.markdown(str(path))
    assert "| tokens | mode | official | cuda | reference+compile | official / fused |" in md
    assert "| 56² | fwd | 0.944 | 0.200 | 0.500 | 4.7x |" in md
    assert "Per call (GPU):" in md
    assert "| 56² | fwd | official | 0.944 | 1.04 | 0.449 | 2.3 | 27 | 3.0 MiB |" in md
    assert "| 56² | fwd | reference+compile | 0.500 | 0.300 | – [1] | – | 12 | – |" in md
    assert "[1] CUDA-graph capture failed: RuntimeError" in md and "[2] bwd replays" in md
    assert "| gpu: STA fwd host time per call | 0.150 ms | ≤ 0.200 ms | yes |" in md
    assert "host time per call is the wall time" not in md


def test_bench_model_script(tmp_path, monkeypatch):
    import stvit

    bench_model, plot = _load("bench_model"), _load("plot")
    # the script's logic on a tiny STViT (the real STViT-S takes seconds to build on a CPU)
    monkeypatch.setitem(bench_model.MODELS, "small", lambda **kw: stvit.STViT(
        embed_dim=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2],
        stoken_size=[8, 4, 1, 1], projection=64, **kw))
    out = tmp_path / "model.json"
    bench_model.main(["--quick", "--device", "cpu", "--resolution", "64", "--batch", "2",
                      "--min-run-time", "0.002", "--out", str(out)])
    data = json.loads(out.read_text())
    rows = data["results"]
    assert {(r["mode"], r["provider"]) for r in rows} == {
        (m, p) for m in ("infer", "train")
        for p in ["official", "reference"] + BACKENDS[1:2] + ["no-sta", "official-no-super"]}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows), rows
    # per mode: fused / official and fused / reference, both for information on a CPU
    assert len(data["targets"]) == 4 and all(t["threshold"] is None for t in data["targets"])
    official = [t for t in data["targets"] if "fused / official" in t["name"]]
    assert len(official) == 2
    for t in official:  # the STA's share of the step and the Amdahl bound, from no-sta
        ms = {r["provider"]: r["ms"] for r in rows if r["mode"] in t["name"]}
        share = t["details"]["share"]
        assert share["official"] == pytest.approx(1 - ms["no-sta"] / ms["official"])
        assert set(share) == set(ms) - {"no-sta", "official-no-super"}
        assert t["details"]["amdahl_bound_vs_official"] == pytest.approx(ms["official"] / ms["no-sta"])
        # the super-token STA alone (stages 1 and 2), from official-no-super
        assert t["details"]["super_share_official"] == pytest.approx(
            1 - ms["official-no-super"] / ms["official"])
        assert t["details"]["amdahl_bound_super_vs_official"] == pytest.approx(
            ms["official"] / ms["official-no-super"])
    md = plot.markdown(str(out))
    assert "| model | mode | precision |" in md and "| bound (official / no-sta) |" in md
    assert "| super-token STA share: official | bound (official / official-no-super) |" in md
    if BACKENDS[1:]:
        assert "fused / official | fused / reference | STA share: official / fused |" in md


def test_official_model_has_the_weights():
    """bench_model's ``official`` provider swaps every super token attention of a model for the
    official algorithm with the same weights: the model's output does not change."""
    import stvit

    bench_model = _load("bench_model")
    torch.manual_seed(0)
    model = stvit.STViT(embed_dim=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2],
                        stoken_size=[8, 4, 1, 1], projection=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        bench_model.set_backend(model, "reference")
        want = model(x)
        bench_model.set_backend(model, "official")
        got = model(x)
    assert not any(isinstance(m, sk.SuperTokenAttention) for m in model.modules())
    assert sum(type(m).__name__ == "OfficialStokenAttention" for m in model.modules()) == 4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_no_sta_model_leaves_out_every_super_token_attention():
    """bench_model's ``no-sta`` provider: every super token attention returns its input, the rest
    of the model (and its parameters outside the STA) is unchanged."""
    import stvit

    bench_model = _load("bench_model")
    torch.manual_seed(0)
    model = stvit.STViT(embed_dim=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2],
                        stoken_size=[8, 4, 1, 1], projection=64, num_classes=10).eval()
    n_sta = sum(isinstance(m, sk.SuperTokenAttention) for m in model.modules())
    sta_params = sum(p.numel() for m in model.modules() if isinstance(m, sk.SuperTokenAttention)
                     for p in m.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    bench_model.set_backend(model, "no-sta")
    assert not any(isinstance(m, sk.SuperTokenAttention) for m in model.modules())
    assert sum(isinstance(m, bench_model.WithoutSTA) for m in model.modules()) == n_sta == 4
    assert sum(p.numel() for p in model.parameters()) == n_params - sta_params
    x = torch.randn(2, 32, 8, 8)
    assert bench_model.WithoutSTA()(x) is x
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_official_no_super_model_leaves_out_the_super_token_stages_only():
    """bench_model's ``official-no-super`` provider: the STAs with super tokens (stages 1 and 2)
    return their input, those of 1x1 super tokens (stages 3 and 4, global attention) run the
    official algorithm with the module's weights."""
    import stvit

    bench_model = _load("bench_model")
    torch.manual_seed(0)
    model = stvit.STViT(embed_dim=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 2],
                        stoken_size=[8, 4, 1, 1], projection=64, num_classes=10).eval()
    bench_model.set_backend(model, "official-no-super")
    assert not any(isinstance(m, sk.SuperTokenAttention) for m in model.modules())
    assert sum(isinstance(m, bench_model.WithoutSTA) for m in model.modules()) == 2
    assert sum(type(m).__name__ == "OfficialStokenAttention" for m in model.modules()) == 2
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_gpu_per_call_guards_each_part(monkeypatch):
    """The GPU per-call breakdown (no GPU here: its parts are stubbed) records what each part
    measured, and the reason where one failed, without failing the row; a failed CUDA-graph capture
    reports its first error, not the one raised on leaving the capture. The profiler (the kernel
    count) runs last, after the host and graph timings."""
    common = _load("bench_ops").common
    order = []

    def count(step, device):
        order.append("count")
        return dict(kernels=27.0, memops=0.0, gpu_busy_ms=0.4)

    def host(step, device, calls=10):
        order.append("host")
        return dict(host_ms=1.0, host_ms_lo=0.9, host_ms_hi=1.1, host_calls=calls)

    monkeypatch.setattr(common, "count_kernels", count)
    monkeypatch.setattr(common, "host_time", host)

    def failing_capture(step, device):
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(common, "graph_time", failing_capture)
    out = common.gpu_per_call(lambda: None, torch.device("cpu"), launches_hint=27)
    assert out["kernels"] == 27 and out["host_ms"] == 1.0 and "gpu_ms" not in out
    assert out["host_calls"] == 500 // 27   # blocks of calls kept under ~500 launches
    assert order == ["host", "count"]       # the capture failed in between
    assert out["gpu_note"].startswith("CUDA-graph capture failed: RuntimeError: operation not permitted")
    out = common.gpu_per_call(lambda: None, torch.device("cpu"), graphable=False, not_graphable_note="bwd")
    assert out["gpu_note"] == "bwd"
    monkeypatch.setattr(common, "count_kernels", lambda step, device: 1 / 0)
    monkeypatch.setattr(common, "graph_time", lambda step, device: dict(gpu_ms=0.2))
    out = common.gpu_per_call(lambda: None, torch.device("cpu"))
    assert out["kernels_note"].startswith("ZeroDivisionError") and out["gpu_ms"] == 0.2
    assert out["host_calls"] == 500 // 30   # the default hint: 30 launches per call


def test_host_time_counts_calls():
    common = _load("bench_ops").common
    n = []
    t = common.host_time(lambda: n.append(1), torch.device("cpu"), calls=4, blocks=5)
    assert len(n) == 20 and t["host_calls"] == 4 and 0 <= t["host_ms_lo"] <= t["host_ms"] <= t["host_ms_hi"]
