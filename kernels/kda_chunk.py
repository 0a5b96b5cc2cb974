"""Chunked KDA forward (the chunkwise WY/UT algorithm of DESIGN.md section 4) in Triton.
Not written yet."""

from __future__ import annotations


def chunk_kda(*args, **kwargs):
    raise NotImplementedError("chunk_kda: not written yet")
