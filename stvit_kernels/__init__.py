"""stvit_kernels: fused Super Token Attention (STViT, CVPR 2023) for PyTorch.

>>> import stvit_kernels as sk
>>> A = sk.stoken_affinity(x, s, 8)                 # [B, 9, H, W]
>>> num, den = sk.stoken_aggregate(x, A, 8)         # [B, C, H/8, W/8], [B, 1, H/8, W/8]
>>> y = sk.stoken_upsample(num / (den + 1e-12), A, 8)
>>> sta = sk.SuperTokenAttention(64, stoken_size=8, num_heads=1)
"""
from .backends import available_backends, explain, use_backend
from .module import RefineAttention, SuperTokenAttention
from .ops import associate, stoken_affinity, stoken_aggregate, stoken_upsample

__version__ = "0.1.0"

__all__ = [
    "stoken_affinity", "stoken_aggregate", "stoken_upsample", "associate",
    "SuperTokenAttention", "RefineAttention",
    "available_backends", "use_backend", "explain",
]
