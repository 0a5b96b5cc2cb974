"""Triton kernels for KDA, drop-ins for flash-linear-attention's functions of the same names
(calling convention: DESIGN.md section 3).

    chunk_kda            chunked WY/UT forward (kda_chunk.py)
    fused_recurrent_kda  token-by-token recurrence, also the decode kernel (kda_fused_recurrent.py)

Each carries a `kdaverify_capabilities` declaration for the conformance suite. Without a CUDA
GPU they run under Triton's interpreter (runtime.py).
"""

from . import runtime  # noqa: F401  (first: it switches the interpreter on before any kernel is decorated)
from .kda_chunk import chunk_kda
from .kda_fused_recurrent import fused_recurrent_kda

__all__ = ["chunk_kda", "fused_recurrent_kda"]
