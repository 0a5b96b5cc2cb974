"""Triton kernels for KDA, drop-ins for flash-linear-attention's functions of the same names
(calling convention: DESIGN.md section 3).

    chunk_kda            chunked WY/UT forward (kda_chunk.py) and, under autograd, its Triton backward
                         (kda_chunk_backward.py); chunk_kda_ieee: the same with fp32 dots
    fused_recurrent_kda  token-by-token recurrence, also the decode kernel (kda_fused_recurrent.py)
    fused_recurrent_dplr_delta_rule  the general DPLR delta rule token by token, forward only
                         (dplr_fused_recurrent.py)

Each carries a `kdaverify_capabilities` declaration for the conformance suite. Without a CUDA
GPU they run under Triton's interpreter (runtime.py).
"""

from . import runtime  # noqa: F401, I001  (first: it sets TRITON_INTERPRET before triton is imported)
from .kda_chunk import chunk_kda, chunk_kda_ieee
from .dplr_fused_recurrent import fused_recurrent_dplr_delta_rule
from .kda_fused_recurrent import fused_recurrent_kda

__all__ = ["chunk_kda", "chunk_kda_ieee", "fused_recurrent_dplr_delta_rule", "fused_recurrent_kda"]
