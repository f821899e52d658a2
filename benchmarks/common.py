"""Helpers shared by the benchmark scripts: timing, memory, run metadata, JSON output.

Timing
    * GPU: ``triton.testing.do_bench`` (CUDA events; it warms up, clears the L2 cache before every
      call and returns quantiles): the median and the 20 % / 80 % quantiles, in ms.
    * CPU: ``torch.utils.benchmark``. One callable: ``Timer.blocked_autorange`` (blocks of calls
      until ``min_run_time`` seconds, after one warm-up call). Several providers of one case
      (:func:`time_interleaved`): blocks timed with ``Timer.timeit`` in interleaved rounds, so
      the load of a shared machine weighs on all of them alike. The median and the IQR of the
      blocks, in ms.

    The callables the scripts time cycle through a small pool of distinct inputs
    (:func:`pool_size`), so a kernel never reads the same, cache-resident tensor twice in a row.

Per call, on a GPU (:func:`gpu_per_call`)
    * host time: calls enqueued back to back with no synchronisation between them, the host's
      time divided by their number (:func:`host_time`): what Python, dispatch and the launches
      cost. On a CPU the host does the work itself, so host time per call *is* the wall time.
    * GPU time: one call captured into a CUDA graph and the graph's replay timed like any call
      (:func:`graph_time`): the device's time without host overhead. A call that cannot be
      captured (a host synchronisation, CPU work, a backward whose graph was recorded before the
      capture) records why instead.
    * kernels per call: ``torch.profiler`` over a few calls (:func:`count_kernels`); copies and
      fills (``memcpy`` / ``memset``) are counted apart, and the kernels' summed time is the GPU
      busy time per call.

Memory
    * GPU: ``torch.cuda.max_memory_allocated()`` during one call minus ``memory_allocated()``
      before it (:func:`cuda_peak_bytes`): the extra memory that step needs on top of what is
      already allocated (inputs, weights and, in the ``bwd`` mode, the retained forward graph).
    * Any device: :func:`saved_bytes`, the bytes of the distinct storages that autograd saves for
      the backward during one forward (counted with ``torch.autograd.graph.saved_tensors_hooks``),
      not counting the inputs and parameters (the caller holds those anyway). This is the
      activation memory a training step holds between forward and backward; it leaves out the
      transient buffers of the forward itself, which only the GPU figure sees.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# torch.profiler (count_kernels) leaves NVIDIA's CUPTI attached after it stops unless Kineto tears it
# down, and an attached CUPTI slows every later CUDA call of the process: host times measured
# after a profiled call read high (pytorch/pytorch#144455). Teardown, unless the caller chose.
os.environ.setdefault("TEARDOWN_CUPTI", "1")

import torch  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Devices and run metadata
# ------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_kind(device: torch.device) -> str:
    """A short file-name tag: ``cpu``, or the GPU model (``h100``, ``a100``, ...), else ``cuda``."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else "cuda"


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except Exception:
        return None


def _python() -> str:
    """How the interpreter was called: a path relative to the repository when it lives there
    (``.venv/bin/python``), else its name."""
    exe = sys.executable or "python"
    rel = os.path.relpath(exe, REPO_ROOT)
    return rel if not rel.startswith("..") else os.path.basename(exe)


def _triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def metadata(device: torch.device, argv: Optional[Sequence[str]] = None) -> Dict:
    """Where, when and how a run was made: device, versions, date, the exact command."""
    import stvit_kernels as sk

    argv = sys.argv if argv is None else [sys.argv[0]] + list(argv)
    meta = dict(
        device=device_name(device), device_type=device.type, device_kind=device_kind(device),
        cpu=cpu_model(), cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
        python=platform.python_version(), torch=torch.__version__, triton=_triton_version(),
        cuda=torch.version.cuda, cudnn=(torch.backends.cudnn.version()
                                        if torch.backends.cudnn.is_available() else None),
        stvit_kernels=getattr(sk, "__version__", None), git_commit=_git("rev-parse", "HEAD"),
        git_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
        backends=sk.available_backends(), **library_provenance(),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        load_avg_start=_loadavg(),
        command=" ".join(([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else [])
                         + [_python()] + list(argv)),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(gpu_memory_bytes=props.total_memory,
                    gpu_l2_bytes=getattr(props, "L2_cache_size", None),
                    gpu_sms=props.multi_processor_count)
    return meta


def library_provenance() -> Dict:
    """Which ``stvit_kernels`` the run imported: its folder, the commit of the checkout it lives in
    and whether that checkout's library sources (``stvit_kernels/``, ``csrc/``) differ from the
    commit. A baseline measured from another worktree (``git worktree add /tmp/base HEAD``) says so
    here, while ``git_commit`` / ``git_dirty`` describe the checkout of the benchmark scripts."""
    import stvit_kernels as sk

    pkg = os.path.dirname(os.path.realpath(sk.__file__))
    root = os.path.dirname(pkg)
    out = dict(stvit_kernels_path=pkg, stvit_kernels_commit=None, stvit_kernels_dirty=None)
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                        timeout=10)
        head = run("rev-parse", "HEAD")
        if head.returncode == 0:
            status = run("status", "--porcelain", "--untracked-files=no", "--", "stvit_kernels", "csrc")
            out.update(stvit_kernels_commit=head.stdout.strip(),
                       stvit_kernels_dirty=bool(status.stdout.strip()) if status.returncode == 0 else None)
    except Exception:
        pass
    return out


def _loadavg() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (how busy a shared machine was), None if unknown."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def threads_str(n) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def busy_warning(meta: Dict) -> Optional[str]:
    """A warning line when a CPU run started on a busy machine (1-minute load average above half
    the cores): with several threads, every parallel region then waits for descheduled threads and
    CPU timings swing by orders of magnitude; one thread (``--threads 1``) is much steadier."""
    load, cores = meta.get("load_avg_start"), meta.get("cpu_count") or 1
    if meta.get("device_type") != "cpu" or not load or load[0] <= 0.5 * cores:
        return None
    if (meta.get("threads") or 1) > 1:
        return (f"WARNING: the machine was busy (load average {load[0]:g} on {cores} cores) when this "
                f"run started: CPU timings with {threads_str(meta.get('threads'))} are unreliable; "
                f"--threads 1 is steadier")
    return (f"note: the machine was busy (load average {load[0]:g} on {cores} cores): times are "
            f"inflated; the providers ran in interleaved rounds, so their ratios hold better")


def save_json(path: str, payload: Dict) -> None:
    """Write ``payload`` as JSON (adding ``meta.load_avg_end``)."""
    if isinstance(payload.get("meta"), dict):
        payload["meta"]["load_avg_end"] = _loadavg()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    print(f"saved {path}", file=sys.stderr)


def save_results(path: str, payload: Dict, plot: bool) -> None:
    """``save_json``, then the plots of the file (``plot.plot_file``) with ``plot``."""
    save_json(path, payload)
    if plot:
        import plot as plotting

        plotting.plot_file(path)


def merge_results(path: str, rows: List[Dict], key_fields: Sequence[str], meta: Dict,
                  same: Dict[str, object]) -> tuple:
    """``--append``: the rows of the results file at ``path`` (if any) that this run did not
    measure again, followed by this run's rows; and the list of commands that made them. ``same``
    names config values that must agree (``{"dtype": "float32"}``), checked with the device."""
    if not os.path.exists(path):
        return rows, [meta["command"]]
    with open(path) as f:
        old = json.load(f)
    if old["meta"].get("device") != meta["device"]:
        raise SystemExit(f"--append: {path} holds results of {old['meta'].get('device')!r}, "
                         f"this run is on {meta['device']!r}")
    for k, v in same.items():
        if old.get("config", {}).get("args", {}).get(k) != v:
            raise SystemExit(f"--append: {path} was run with {k}={old['config']['args'].get(k)!r}, "
                             f"this run has {k}={v!r}")
    new_keys = {tuple(r.get(k) for k in key_fields) for r in rows}
    kept = [r for r in old["results"] if tuple(r.get(k) for k in key_fields) not in new_keys]
    commands = old["meta"].get("commands") or [old["meta"]["command"]]
    return kept + rows, commands + [meta["command"]]


def fused_backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    """The compiled / Triton backends that can take tensors of this device and dtype, fastest
    first (``auto``'s order). Triton on the CPU (its interpreter, ``TRITON_INTERPRET=1``) is a
    correctness tool, not a performance provider, and is left out."""
    import stvit_kernels as sk
    from stvit_kernels.backends import _auto_candidates, get_backend

    avail = set(sk.available_backends())
    order = list(_auto_candidates(device)) + ["cuda", "triton", "cpu"]
    out = []
    for name in dict.fromkeys(order):
        if name == "reference" or name not in avail:
            continue
        if name == "triton" and device.type != "cuda":
            continue
        if get_backend(name).decline_reason(device) is None:
            out.append(name)
    return out


# ------------------------------------------------------------------------------------------------
# Inputs, timing, memory
# ------------------------------------------------------------------------------------------------

def pool_size(bytes_per_set: int, device: torch.device, max_sets: int = 8) -> int:
    """How many distinct input sets to cycle through: enough that together they are several times
    the last-level cache (GPU: 4x L2; CPU: 64 MiB), at least 2, at most ``max_sets``."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
        target = 4 * l2
    else:
        target = 64 << 20
    return int(min(max_sets, max(2, math.ceil(target / max(1, bytes_per_set)))))


class Cycle:
    """``next()`` returns the items of a list in turn, forever."""

    def __init__(self, items: Sequence):
        self.items, self.i = list(items), 0

    def next(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def per_call_us(fns: Sequence[Callable[[], object]], n: int = 5000, rounds: int = 15) -> List[float]:
    """Per call of each of ``fns``: the best of ``rounds`` blocks of ``n`` calls, the functions
    taking turns block by block (so a busy spell of a shared machine hits them all)."""
    for fn in fns:
        for _ in range(n // 5):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.thread_time()
            for _ in range(n):
                fn()
            best[i] = min(best[i], (time.thread_time() - t) / n * 1e6)
    return best


def stub_triton_launches(record: Optional[List] = None) -> Dict[str, object]:
    """Replace every Triton kernel of ``stvit_kernels.triton_kernels`` by one whose launch does
    nothing (the host path alone, timed on a CPU under ``TRITON_INTERPRET=1``: the plans, the
    workspaces, the arguments, the autograd nodes, but neither the kernels nor Triton's launcher);
    with ``record``, each launch appends ``(kernel, grid, kwargs)`` to it. Returns the kernels
    replaced, by name (to put back); raises if there are none (a renamed module would time
    nothing)."""
    from stvit_kernels import triton_kernels as tk

    class NoLaunch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            if record is None:
                return lambda *args, **kwargs: None
            return lambda **kwargs: record.append((self.kernel, grid, kwargs))

    kernels = {k: v for k, v in vars(tk).items() if k.endswith("_kernel")}
    if not kernels:
        raise RuntimeError("no Triton kernels found in stvit_kernels.triton_kernels to stub")
    for k, v in kernels.items():
        setattr(tk, k, NoLaunch(v))
    return kernels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5,
              rep_ms: int = 100) -> Dict[str, float]:
    """Time ``fn()``: ``{"ms": median, "ms_lo": ..., "ms_hi": ..., "n": calls measured}``.

    GPU: ``triton.testing.do_bench`` (25 ms warm-up, ``rep_ms`` of repetitions, quantiles 0.5 /
    0.2 / 0.8). CPU: ``torch.utils.benchmark`` blocked autorange (median and quartiles of the blocks)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        med, lo, hi = do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return dict(ms=float(med), ms_lo=float(lo), ms_hi=float(hi), n=None)
    import torch.utils.benchmark as tb

    fn()  # warm-up (first-call allocations, lazy initialisation)
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                 ).blocked_autorange(min_run_time=min_run_time)
    ts = sorted(m.times)
    q = lambda p: ts[min(len(ts) - 1, int(p * (len(ts) - 1) + 0.5))]  # noqa: E731
    return dict(ms=m.median * 1e3, ms_lo=q(0.25) * 1e3, ms_hi=q(0.75) * 1e3,
                n=len(m.times) * m.number_per_run)


def time_interleaved(fns: Dict[str, Callable[[], object]], min_run_time: float = 0.3,
                     min_rounds: int = 3, block_s: float = 0.05
                     ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, BaseException]]:
    """CPU: time several callables (the providers of one case and mode) in interleaved rounds, so
    that load changes on a shared machine hit all of them alike and their ratios stay honest.

    Each round times one block of every callable, in an order rotated from round to round, with
    ``torch.utils.benchmark.Timer.timeit(n)`` (``n`` calls, about ``block_s`` seconds, at least
    one; round 0 is one call each, which sizes the blocks: the callables must be warm already);
    rounds go on until every callable has run ``min_run_time`` seconds and ``min_rounds`` rounds.
    Returns, per callable, the median of its blocks' per-call times and their quartiles in ms;
    and the exceptions of the callables that raised (they leave the rounds, the others go on)."""
    import torch.utils.benchmark as tb

    names = list(fns)
    timers = {k: tb.Timer(stmt="fn()", globals={"fn": fns[k]}, num_threads=torch.get_num_threads())
              for k in names}
    number = {k: 1 for k in names}   # round 0: one call each, which also sizes the blocks
    blocks: Dict[str, List[float]] = {k: [] for k in names}
    calls = {k: 0 for k in names}
    spent = {k: 0.0 for k in names}
    errors: Dict[str, BaseException] = {}
    r = 0
    while names and (r < min_rounds or min(spent[k] for k in names) < min_run_time):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            try:
                m = timers[k].timeit(number[k])
            except Exception as e:  # noqa: BLE001
                errors[k] = e
                names.remove(k)
                continue
            blocks[k].append(m.median)
            calls[k] += number[k]
            spent[k] += m.median * number[k]
            if r == 0:
                number[k] = max(1, int(block_s / max(m.median, 1e-7)))
        r += 1
    out = {}
    for k in names:
        ts = sorted(blocks[k])
        q = lambda p: ts[min(len(ts) - 1, int(p * (len(ts) - 1) + 0.5))]  # noqa: E731
        med = ts[len(ts) // 2] if len(ts) % 2 else 0.5 * (ts[len(ts) // 2 - 1] + ts[len(ts) // 2])
        out[k] = dict(ms=med * 1e3, ms_lo=q(0.25) * 1e3, ms_hi=q(0.75) * 1e3, n=calls[k], rounds=len(ts))
    return out, errors


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak extra GPU memory of one ``fn()`` call above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return int(peak)


def _quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    """Median, lower and upper quartile of a non-empty list."""
    ts = sorted(values)
    q = lambda p: ts[min(len(ts) - 1, int(p * (len(ts) - 1) + 0.5))]  # noqa: E731
    n = len(ts)
    med = ts[n // 2] if n % 2 else 0.5 * (ts[n // 2 - 1] + ts[n // 2])
    return med, q(0.25), q(0.75)


def host_time(step: Callable[[], object], device: torch.device, calls: int = 10,
              blocks: int = 21) -> Dict[str, float]:
    """GPU: the host's time per call, in ms: blocks of ``calls`` calls enqueued back to back with no
    synchronisation between them (the device is synchronised before each block, not inside it);
    median and quartiles over the blocks. ``calls`` should keep the launches of a block well under
    the device's launch queue (~1000), or a full queue makes the host wait for the GPU."""
    sync(device)
    per_call = []
    for _ in range(blocks):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        per_call.append((time.perf_counter() - t0) / calls)
    sync(device)
    med, lo, hi = _quartiles(per_call)
    return dict(host_ms=med * 1e3, host_ms_lo=lo * 1e3, host_ms_hi=hi * 1e3, host_calls=calls)


def graph_time(step: Callable[[], object], device: torch.device, warmup: int = 3) -> Dict[str, float]:
    """GPU: the device's time per call without host overhead, in ms: one ``step()`` captured into a
    CUDA graph (after ``warmup`` calls on a side stream, as ``torch.cuda.graph`` requires), the
    graph's replay timed with :func:`time_call` (L2 flushed, like the wall time). Raises if the call
    cannot be captured."""
    sync(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
        t = time_call(graph.replay, device)
    finally:
        del graph
        sync(device)
        torch.cuda.empty_cache()
    return dict(gpu_ms=t["ms"], gpu_ms_lo=t["ms_lo"], gpu_ms_hi=t["ms_hi"])


def count_kernels(step: Callable[[], object], device: torch.device, calls: int = 3) -> Dict[str, float]:
    """GPU: kernels launched per call (``torch.profiler`` over ``calls`` warm calls), the copies and
    fills per call (``memcpy`` / ``memset``, counted apart), and the kernels' summed device time per
    call in ms (``gpu_busy_ms``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        sync(device)
    kernels = memops = 0
    busy_us = 0.0
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            continue
        act = (getattr(e, "activity_type", None) or "").lower()
        name = e.name or ""
        if act:
            kind = "kernel" if act == "kernel" else "memop" if act in ("gpu_memcpy", "gpu_memset") else None
        elif getattr(e, "is_user_annotation", False):
            kind = None
        else:
            kind = "memop" if name.startswith(("Memcpy", "Memset")) else "kernel"
        if kind == "kernel":
            kernels += 1
            busy_us += e.time_range.elapsed_us()
        elif kind == "memop":
            memops += 1
    if kernels == 0 and memops == 0:
        raise RuntimeError("the profiler recorded no GPU activity")
    return dict(kernels=kernels / calls, memops=memops / calls, gpu_busy_ms=busy_us / calls / 1e3)


def root_cause(e: BaseException) -> BaseException:
    """The first exception of a chain (a failed CUDA-graph capture raises again on leaving the
    capture; the first error says why)."""
    seen = set()
    while e.__context__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__context__
    return e


def gpu_per_call(step: Callable[[], object], device: torch.device, graphable: bool = True,
                 not_graphable_note: Optional[str] = None, launches_hint: int = 30) -> Dict:
    """GPU: the per-call breakdown of one timed step, each part guarded on its own: ``host_ms``
    (:func:`host_time`, with blocks of at most ~500 launches), ``gpu_ms`` (:func:`graph_time`),
    then ``kernels``, ``memops``, ``gpu_busy_ms`` (:func:`count_kernels`) last: the profiler's CUPTI
    would slow the host's CUDA calls timed after it (the TEARDOWN_CUPTI note above). A part that
    fails records ``<part>_note`` instead; ``graphable=False`` skips the capture with
    ``not_graphable_note``; ``launches_hint``: kernels + copies per call, for the host blocks."""
    out: Dict = {}

    def note(e: BaseException) -> str:
        r = root_cause(e)
        msg = str(r).strip().splitlines()[0] if str(r).strip() else ""
        return f"{type(r).__name__}: {msg[:200]}"

    try:
        out.update(host_time(step, device, calls=int(max(2, min(20, 500 // launches_hint)))))
    except Exception as e:  # noqa: BLE001
        out["host_note"] = note(e)
    if not graphable:
        out["gpu_note"] = not_graphable_note or "not captured"
    else:
        try:
            out.update(graph_time(step, device))
        except Exception as e:  # noqa: BLE001
            out["gpu_note"] = "CUDA-graph capture failed: " + note(e)
    try:
        out.update(count_kernels(step, device))
    except Exception as e:  # noqa: BLE001
        out["kernels_note"] = note(e)
    sync(device)
    return out


def saved_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``forward()`` runs
    (with gradients enabled), leaving out the storages of ``exclude`` (inputs, parameters)."""
    excluded = set()
    for t in exclude:
        excluded.add(t.untyped_storage().data_ptr())
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            key = st.data_ptr()
            if key not in excluded:
                seen[key] = max(seen.get(key, 0), st.nbytes())
        except Exception:  # a tensor without a plain storage: not counted
            pass
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return int(sum(seen.values()))


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> Dict[str, float]:
    """The device's achieved copy bandwidth: ``dst.copy_(src)`` of ``nbytes`` (read + write,
    so ``2 * nbytes`` moved), timed like everything else. In GB/s (1e9 bytes)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, min_run_time=0.3)
    gbps = 2 * n * 4 / (t["ms"] * 1e-3) / 1e9
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(bytes=2 * n * 4, ms=t["ms"], gbps=gbps)


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def target_strings(t: Dict, ascii_only: bool = False) -> Tuple[str, str]:
    """``(measured, threshold)`` of a target row as text: ``2.50x`` / ``>= 3x``, ``75%`` /
    ``>= 70%``, ``0.412 ms`` / ``<= 0.2 ms``; ``not measured`` and ``info`` where missing."""
    unit, le = t.get("unit", "x"), t.get("direction", ">=") == "<="
    op = ("<=" if le else ">=") if ascii_only else ("≤" if le else "≥")

    def fmt(v, thr=False):
        if unit == "fraction":
            return f"{100 * v:.0f}%"
        if unit == "ms":
            return f"{fmt_ms(v)} ms"
        return f"{v:g}x" if thr else f"{v:.2f}x"

    val = "not measured" if t.get("value") is None else fmt(t["value"])
    thr = "info" if t.get("threshold") is None else f"{op} {fmt(t['threshold'], thr=True)}"
    return val, thr
