"""The oracle: KDA and the DPLR delta rule by their definitions, and the chunkwise WY/UT
algorithm written out plainly (DESIGN.md sections 3-4; arXiv 2510.26692v2).

Tiers (DESIGN.md section 5): kda_recurrent_np is the gold (NumPy float64); kda_recurrent is
its differentiable PyTorch twin; kda_chunkwise is the chunkwise algorithm kernels implement.
kda_recurrent_backward_np is the gold of the backward (the adjoint recurrence), and
gates_backward holds the gradients of the fused activations. Nothing here imports from kernels/.
"""

from .chunkwise import (
    MATMUL_PRECISIONS,
    chunk_decay,
    compose_affine,
    kda_chunkwise,
    round_operand,
    ut_transform,
    wy_representation,
)
from .conventions import Dims, check_kda
from .dplr import dplr_recurrent, dplr_recurrent_np, kda_as_dplr
from .gates import beta_activation, check_gate_args, kda_gate, l2norm
from .gates_backward import beta_activation_backward_np, kda_gate_backward_np, l2norm_backward_np
from .kda import exp_via_exp2, kda_recurrent, kda_recurrent_np
from .kda_backward import kda_recurrent_backward_np

__all__ = [
    "MATMUL_PRECISIONS",
    "Dims",
    "beta_activation",
    "beta_activation_backward_np",
    "check_gate_args",
    "check_kda",
    "chunk_decay",
    "compose_affine",
    "dplr_recurrent",
    "dplr_recurrent_np",
    "exp_via_exp2",
    "kda_as_dplr",
    "kda_chunkwise",
    "kda_gate",
    "kda_gate_backward_np",
    "kda_recurrent",
    "kda_recurrent_backward_np",
    "kda_recurrent_np",
    "l2norm",
    "l2norm_backward_np",
    "round_operand",
    "ut_transform",
    "wy_representation",
]
