"""stvit: the STViT model (CVPR 2023) on top of the fused super token attention of stvit_kernels.

>>> import stvit
>>> model = stvit.stvit_small(num_classes=1000, drop_path_rate=0.1)
>>> stvit.load_official_checkpoint(model, "path/to/official_checkpoint.pth")
>>> logits = model(torch.randn(2, 3, 224, 224))                       # [2, 1000]
>>> backbone = stvit.stvit_base(features_only=True, out_indices=(1, 2, 3))
>>> feats = backbone(torch.randn(1, 3, 512, 512))                     # strides 8, 16, 32

With timm installed, ``timm.create_model("stvit_small", num_classes=10)`` works too (see stvit._timm;
timm is never imported here: the models are registered when timm is).
"""
from .model import (MODEL_CONFIGS, STViT, CheckpointMismatchError, LoadResult,
                    load_official_checkpoint, stvit_base, stvit_large, stvit_small)

__all__ = [
    "STViT", "stvit_small", "stvit_base", "stvit_large", "MODEL_CONFIGS",
    "load_official_checkpoint", "LoadResult", "CheckpointMismatchError",
]

from . import _timm

_timm.install()  # registers the models with timm when timm is (or gets) imported; no-op without it
