"""The calling convention of DESIGN.md section 3, checked in one place.

Every entry point of the oracle (NumPy and PyTorch, recurrent and chunkwise, KDA and
DPLR) validates its arguments here, so a bad call fails the same way everywhere: with a
ValueError that names the argument and the shape that was expected.

Notation: B batch, T tokens, H query/key heads, HV value heads (HV = G * H, value head j
reads query/key head j // G), K key size, V value size, N sequences (B, or len(cu_seqlens) - 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sizes:
    """The sizes of a KDA call, in one place for every layer that names them (the oracle's
    Dims, the kernels' validated Call, the perf models, the large-offset cases):
    q, k [B, T, H, K]; v [B, T, HV, V]."""

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int

    @property
    def group(self) -> int:
        """G = HV // H: how many value heads share one query/key head."""
        return self.HV // self.H


@dataclass(frozen=True)
class Dims(Sizes):
    """Sizes read off a validated call, with N the number of sequences (B, or
    len(cu_seqlens) - 1)."""

    N: int


def _shape(x, name: str) -> tuple[int, ...]:
    if x is None or not hasattr(x, "shape"):
        raise ValueError(f"{name}: expected an array or tensor, got {type(x).__name__}")
    return tuple(int(s) for s in x.shape)


def _expect(name: str, shape: tuple[int, ...], expected: tuple[int, ...], layout: str) -> None:
    if shape != expected:
        raise ValueError(f"{name}: expected shape {layout} = {expected}, got {shape}")


def check_cu_seqlens(cu_seqlens, B: int, T: int) -> list[tuple[int, int]]:
    """Validate cu_seqlens and return the [start, end) span of each sequence.

    cu_seqlens: integer [N+1] with cu_seqlens[0] == 0, non-decreasing, last entry == T,
    and B == 1. A repeated offset is an empty sequence, as serving engines produce them: it
    has no tokens, and its final state is its initial state (zeros without one).
    Without cu_seqlens every batch row is one sequence spanning [0, T).
    """
    if cu_seqlens is None:
        return [(0, T)] * B
    cs = np.asarray(cu_seqlens.detach().cpu() if hasattr(cu_seqlens, "detach") else cu_seqlens)
    if cs.ndim != 1 or cs.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D array [N+1] with N >= 1, got shape {cs.shape}")
    if not np.issubdtype(cs.dtype, np.integer):
        raise ValueError(f"cu_seqlens: expected an integer dtype (int64), got {cs.dtype}")
    if B != 1:
        raise ValueError(f"cu_seqlens: a packed batch requires B == 1, got B = {B}")
    if cs[0] != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {int(cs[0])}")
    if np.any(np.diff(cs) < 0):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {cs.tolist()}")
    if cs[-1] != T:
        raise ValueError(f"cu_seqlens: expected the last offset to equal T = {T}, got {int(cs[-1])}")
    return [(int(a), int(b)) for a, b in zip(cs[:-1], cs[1:], strict=True)]


def check_qkv(q, k, v) -> tuple[int, int, int, int, int, int]:
    """q, k: [B, T, H, K]; v: [B, T, HV, V] with HV a multiple of H. Returns B, T, H, HV, K, V."""
    qs, ks, vs = _shape(q, "q"), _shape(k, "k"), _shape(v, "v")
    if len(qs) != 4:
        raise ValueError(f"q: expected rank 4 [B, T, H, K], got shape {qs}")
    B, T, H, K = qs
    if min(qs) < 1:
        raise ValueError(f"q: expected every dimension of [B, T, H, K] >= 1, got {qs}")
    _expect("k", ks, qs, "[B, T, H, K]")
    if len(vs) != 4 or vs[:2] != (B, T) or vs[2] < 1 or vs[3] < 1:
        raise ValueError(f"v: expected shape [B, T, HV, V] = ({B}, {T}, HV, V), got {vs}")
    HV, V = vs[2], vs[3]
    if HV % H:
        raise ValueError(f"v: expected HV (v.shape[2] = {HV}) to be a multiple of H = {H}")
    return B, T, H, HV, K, V


def check_state(initial_state, N: int, HV: int, K: int, V: int) -> None:
    if initial_state is not None:
        _expect("initial_state", _shape(initial_state, "initial_state"), (N, HV, K, V), "[N, HV, K, V]")


def check_scale(scale, K: int) -> float:
    """scale defaults to K ** -0.5; a given scale must be a finite number."""
    if scale is None:
        return K**-0.5
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale: expected a finite number, got {scale!r}") from None
    if not np.isfinite(s):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return s


def check_kda(q, k, v, g, beta, scale, initial_state, cu_seqlens):
    """Validate a KDA call. Returns (Dims, scale, spans)."""
    B, T, H, HV, K, V = check_qkv(q, k, v)
    _expect("g", _shape(g, "g"), (B, T, HV, K), "[B, T, HV, K]")
    _expect("beta", _shape(beta, "beta"), (B, T, HV), "[B, T, HV]")
    spans = check_cu_seqlens(cu_seqlens, B, T)
    N = len(spans) if cu_seqlens is not None else B
    check_state(initial_state, N, HV, K, V)
    return Dims(B, T, H, HV, K, V, N), check_scale(scale, K), spans


def check_dplr(q, k, v, a, b, gk, scale, initial_state, cu_seqlens):
    """Validate a DPLR call: q, k [B, T, H, K]; a, b, gk [B, T, HV, K]; v [B, T, HV, V]."""
    B, T, H, HV, K, V = check_qkv(q, k, v)
    for name, x in (("a", a), ("b", b), ("gk", gk)):
        _expect(name, _shape(x, name), (B, T, HV, K), "[B, T, HV, K]")
    spans = check_cu_seqlens(cu_seqlens, B, T)
    N = len(spans) if cu_seqlens is not None else B
    check_state(initial_state, N, HV, K, V)
    return Dims(B, T, H, HV, K, V, N), check_scale(scale, K), spans


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise ValueError(f"chunk_size: expected a power of two >= 1 (an int), got {chunk_size!r}")
    c = int(chunk_size)
    if c < 1 or c & (c - 1):
        raise ValueError(f"chunk_size: expected a power of two >= 1, got {chunk_size}")
    return c


def check_cotangents(dims: Dims, do, dht) -> None:
    """The cotangents of a KDA call: do [B, T, HV, V] (or None: no loss on o) and dht
    [N, HV, K, V] (or None: no loss on the final state)."""
    if do is not None:
        _expect("do", _shape(do, "do"), (dims.B, dims.T, dims.HV, dims.V), "[B, T, HV, V]")
    if dht is not None:
        _expect("dht", _shape(dht, "dht"), (dims.N, dims.HV, dims.K, dims.V), "[N, HV, K, V]")
