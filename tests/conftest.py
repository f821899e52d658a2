import os

import pytest
import torch

# Without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors. The variable must
# be set before triton is first imported (it is read when the kernels are decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # float32 means float32 in the GPU tests: no TF32 in cuBLAS / cuDNN (the refine's matmuls and
    # the official baseline's convolutions), so a float32 comparison sees the kernels' rounding only
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


#: ``STVIT_GPU_TIER=1`` (``make test-gpu``): run only the tests that put something on the GPU;
#: ``STVIT_GPU_TIER=dry-run`` selects the same way without asking for a GPU (tests of the selection).
GPU_TIER = os.environ.get("STVIT_GPU_TIER", "0") not in ("", "0")
#: Parameter values that put a test on the GPU (a backend, a device, a kernel family).
_GPU_VALUES = ("cuda", "triton")


def runs_on_gpu(item) -> bool:
    """Marked ``cuda`` (GPU-only tests) or ``gpu`` (a whole file of them), or parametrised with a
    GPU backend or device: ``cuda``, or ``triton``, which runs on the GPU whenever there is one."""
    if item.get_closest_marker("cuda") or item.get_closest_marker("gpu"):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(
        isinstance(v, str) and v in _GPU_VALUES for v in callspec.params.values())


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
    if GPU_TIER:
        if not torch.cuda.is_available() and os.environ["STVIT_GPU_TIER"] != "dry-run":
            raise pytest.UsageError("STVIT_GPU_TIER=1 (make test-gpu) needs a CUDA GPU")
        keep = [item for item in items if runs_on_gpu(item)]
        config.hook.pytest_deselected(items=[item for item in items if not runs_on_gpu(item)])
        items[:] = keep


@pytest.fixture
def poison_outputs(monkeypatch):
    """While active, every output and workspace buffer the fused kernels allocate starts as NaN, so
    that an element a kernel forgets to write (or a workspace value it reads before writing it)
    fails the comparison: the C++ CPU kernels through ``_C._set_poison`` when the extension is
    loaded, the Triton kernels through their one allocator ``triton_kernels._empty`` when triton
    is importable (the CUDA kernels are poisoned under their emulator, test_cuda_emulator.py).
    Use it with ``pytestmark = pytest.mark.usefixtures("poison_outputs")``."""
    from stvit_kernels import _ext

    try:
        from stvit_kernels import triton_kernels
    except ImportError:  # triton is not installed: nothing to poison there
        pass
    else:
        def nan_empty(shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

        monkeypatch.setattr(triton_kernels, "_empty", nan_empty)
    if _ext.load_error() is not None:
        yield
        return
    from stvit_kernels import _C

    _C._set_poison(True)
    try:
        yield
    finally:
        _C._set_poison(False)
