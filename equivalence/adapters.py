"""Built-in implementations behind the chunk_kda contract (see implementation.py).

- reference_chunk_kda: the chunkwise WY/UT oracle computed in float32. It is the project's
  default implementation until our Triton chunk_kda exists.
- reference_recurrent_kda: the PyTorch recurrence computed in float32; the correct control
  of the negative-control run (mutants.py wraps the same recurrence with bugs in it).
- fla_chunk_kda, fla_fused_recurrent_kda: flash-linear-attention (fla-core 0.6.0, optional).
"""

from __future__ import annotations

from kdaverify.reference import kda_chunkwise, kda_recurrent

from .implementation import Capabilities
from .strategies import GPU_HEAD_SIZES


def in_float32(fn):
    """Run a reference that computes in the dtype of q in float32 instead, and return o in
    the input dtype and the state in float32, as the calling convention asks."""

    def call(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        args = (x.float() for x in (q, k, v, g, beta))
        h0 = None if initial_state is None else initial_state.float()
        o, S = fn(*args, scale=scale, initial_state=h0, output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return o.to(q.dtype), S

    call.__name__ = call.__qualname__ = fn.__name__
    call.__doc__ = f"{fn.__name__} in float32 behind the chunk_kda contract."
    return call


reference_chunk_kda = in_float32(kda_chunkwise)
# autograd runs through it, but it is one of the gradient checks' own references: not declared
reference_chunk_kda.kdaverify_capabilities = Capabilities()
reference_recurrent_kda = in_float32(kda_recurrent)
reference_recurrent_kda.kdaverify_capabilities = Capabilities(backward=True)  # autograd runs through it

DEFAULT_IMPL = "kdaverify.equivalence.adapters:reference_chunk_kda"


# ---------------------------------------------------------------- flash-linear-attention

FLA_DISPATCH_ENV = "FLA_DISABLE_BACKEND_DISPATCH"


def _fla_kda():
    """Import fla.ops.kda with fla's backend dispatch off, so its Triton kernels are what runs
    (fla-core 0.6.0 otherwise routes some calls to FlashKDA or TileLang when installed).
    fla reads the switch once, at import: importing it earlier without the switch is an error."""
    import os
    import sys

    if "fla" in sys.modules and os.environ.get(FLA_DISPATCH_ENV) != "1":
        raise RuntimeError(f"fla was imported before {FLA_DISPATCH_ENV}=1 was set; its backend dispatch may be on")
    os.environ[FLA_DISPATCH_ENV] = "1"
    try:
        import fla.ops.kda as kda
    except ImportError as e:
        raise ImportError("the fla adapters need flash-linear-attention: pip install 'kdaverify[fla]'") from e
    return kda


# What fla-core 0.6.0's KDA kernels declare. chunk_kda's tl.dot calls take float32 operands
# at Triton's default precision (TF32 on Ampere and newer: truncated operands, see
# reference.round_operand) and bf16 operands for bf16 inputs;
# fused_recurrent_kda does no dot products (fp32 FMA throughout). Both take GVA, cu_seqlens,
# the in-kernel gate (A_log, dt_bias, lower_bound) and the in-kernel q/k L2 norm; K <= 256, and
# tl.dot wants K, V >= 16, so the suite gives them the GPU head sizes of issue 10 (16 to 256,
# not only powers of two: strategies.GPU_HEAD_SIZES). Strided inputs and empty sequences are
# not declared, so the suite holds them to the defaults (yes): what users pass them.
_FLA_CAPS = dict(head_sizes=GPU_HEAD_SIZES, gate_in_kernel=True, l2norm_in_kernel=True)


def fla_chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw):
    """flash-linear-attention's chunk_kda (Triton path, dispatch off)."""
    return _fla_kda().chunk_kda(
        q, k, v, g, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, **kw,
    )  # fmt: skip


def fla_fused_recurrent_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kw
):
    """flash-linear-attention's fused_recurrent_kda (Triton path, dispatch off)."""
    return _fla_kda().fused_recurrent_kda(
        q, k, v, g, beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, **kw,
    )  # fmt: skip


# chunk_kda is a torch.autograd.Function with a Triton backward
fla_chunk_kda.kdaverify_capabilities = Capabilities(precision="tf32", backward=True, **_FLA_CAPS)
fla_fused_recurrent_kda.kdaverify_capabilities = Capabilities(precision="ieee", **_FLA_CAPS)
fla_chunk_kda.kdaverify_requires = fla_fused_recurrent_kda.kdaverify_requires = ("fla",)


def fla_chunk_dplr_delta_rule(
    q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None
):
    """flash-linear-attention's chunk_dplr_delta_rule (Triton path, dispatch off): the general
    DPLR rule S_t = (Diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T, shapes as
    reference.dplr_recurrent with HV = H. Not a chunk_kda-contract callable (it takes a, b, gk)."""
    _fla_kda()  # sets the dispatch switch before fla's first import, or refuses
    from fla.ops.generalized_delta_rule import chunk_dplr_delta_rule

    return chunk_dplr_delta_rule(
        q=q, k=k, v=v, a=a, b=b, gk=gk, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )  # fmt: skip
