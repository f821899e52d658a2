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
