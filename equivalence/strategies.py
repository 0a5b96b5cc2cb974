"""The Hypothesis strategies of the suite, in one place (DESIGN.md section 5).

Every test draws CaseSpecs from here: shapes (T = 1, ragged T, T not a multiple of any
chunk size, odd K and V, K != V, HV > H), gate regimes (zero, near 0, logsigmoid, mild,
safe, strong to -20, masked -1000), beta in [0, 1] or [0, 2], input scales from 1e-2 to
1e2, explicit or default scale, with and without an initial state, packed batches with
length-1 sequences, and long histories with small heads. Strategies respect an
implementation's declared capabilities, so an undeclared case is never drawn.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace

import numpy as np
from hypothesis import strategies as st

from .cases import GATE_REGIMES, CaseSpec
from .implementation import Capabilities

# Sizes that keep one CPU example in the milliseconds; chunk-boundary lengths included.
SHORT_T = st.one_of(st.integers(1, 40), st.sampled_from([15, 16, 17, 63, 64, 65, 80]))
SMALL_HEAD = st.integers(1, 12)
LONG_T = (1024, 3072)  # "several thousand tokens", at K, V <= 4 on the CPU

gates = st.sampled_from(sorted(GATE_REGIMES))
beta_max = st.sampled_from([1.0, 2.0])
input_scale = st.sampled_from([1e-2, 1e-1, 1.0, 10.0, 100.0])
scales = st.one_of(st.none(), st.sampled_from([1.0, 0.3, 0.0625]))
seeds = st.integers(0, 2**31 - 1)
DEFAULT_CAPS = Capabilities()


def partitions(total: int, max_parts: int = 5):
    """Lengths >= 1 summing to total, length-1 pieces likely."""

    @st.composite
    def draw(draw_):
        n = draw_(st.integers(1, min(max_parts, total)))
        cuts = draw_(st.lists(st.integers(1, total - 1), min_size=n - 1, max_size=n - 1, unique=True)) if n > 1 else []
        bounds = [0, *sorted(cuts), total]
        return tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))

    return draw()


def _head(caps: Capabilities, small: bool = False):
    if caps.head_sizes is None:
        return st.integers(1, 4) if small else SMALL_HEAD
    return st.sampled_from(sorted(caps.head_sizes)[:1] if small else sorted(caps.head_sizes))


@st.composite
def case_specs(
    draw,
    caps: Capabilities = DEFAULT_CAPS,
    T=SHORT_T,
    min_T: int = 1,
    packed: bool | None = None,
    min_B: int = 1,
    min_G: int = 1,
    small_heads: bool = False,
    **fixed,
):
    """A CaseSpec within caps. packed: True / False / None (either, if caps.varlen)."""
    T = draw(T.filter(lambda t: t >= min_T))
    if caps.max_T is not None:
        T = min(T, caps.max_T)
    if packed is None:
        packed = caps.varlen and T >= 2 and draw(st.booleans())
    G = draw(st.integers(min_G, 2)) if caps.gva else 1
    spec = dict(
        B=1 if packed else draw(st.integers(min_B, 3)),
        T=T,
        H=draw(st.integers(1, 2)),
        G=G,
        K=draw(_head(caps, small_heads)),
        V=draw(_head(caps, small_heads)),
        gate=draw(gates),
        beta_max=draw(beta_max),
        input_scale=draw(input_scale),
        scale=draw(scales),
        h0=draw(st.booleans()),
        seqlens=draw(partitions(T)) if packed else None,
        seed=draw(seeds),
    )
    spec.update(fixed)
    return CaseSpec(**spec)


@st.composite
def length_one_cases(draw, caps: Capabilities):
    """T == 1 rows, or (when varlen is declared) a packed batch with length-1 sequences."""
    if caps.varlen and draw(st.booleans()):
        lens = draw(st.lists(st.integers(1, 6), min_size=2, max_size=5).filter(lambda ls: 1 in ls))
        return draw(case_specs(caps, T=st.just(sum(lens)), packed=True, seqlens=tuple(lens)))
    return draw(case_specs(caps, T=st.just(1), packed=False))


def _long(caps: Capabilities):
    hi = LONG_T[1] if caps.max_T is None else min(LONG_T[1], caps.max_T)
    lo = min(LONG_T[0], hi)
    return case_specs(caps, T=st.integers(lo, hi), packed=False, small_heads=True, B=1, H=1)


CASE_FAMILIES = {
    "general": lambda caps: case_specs(caps),
    "long": _long,
    "length_one": length_one_cases,
    "shared_gate": lambda caps: case_specs(caps, shared_gate=True),
    "zero_beta": lambda caps: case_specs(caps, zero_beta=True, h0=True),
    "multi_token": lambda caps: case_specs(caps, min_T=2),
    "unpacked": lambda caps: case_specs(caps, min_T=2, packed=False),
    "varlen": lambda caps: case_specs(caps, min_T=2, packed=True).filter(lambda s: s.N >= 2),
    "batch": lambda caps: case_specs(caps, packed=False, min_B=2),
    "gva": lambda caps: case_specs(caps, min_G=2),
}


# ---------------------------------------------------------------- the bug classes that ship
# (issue 10): odd head sizes and ragged tails for the guard bands, empty sequences, and
# the sizes a GPU kernel sees (grids wider than the card, heads up to 256, compile buckets).


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# Head sizes a GPU run draws without a declaration: what models use, and sizes that are not
# powers of two, where a load without its mask reads past K (a block is next_power_of_2(K)).
GPU_HEAD_SIZES = (16, 32, 48, 64, 80, 96, 100, 128, 192, 256)
CHUNK_BOUNDARY_T = tuple(sorted({n for c in (16, 32, 64) for n in (c - 1, c, c + 1, 2 * c + 1)}))


# The most elements one input of a GPU case may have (B rows are capped to it): 128 MiB as
# the float64 arrays a case is made from on the host, so drawing a case stays under a second.
GPU_ELEMENTS = 2**24


@dataclass(frozen=True)
class Sizes:
    """The sizes a run draws on one kind of device.

    heads: K and V without a declaration; max_heads: H and HV at most; max_B: batch rows;
    many_seqs: the most sequences in a packed batch of short (1 to 3 token) sequences;
    buckets: on a GPU, the few (K, V, H, HV) a run draws from (None: independent draws).
    Every new (K, V, H, HV) makes a Triton kernel compile, and often autotune, again, so a
    GPU run draws them from a handful of buckets (compile_buckets) and lets B, T and the
    packing vary freely inside each."""

    heads: tuple[int, ...]
    max_heads: int
    max_B: int
    many_seqs: int
    buckets: tuple[tuple[int, int, int, int], ...] | None = None


CPU_SIZES = Sizes(heads=tuple(range(1, 13)), max_heads=2, max_B=3, many_seqs=8)


def compile_buckets(heads: tuple[int, ...], seed: int = 0, n: int = 4) -> tuple[tuple[int, int, int, int], ...]:
    """n (K, V, H, HV) buckets for one GPU run, deterministic in seed (KDAVERIFY_BUCKET_SEED
    rotates them between runs, so a nightly series covers every size). The first bucket is
    always the largest head (K = V = max), the second has K and V that are not powers of two
    (where unmasked loads go wrong) and many heads (H = 16, HV = 64, a grid wider than the
    card), the rest are drawn; HV is a multiple of H throughout."""
    rng = random.Random(seed)
    odd = [s for s in heads if not is_power_of_two(s)] or list(heads)
    top = max(heads)
    out = [(top, top, 2, 4), (rng.choice(odd), rng.choice(odd), 16, 64)]
    while len(out) < n:
        H = rng.choice((1, 2, 4, 8, 32))
        out.append((rng.choice(heads), rng.choice(heads), H, H * rng.choice((1, 2))))
    return tuple(out)


def sizes_for(device, head_sizes: tuple[int, ...] | None = None, seed: int | None = None) -> Sizes:
    """The draws of a run on device ("cuda..." or "cpu"): the issue-10 sizes on a GPU (K, V
    from GPU_HEAD_SIZES or the declared ones, H and HV up to 64, B up to 16, packed batches of
    up to 2000 sequences, in compile buckets), small ones on the CPU (the interpreter and the
    float64 oracle run there)."""
    if str(device).split(":")[0] != "cuda":
        return CPU_SIZES if head_sizes is None else replace(CPU_SIZES, heads=tuple(sorted(head_sizes)))
    heads = tuple(sorted(head_sizes)) if head_sizes else GPU_HEAD_SIZES
    seed = int(os.environ.get("KDAVERIFY_BUCKET_SEED", "0")) if seed is None else seed
    n = max(2, int(os.environ.get("KDAVERIFY_BUCKETS", "4")))  # fewer: fewer compiles, less coverage
    return Sizes(heads=heads, max_heads=64, max_B=16, many_seqs=2000, buckets=compile_buckets(heads, seed, n))


def _odd_first(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The sizes that are not powers of two, if any are allowed, else all of them."""
    return tuple(s for s in sizes if not is_power_of_two(s)) or sizes


@st.composite
def guard_band_cases(draw, caps: Capabilities):
    """Heads that are not powers of two (where a declared set allows them) and T not a
    multiple of 64 (a ragged tail chunk), with or without packing and an initial state."""
    heads = _odd_first(tuple(sorted(caps.head_sizes)) if caps.head_sizes else CPU_SIZES.heads)
    T = st.one_of(st.integers(1, 150), st.sampled_from(CHUNK_BOUNDARY_T)).filter(lambda t: t % 64)
    spec = draw(case_specs(caps, T=T))
    return spec.with_(K=draw(st.sampled_from(heads)), V=draw(st.sampled_from(heads)))


@st.composite
def empty_sequence_cases(draw, caps: Capabilities):
    """Packed batches with zero-length sequences (repeated offsets in cu_seqlens) at the
    start, in the middle and at the end, as serving engines produce them."""
    hi = 20 if caps.max_T is None else max(1, min(20, caps.max_T // 4))  # case_specs caps the total at max_T
    lens = draw(st.lists(st.integers(1, hi), min_size=1, max_size=4))
    places = draw(st.sets(st.sampled_from(("start", "middle", "end")), min_size=1))
    if "middle" in places and len(lens) >= 2:
        at = draw(st.integers(1, len(lens) - 1))
        lens[at:at] = [0] * draw(st.integers(1, 2))
    if "start" in places or ("middle" in places and len(lens) < 2):
        lens.insert(0, 0)
    if "end" in places:
        lens.append(0)
    return draw(case_specs(caps, T=st.just(sum(lens)), packed=True, seqlens=tuple(lens)))


@st.composite
def gpu_case_specs(draw, caps: Capabilities, sizes: Sizes, family: str = "general"):
    """A case of `family` at GPU sizes: (K, V, H, HV) from the run's compile buckets, then
    either B up to sizes.max_B rows, or (where varlen is declared) a packed batch of up to
    sizes.many_seqs sequences of 1 to 3 tokens, or a length at a chunk boundary."""
    spec = draw(CASE_FAMILIES[family](caps))
    buckets = [b for b in sizes.buckets if not caps.head_sizes or {b[0], b[1]} <= set(caps.head_sizes)]
    if family == "guard_bands":  # the guard bands want heads that are not powers of two
        buckets = [b for b in buckets if not (is_power_of_two(b[0]) and is_power_of_two(b[1]))] or buckets
    K, V, H, HV = draw(st.sampled_from(buckets or list(sizes.buckets)))
    G = HV // H if caps.gva else 1
    spec = spec.with_(K=K, V=V, H=H, G=max(G, spec.G))
    shape = draw(st.sampled_from(("as drawn", "rows", "many sequences", "chunk boundary")))
    if shape == "rows" and spec.seqlens is None and family != "long":
        row = spec.T * spec.HV * max(K, V)
        spec = spec.with_(B=draw(st.integers(1, max(1, min(sizes.max_B, GPU_ELEMENTS // row)))))
    elif shape == "many sequences" and spec.seqlens is not None and family in ("general", "varlen"):
        n = draw(st.one_of(st.just(sizes.many_seqs), st.integers(2, sizes.many_seqs)))
        lens = tuple(int(x) for x in 1 + np.random.default_rng(spec.seed).integers(0, 3, n))  # 1 to 3 tokens
        spec = spec.with_(T=sum(lens), seqlens=lens)
    elif shape == "chunk boundary" and spec.seqlens is None and family != "length_one":
        ragged = [t for t in CHUNK_BOUNDARY_T if t % 64 or family != "guard_bands"]  # guard bands want a ragged tail
        spec = spec.with_(T=draw(st.sampled_from(ragged)))
    return spec


def _one_case(caps: Capabilities):
    """A single fixed case: for checks that build their own inputs from its seed."""
    return st.just(CaseSpec(seed=0))


CASE_FAMILIES.update(
    guard_bands=guard_band_cases,
    empty_sequences=empty_sequence_cases,
    strided=lambda caps: case_specs(caps),
    one_case=_one_case,
)
FIXED_FAMILIES = ("one_case",)  # never resized to GPU sizes


def strategy_for(family: str, caps: Capabilities, device="cpu"):
    """The cases of `family` for an implementation on device: CASE_FAMILIES as they are on
    the CPU, at GPU sizes (sizes_for) in compile buckets on a GPU."""
    sizes = sizes_for(device, caps.head_sizes)
    if sizes.buckets is None or family in FIXED_FAMILIES:
        return CASE_FAMILIES[family](caps)
    return gpu_case_specs(caps, sizes, family)
