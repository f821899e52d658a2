"""Loading the compiled extension ``stvit_kernels._C`` safely.

``setup.py`` writes ``stvit_kernels/_build_info.py`` next to the extension with the torch version it
was compiled against and whether CUDA kernels were built. That file is read *before* the shared
library is loaded, so a torch upgrade after the build gives a clear message with the rebuild
command instead of an undefined-symbol crash. Importing ``stvit_kernels`` never fails because of the
extension: the ``cpu`` / ``cuda`` backends just report why they are unavailable.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _torch_release(version: str) -> str:
    return version.split("+")[0]


@functools.lru_cache(maxsize=None)
def load_error() -> Optional[str]:
    """None once ``stvit_kernels._C`` is loaded (its ``torch.ops.stvit`` ops registered), else why not."""
    try:
        from . import _build_info
    except ImportError:
        return ("the compiled extension stvit_kernels._C is not built "
                f"(build it with `{REBUILD}` after installing torch)")
    if _torch_release(_build_info.TORCH_VERSION) != _torch_release(torch.__version__):
        return (f"stvit_kernels._C was built against torch {_build_info.TORCH_VERSION} but torch "
                f"{torch.__version__} is installed; rebuild it with `{REBUILD}`")
    try:
        from . import _C  # noqa: F401  (registers the torch.ops.stvit ops)
    except ImportError as e:
        return f"stvit_kernels._C failed to load ({e}); rebuild it with `{REBUILD}`"
    from ._library import compiled_kernels

    compiled_kernels()  # fake implementations of the torch.ops.stvit ops
    return None


def built_with_cuda() -> bool:
    """True if the loaded extension contains the CUDA kernels."""
    if load_error() is not None:
        return False
    from . import _C

    return bool(_C.built_with_cuda())
