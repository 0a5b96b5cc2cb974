"""Built-in implementations behind the chunk_kda contract (see implementation.py).

- reference_chunk_kda: the chunkwise WY/UT oracle computed in float32. It is the project's
  default implementation until our Triton chunk_kda exists.
- reference_recurrent_kda: the PyTorch recurrence computed in float32; the correct control
  of the negative-control run (mutants.py wraps the same recurrence with bugs in it).
- fla_chunk_kda, fla_fused_recurrent_kda: flash-linear-attention (fla-core 0.6.0, optional).
"""

from __future__ import annotations

import torch

from reference import kda_chunkwise, kda_recurrent

from .implementation import Capabilities


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
reference_chunk_kda.kdaverify_capabilities = Capabilities()
reference_recurrent_kda = in_float32(kda_recurrent)
reference_recurrent_kda.kdaverify_capabilities = Capabilities()

DEFAULT_IMPL = "equivalence.adapters:reference_chunk_kda"
