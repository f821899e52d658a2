"""The CPU host-overhead proxy (issue 11) against another tree of the library, in the same run:
``SuperTokenAttention`` at the shape of ``bench_ops.PROXY`` (B=1, C=64, 16x16 tokens, 8x8 super
tokens, 1 head, qkv bias), ``cpu`` backend, one thread, forward (no grad) and forward + backward.

Each tree runs in a child process of its own (its ``stvit_kernels`` first on ``PYTHONPATH``). The
children take turns, a short burst each, alternating which goes first. A burst is timed by the
CPU time of the child's thread (``time.thread_time``: at one thread it holds all the work, and
not the time a virtual machine's host takes the core away, which wall time counts). The figure
is the median of the per-turn ratios (B / A). On a shared machine, load moves the absolute times
by 2x within minutes, and this ratio much less.

    git worktree add /tmp/base b22c081   # the tree before the lean call path (the proxy's baseline)
    (cd /tmp/base && STVIT_NO_CUDA=1 python setup.py build_ext --inplace)
    python benchmarks/proxy_ab.py /tmp/base . --out benchmarks/results/cpu_proxy_ab.json

``--autocast`` runs the module under CPU bfloat16 autocast (float32 parameters and inputs), e.g.
against the tree before the casts moved into the operators (cded953):
``python benchmarks/proxy_ab.py /tmp/base . --autocast --out benchmarks/results/cpu_proxy_ab_autocast.json``.

``--backend triton`` times the ``triton`` backend's host path instead: the children run under
``TRITON_INTERPRET=1`` (so the Triton operators take CPU tensors) with every Triton kernel's launch
replaced by a no-op, which leaves what Python and the dispatcher spend around the launches (the
plans, the workspaces, the arguments, the autograd nodes, the ATen ops between the kernels) and
leaves out Triton's own launcher, whose cost only a GPU shows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_ops  # noqa: E402
import common  # noqa: E402
import torch  # noqa: E402

CHILD = r'''
import sys, time, torch
torch.set_num_threads(1)
import stvit_kernels
from stvit_kernels import SuperTokenAttention
torch.manual_seed(0)
if "{backend}" == "triton":  # the host path alone: no kernel runs (module docstring)
    sys.path.insert(0, {bench_dir!r})
    import common
    common.stub_triton_launches()
m = SuperTokenAttention({dim}, {stoken}, num_heads={heads}, qkv_bias=True, backend="{backend}").eval()
x = torch.randn({batch}, {dim}, {side}, {side})
xg = x.clone().requires_grad_()
# --autocast: under CPU bfloat16 autocast (the float32 module and inputs, as in AMP training)
amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled={autocast})
def fwd():
    with torch.no_grad(), amp():
        m(x)
def fwd_bwd():
    with amp():
        y = m(xg)
    y.sum().backward()
calls = {{"fwd": fwd, "fwd+bwd": fwd_bwd}}
for f in calls.values():
    for _ in range(100):
        f()
print("ready", stvit_kernels.__file__, flush=True)
for line in sys.stdin:
    mode, n = line.split()
    f, n = calls[mode], int(n)
    t0 = time.thread_time()
    for _ in range(n):
        f()
    print((time.thread_time() - t0) / n * 1e3, flush=True)
'''

#: calls per burst: about 40 ms each on the dev machine
BURST = {"fwd": 400, "fwd+bwd": 150}


def _child(tree: str, autocast: bool = False, backend: str = "cpu") -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS="1",
               TRITON_INTERPRET="1" if backend == "triton" else "0")
    child = CHILD.format(batch=bench_ops.PROXY_BATCH, autocast=autocast, backend=backend,
                         bench_dir=HERE, **bench_ops.PROXY)
    p = subprocess.Popen([sys.executable, "-c", child], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd="/")
    ready = p.stdout.readline().split()
    if not ready or ready[0] != "ready":
        raise SystemExit(f"{tree}: the child did not start (see its stderr)")
    want = os.path.join(os.path.abspath(tree), "stvit_kernels")
    if not ready[1].startswith(want):
        raise SystemExit(f"{tree}: the child imported {ready[1]}, not the tree's library")
    return p


def _tree(path: str) -> dict:
    """A tree's folder, commit, and whether its library sources differ from that commit."""
    git = lambda *a: subprocess.run(["git", "-C", path, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return dict(path=os.path.abspath(path), commit=git("rev-parse", "HEAD") or None,
                library_dirty=bool(git("status", "--porcelain", "--untracked-files=no", "--",
                                       "stvit_kernels", "csrc")))


def measure(a: str, b: str, turns: int, autocast: bool = False, backend: str = "cpu") -> dict:
    children = [_child(a, autocast, backend), _child(b, autocast, backend)]

    def burst(p, mode):
        p.stdin.write(f"{mode} {BURST[mode]}\n")
        p.stdin.flush()
        return float(p.stdout.readline())

    out = {}
    for mode in BURST:
        ta, tb, ratio = [], [], []
        for i in range(turns):
            t = {}
            for j in ((0, 1) if i % 2 == 0 else (1, 0)):
                t[j] = burst(children[j], mode)
            ta.append(t[0])
            tb.append(t[1])
            ratio.append(t[1] / t[0])
        med, q1, q3 = common._quartiles(ratio)
        out[mode] = dict(a_ms=statistics.median(ta), b_ms=statistics.median(tb),
                         ratio=med, ratio_q1=q1, ratio_q3=q3, turns=turns)
    for p in children:
        p.stdin.close()
        p.wait()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="tree A (the baseline), with its extension built in place")
    p.add_argument("b", help="tree B (the change)")
    p.add_argument("--turns", type=int, default=40)
    p.add_argument("--autocast", action="store_true",
                   help="the module under CPU bfloat16 autocast (float32 parameters and inputs)")
    p.add_argument("--backend", choices=("cpu", "triton"), default="cpu",
                   help="triton: that backend's host path, its kernel launches stubbed out")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    res = measure(args.a, args.b, args.turns, args.autocast, args.backend)
    for mode, r in res.items():
        print(f"{mode:8s} A {r['a_ms']:.4f} ms  B {r['b_ms']:.4f} ms  B/A {r['ratio']:.3f} "
              f"(quartiles {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}, {r['turns']} turns)")
    if args.out:
        meta = common.metadata(torch.device("cpu"))
        meta.update(threads=1, clock="time.thread_time", autocast="bfloat16" if args.autocast else None,
                    backend=args.backend,
                    triton_launches="stubbed (no kernel runs)" if args.backend == "triton" else None,
                    shape=dict(batch=bench_ops.PROXY_BATCH, **bench_ops.PROXY),
                    trees={k: _tree(t) for k, t in (("a", args.a), ("b", args.b))})
        with open(args.out, "w") as f:
            json.dump(dict(kind="proxy_ab", meta=meta, results=res), f, indent=1)


if __name__ == "__main__":
    main()
