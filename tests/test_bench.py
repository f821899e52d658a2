"""CPU performance regressions (pytest-benchmark) and smoke tests of the benchmark scripts.

The ``benchmark`` tests time tiny op and module calls on the best CPU backend and the reference
(``pytest tests/test_bench.py --benchmark-autosave`` keeps a history; ``--benchmark-compare``
compares with it); without pytest-benchmark options they run as ordinary, fast tests that also
check the outputs. The script tests run ``benchmarks/bench_ops.py``, ``bench_model.py`` and
``plot.py`` on tiny shapes, so the scripts a GPU machine will run later stay runnable.
"""
from __future__ import annotations

import importlib.util
import json
import os
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


def _cpu_backends():
    """The reference and every fused backend that runs CPU tensors natively (not Triton's
    interpreter, which the test session turns on)."""
    names = ["reference"]
    for name in sk.available_backends():
        if name in ("reference", "triton"):
            continue
        if sk.backends.get_backend(name).decline_reason(torch.device("cpu"), torch.float32) is None:
            names.append(name)
    return names


BACKENDS = _cpu_backends()


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
        "--stoken", "4", "--batch", "1", "--providers", "reference", "fused", "dense-sdpa", "dense-naive",
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
    # the naive dense map of 8x8 tokens, 2 heads (32 KiB) is over the 0.00001 GiB limit: skipped
    naive = [r for r in rows if r["provider"] == "dense-naive"]
    assert naive and all(r["status"] == "skipped" and "N x N" in r["note"] for r in naive)
    assert all(r["ms"] > 0 for r in rows if r["status"] == "ok")
    assert any(r.get("saved_bytes") for r in rows if r["op"] == "sta")
    # the CPU targets are listed even when their shapes were not run, as not measured
    assert data["targets"] and all(t["value"] is None and t["met"] is None for t in data["targets"])
    md = plot.markdown(str(out))
    assert "| tokens | mode | reference |" in md and "`sta`" in md


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
            dict(base, provider="cpu", mode="fwd+bwd", ms=12.0),
            dict(base, provider="reference", mode="fwd", ms=10.0),
            dict(base, provider="cpu", mode="fwd", ms=1.0)]
    t = bench_ops.evaluate_targets(rows, torch.device("cpu"), torch.float32, ["cpu"])
    s1 = next(x for x in t if "stage 1" in x["name"] and "fwd+bwd" in x["name"])
    assert s1["value"] == pytest.approx(2.5) and s1["threshold"] == 3.0 and s1["met"] is False
    s2 = next(x for x in t if "stage 2" in x["name"] and "fwd+bwd" in x["name"])
    assert s2["value"] is None and s2["met"] is None
    # GPU: bandwidth fraction of the fused affinity+aggregation, dense SDPA ratio
    g = dict(dtype="bfloat16", status="ok", batch=8, dim=64)
    rows = [dict(g, op="affinity_aggregate", tag="stage1-b64", side=56, mode="fwd", provider="cuda",
                 ms=0.02, bw_frac=0.75),
            dict(g, op="affinity_aggregate", tag="stage1-b64", side=56, mode="fwd", provider="triton",
                 ms=0.03, bw_frac=0.5),
            dict(g, op="sta", tag="sweep", side=128, mode="fwd", provider="dense-sdpa", ms=40.0),
            dict(g, op="sta", tag="sweep", side=128, mode="fwd", provider="cuda", ms=1.0)]
    t = bench_ops.evaluate_targets(rows, torch.device("cuda"), torch.bfloat16, ["cuda", "triton"])
    bw = next(x for x in t if "affinity_aggregate" in x["name"])
    assert bw["value"] == 0.75 and bw["met"] is True and bw["details"]["provider"] == "cuda"
    dense = next(x for x in t if "128x128" in x["name"] and " fwd " in x["name"])
    assert dense["value"] == pytest.approx(40.0) and dense["met"] is True
    assert next(x for x in t if "56x56" in x["name"] and " fwd " in x["name"])["met"] is None


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
    assert {(r["mode"], r["provider"]) for r in rows} == {(m, p) for m in ("infer", "train")
                                                          for p in ["reference"] + BACKENDS[1:2]}
    assert all(r["status"] == "ok" and r["images_per_s"] > 0 for r in rows), rows
    assert len(data["targets"]) == 2 and all(t["threshold"] is None for t in data["targets"])
    assert "| model | mode | precision |" in plot.markdown(str(out))
