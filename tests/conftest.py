import os

import pytest
import torch

# Without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors. The variable must
# be set before triton is first imported (it is read when the kernels are decorated).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


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
