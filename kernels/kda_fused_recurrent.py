"""Fused recurrent KDA (token by token; also the decode kernel) in Triton. Not written yet."""

from __future__ import annotations


def fused_recurrent_kda(*args, **kwargs):
    raise NotImplementedError("fused_recurrent_kda: not written yet")
