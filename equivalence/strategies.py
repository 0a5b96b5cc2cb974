"""The Hypothesis strategies of the suite, in one place (DESIGN.md section 5).

Every test draws CaseSpecs from here: shapes (T = 1, ragged T, T not a multiple of any
chunk size, odd K and V, K != V, HV > H), gate regimes (zero, near 0, logsigmoid, mild,
safe, strong to -20, masked -1000), beta in [0, 1] or [0, 2], input scales from 1e-2 to
1e2, explicit or default scale, with and without an initial state, packed batches with
length-1 sequences, and long histories with small heads. Strategies respect an
implementation's declared capabilities, so an undeclared case is never drawn.

The sizes kernels tile by are families of their own, each pairing its large dimension with
small others to keep CPU time bounded: wide heads (K, V of 16 to 130 at short T), many tiles
(G in {1, 2, 3, 4, 8}, H up to 3, HV up to 16, more than 64 (sequence, head) tiles in one
call), block edges (T across 1 to 1024 with 64k - 1, 64k, 64k + 1) and packed batches whose
sequences are longer than one chunk. A class a random draw could miss is reached by explicit
examples (EXAMPLES), which every profile runs on every run; cases_for applies both.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from .capabilities import GPU_HEAD_SIZES
from .cases import GATE_REGIMES, CaseSpec
from .implementation import Capabilities

# Sizes that keep one CPU example in the milliseconds; chunk-boundary lengths included.
SHORT_T = st.one_of(st.integers(1, 40), st.sampled_from([15, 16, 17, 63, 64, 65, 80]))
SMALL_HEAD = st.integers(1, 12)
LONG_T = (1024, 3072)  # "several thousand tokens", at K, V <= 4 on the CPU

gates = st.sampled_from(sorted(GATE_REGIMES))
finite_gates = st.sampled_from(sorted(set(GATE_REGIMES) - {"reset"}))  # for reset_gates=False
beta_max = st.sampled_from([1.0, 2.0])
input_scale = st.sampled_from([1e-2, 1e-1, 1.0, 10.0, 100.0])
scales = st.one_of(st.none(), st.sampled_from([1.0, 0.3, 0.0625]))
seeds = st.integers(0, 2**31 - 1)
DEFAULT_CAPS = Capabilities()

CHUNK = 64  # the block size kernels tile T by (and the oracle's reference chunk)
GROUPS = (1, 2, 3, 4, 8)  # G = HV / H; 3 is the odd one out of power-of-two index math
MAX_HV = 16  # reached by the many_tiles family
GENERAL_MAX_HV = 4  # other families stop at 4 value heads (G = 3 and 4 included): every check and mutant runs them
MAX_H = 3
# Wide heads: past one 64-lane block and past the 128 a kernel may hard-code; short T keeps a
# case in the milliseconds (the state is K x V per head).
WIDE_HEAD = st.one_of(st.sampled_from([16, 31, 32, 33, 63, 64, 65, 96, 127, 128, 129, 130]), st.integers(16, 130))
WIDE_T = st.integers(1, 24)
# T on both sides of several block edges, and anywhere in between, up to 1024 tokens.
EDGE_T = st.one_of(
    st.sampled_from(sorted({CHUNK * k + d for k in (1, 2, 3, 5, 8, 16) for d in (-1, 0, 1)} - {1025})),
    st.integers(1, 1024),
)
TILES = 64  # "more than 64 (sequence, head) tiles": past a 6-bit tile index
# packed sequence lengths next to chunk multiples, and ordinary ones
PACKED_LEN = st.one_of(st.sampled_from([1, 63, 64, 65, 127, 128, 129]), st.integers(1, 200))


def partitions(total: int, max_parts: int = 5):
    """Lengths >= 1 summing to total, length-1 pieces likely."""

    @st.composite
    def draw(draw_):
        n = draw_(st.integers(1, min(max_parts, total)))
        cuts = draw_(st.lists(st.integers(1, total - 1), min_size=n - 1, max_size=n - 1, unique=True)) if n > 1 else []
        bounds = [0, *sorted(cuts), total]
        return tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))

    return draw()


def _groups(caps: Capabilities, H: int, min_G: int = 1, max_HV: int = MAX_HV):
    """G from GROUPS with HV = G * H <= max_HV (1 unless GVA is declared)."""
    if not caps.gva:
        return st.just(1)
    return st.sampled_from([G for G in GROUPS if G >= min_G and G * H <= max(max_HV, H)])


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
    max_HV: int = GENERAL_MAX_HV,
    small_heads: bool = False,
    **fixed,
):
    """A CaseSpec within caps. packed: True / False / None (either, if caps.varlen)."""
    T = draw(T.filter(lambda t: t >= min_T))
    if caps.max_T is not None:
        T = min(T, caps.max_T)
    if packed is None:
        packed = caps.varlen and T >= 2 and draw(st.booleans())
    # H small enough that some G >= min_G keeps HV <= max_HV
    H = draw(st.integers(1, max(1, min(MAX_H, max_HV // (min_G if caps.gva else 1)))))
    G = draw(_groups(caps, H, min_G, max_HV))
    spec = dict(
        B=1 if packed else draw(st.integers(min_B, 3)),
        T=T,
        H=H,
        G=G,
        K=draw(_head(caps, small_heads)),
        V=draw(_head(caps, small_heads)),
        gate=draw(gates if caps.reset_gates else finite_gates),
        beta_max=min(draw(beta_max), caps.max_beta),
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
    return case_specs(caps, T=st.integers(lo, hi), packed=False, small_heads=True, B=1, H=1, max_HV=2)


def _wide(caps: Capabilities):
    """Wide heads at short T: K and V of 16 to 130 (or the declared head sizes)."""
    head = WIDE_HEAD if caps.head_sizes is None else st.sampled_from(sorted(caps.head_sizes))
    return case_specs(caps, T=WIDE_T, packed=False, B=1, H=1, G=1).flatmap(
        lambda s: st.builds(s.with_, K=head, V=head, G=_groups(caps, 1))
    )


@st.composite
def many_tiles(draw, caps: Capabilities):
    """More than TILES (sequence, head) tiles in one call: H up to 3, G from GROUPS, HV up
    to 16, and enough batch rows or packed sequences; small heads and short T."""
    spec = draw(case_specs(caps, T=st.integers(1, 6), packed=False, small_heads=True))
    H = draw(st.integers(1, MAX_H))
    G = draw(_groups(caps, H, max_HV=MAX_HV))
    N = -(-(TILES + 1) // (H * G)) + draw(st.integers(0, 2))
    if caps.varlen and draw(st.booleans()):
        lens = tuple(draw(st.lists(st.integers(1, 4), min_size=N, max_size=N)))
        return spec.with_(B=1, T=sum(lens), H=H, G=G, seqlens=lens)
    return spec.with_(B=N, H=H, G=G, seqlens=None)


def _edges(caps: Capabilities):
    """T across 1 to 1024 with the block edges 64k - 1, 64k, 64k + 1; small heads."""
    return case_specs(caps, T=EDGE_T, packed=False, small_heads=True, B=1, H=1, max_HV=2)


@st.composite
def packed_long(draw, caps: Capabilities):
    """A packed batch whose sequences are longer than one chunk, lengths next to chunk
    multiples; small heads."""
    lens = draw(st.lists(PACKED_LEN, min_size=2, max_size=4).filter(lambda ls: max(ls) > CHUNK))
    if caps.max_T is not None and sum(lens) > caps.max_T:
        lens = [min(n, max(1, caps.max_T // len(lens))) for n in lens]
    return draw(
        case_specs(caps, T=st.just(sum(lens)), packed=True, small_heads=True, H=1, max_HV=2, seqlens=tuple(lens))
    )


def _reused(caps: Capabilities):
    """reused_buffers' draws: the general cases and, where packed batches are declared, packed
    sequences longer than one chunk, whose refill with the lengths reversed changes each
    sequence's chunk count (a (sequence, chunk) table cached by cu_seqlens' identity goes stale)."""
    return st.one_of(case_specs(caps), packed_long(caps)) if caps.varlen else case_specs(caps)


@st.composite
def decode_chain(draw, caps: Capabilities):
    """A few hundred tokens for a chained decode (one call per token): small heads, a slow
    gate (near 0 or mild) so the state is long-lived, small beta, an initial state. K and V
    at least 4: the check compares the final state's relative RMS with that of references,
    and a state of one or two numbers makes each reference's error a single sample (K = 2,
    V = 1, T = 200, bf16, seed 12295: the one-token-chunk reference 6.4e-4 at T = 200 and
    5.6e-3 at T = 60 on the same tokens; our chunk_kda 4.2e-3 and 4.9e-3), so a correct
    kernel failed on the luck of the reference."""
    T = draw(st.integers(200, 256))
    if caps.max_T is not None:
        T = min(T, caps.max_T)
    spec = draw(case_specs(caps, T=st.just(T), packed=False, small_heads=True, B=1, H=1, G=1, h0=True))
    K, V = max(spec.K, 4), max(spec.V, 4)
    if caps.head_sizes:
        K, V = _declared_size(K, caps.head_sizes), _declared_size(V, caps.head_sizes)
    return spec.with_(K=K, V=V, gate=draw(st.sampled_from(["near_zero", "mild"])), beta_max=0.1)


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
    "wide_heads": _wide,
    "many_tiles": many_tiles,
    "block_edges": _edges,
    "packed_long": packed_long,
    "decode_chain": decode_chain,
    "reused": _reused,
}


# ---------------------------------------------------------------- the bug classes that ship
# (issue 10): odd head sizes and ragged tails for the guard bands, empty sequences, and
# the sizes a GPU kernel sees (grids wider than the card, heads up to 256, compile buckets).


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


CHUNK_BOUNDARY_T = tuple(sorted({n for c in (16, 32, 64) for n in (c - 1, c, c + 1, 2 * c + 1)}))


# The most elements one input of a GPU case may have (B rows are capped to it): 128 MiB as
# the float64 arrays a case is made from on the host, so drawing a case stays under a second.
GPU_ELEMENTS = 2**24
# The most elements of a GPU case's state pool [N, HV, K, V] (B rows or packed sequences are
# capped to it): 512 MiB in float64, the dtype of the oracle's state, which holds a few
# copies of it. Without this cap a packed batch of 2000 sequences at HV = 64, K = V = 100
# drew a 10 GiB state, and 12 workers ran an 80 GiB H100 out of memory (2026-11-27: 41
# checks failed with CUDA out-of-memory errors, none with a wrong answer).
GPU_STATE_ELEMENTS = 2**26
# The same cap for the gradient checks (relations._grad_check), 16x lower: their float64
# adjoint oracle and three float32 autograd references run on the host, whose cost grows
# with the state pool times T. At 2^26, on an H100 with 12 workers, 5% of the gradient checks'
# time (184 of 3654 s) was inside the implementation's forward calls, and one bf16
# grad_oracle drawn at GPU sizes took ~120 s of host time on one CPU core (4.9 s at 2^22).
# 2^22 still holds a whole row at the largest heads (HV = 64, K = V = 256) and, in the other
# buckets, more rows or sequences times value heads than an H100 has SMs.
GPU_GRAD_STATE_ELEMENTS = 2**22


@dataclass(frozen=True)
class Sizes:
    """The sizes a run draws on one kind of device.

    heads: K and V without a declaration; max_heads: H and HV at most; max_B: batch rows;
    many_seqs: the most sequences in a packed batch of short (1 to 3 token) sequences;
    buckets: on a GPU, the few (K, V, H, HV) a run draws from (None: independent draws).
    state_elements: on a GPU, the most elements of a case's state pool [N, HV, K, V] (B rows
    or packed sequences are capped to it).
    Every new (K, V, H, HV) makes a Triton kernel compile, and often autotune, again, so a
    GPU run draws them from a handful of buckets (compile_buckets) and lets B, T and the
    packing vary freely inside each."""

    heads: tuple[int, ...]
    max_heads: int
    max_B: int
    many_seqs: int
    buckets: tuple[tuple[int, int, int, int], ...] | None = None
    state_elements: int = GPU_STATE_ELEMENTS


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


def declared_buckets(caps: Capabilities, sizes: Sizes) -> list[tuple[int, int, int, int]]:
    """The run's compile buckets whose K and V the implementation declares (all of them
    without a declaration of head sizes)."""
    return [b for b in sizes.buckets if not caps.head_sizes or {b[0], b[1]} <= set(caps.head_sizes)]


@st.composite
def gpu_case_specs(draw, caps: Capabilities, sizes: Sizes, family: str = "general"):
    """A case of `family` at GPU sizes: (K, V, H, HV) from the run's compile buckets, then
    either B up to sizes.max_B rows, or (where varlen is declared) a packed batch of up to
    sizes.many_seqs sequences of 1 to 3 tokens, or a length at a chunk boundary. Rows and
    sequences are capped so that the state pool stays within sizes.state_elements."""
    spec = draw(CASE_FAMILIES[family](caps))
    buckets = declared_buckets(caps, sizes)
    if family == "guard_bands":  # the guard bands want heads that are not powers of two
        buckets = [b for b in buckets if not (is_power_of_two(b[0]) and is_power_of_two(b[1]))] or buckets
    if spec.G > 1 and caps.gva:  # a family that needs GVA (the first bucket always has HV = 2 H)
        buckets = [b for b in buckets if b[3] > b[2]] or [b for b in sizes.buckets if b[3] > b[2]]
    K, V, H, HV = draw(st.sampled_from(buckets or list(sizes.buckets)))
    spec = spec.with_(K=K, V=V, H=H, G=HV // H if caps.gva else 1)
    shape = draw(st.sampled_from(("as drawn", "rows", "many sequences", "chunk boundary")))
    if shape == "rows" and spec.seqlens is None and family != "long":
        row = spec.T * spec.HV * max(K, V)
        most = min(sizes.max_B, GPU_ELEMENTS // row, sizes.state_elements // (spec.HV * K * V))
        spec = spec.with_(B=draw(st.integers(1, max(1, most))))
    elif shape == "many sequences" and spec.seqlens is not None and family in ("general", "varlen"):
        most = max(2, min(sizes.many_seqs, sizes.state_elements // (spec.HV * K * V)))
        n = draw(st.one_of(st.just(most), st.integers(2, most)))
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


def strategy_for(family: str, caps: Capabilities, device="cpu", state_elements: int | None = None):
    """The cases of `family` for an implementation on device: CASE_FAMILIES as they are on
    the CPU, at GPU sizes (sizes_for) in compile buckets on a GPU, the state pool capped at
    state_elements (default GPU_STATE_ELEMENTS)."""
    sizes = sizes_for(device, caps.head_sizes)
    if sizes.buckets is None or family in FIXED_FAMILIES:
        return CASE_FAMILIES[family](caps)
    if state_elements is not None:
        sizes = replace(sizes, state_elements=state_elements)
    return gpu_case_specs(caps, sizes, family)


# ------------------------------------------------------------ explicit examples per family
# Each class a family exists for, reached on every run of every profile (Hypothesis runs
# explicit examples before it draws). Written for the default capabilities and dropped where
# an implementation's declaration excludes them (see fits).
def _wide_examples():
    return [
        CaseSpec(T=9, K=65, V=130, seed=1, h0=True),  # second K block, third V block
        CaseSpec(T=17, K=130, V=33, seed=2, G=2, scale=0.0625),
        CaseSpec(T=5, K=128, V=128, seed=3, gate="strong", h0=True, input_scale=10.0),
    ]


def _tile_examples():
    return [
        CaseSpec(B=6, T=3, H=3, G=4, K=3, V=2, seed=4, h0=True),  # 72 tiles, groups of 4
        CaseSpec(B=3, T=4, H=2, G=8, K=2, V=3, seed=5),  # 48 tiles of HV = 16
        CaseSpec(B=9, T=2, H=3, G=3, K=2, V=2, seed=6),  # 81 tiles, G = 3
        _packed((4, 1, 3, 2) * 3 + (2, 1, 3), H=2, G=4, K=2, V=2, seed=7),  # 15 sequences x 8 heads
    ]


def _packed(lens: tuple[int, ...], **kw) -> CaseSpec:
    return CaseSpec(B=1, T=sum(lens), seqlens=lens, **kw)


def _edge_examples():
    return [
        CaseSpec(T=T, K=3, V=2, seed=T, h0=True, gate=gate)
        for T, gate in ((127, "mild"), (128, "safe"), (129, "logsigmoid"), (193, "mild"), (320, "zero"), (1023, "mild"))
    ]


def _packed_long_examples():
    return [
        _packed((65, 128, 64), K=3, V=2, seed=8, h0=True, gate="mild"),
        _packed((129, 1, 63), K=2, V=3, seed=9, gate="safe"),
    ]


def _general_examples():
    return [
        CaseSpec(B=2, T=19, H=2, G=2, K=5, V=7, gate="reset", seed=10, h0=True),  # g = -inf resets
        CaseSpec(B=1, T=70, H=1, G=3, K=4, V=3, gate="masked", seed=11, scale=0.3),
    ]


def _reused_examples():
    # refilled with the lengths reversed (relations._second_case): 3 + 1 chunks of 64 become
    # 1 + 3, and 2 + 1 + 1 become 1 + 1 + 2 (at 16 or 32 tokens a chunk too), so a chunk table
    # cached by cu_seqlens' identity is stale on the second call (vLLM 0.33.0 and fla-core
    # 0.6.0 cache their prepare_chunk_indices so: reports/findings/README.md, candidates)
    return [
        _packed((130, 2), K=3, V=2, seed=13, h0=True),
        _packed((65, 1, 1), K=2, V=3, seed=14, gate="mild"),
    ]


def _decode_examples():
    return [CaseSpec(T=200, K=4, V=4, gate="near_zero", beta_max=0.1, seed=12, h0=True)]


EXAMPLES = {
    "general": _general_examples,
    "wide_heads": _wide_examples,
    "many_tiles": _tile_examples,
    "block_edges": _edge_examples,
    "packed_long": _packed_long_examples,
    "decode_chain": _decode_examples,
    "reused": lambda: _general_examples() + _reused_examples(),
}


def _declared_size(n: int, sizes) -> int:
    """The smallest declared head size >= n (the largest if none is): an example keeps its
    class (past a block, tiny) as far as the declaration allows."""
    bigger = [s for s in sorted(sizes) if s >= n]
    return bigger[0] if bigger else max(sizes)


def fitted(spec: CaseSpec, caps: Capabilities) -> CaseSpec | None:
    """An explicit example inside an implementation's declaration: head sizes moved to
    declared ones, beta and reset gates to the declared range, None where the declaration
    excludes it (GVA, varlen, max T)."""
    if caps.head_sizes is not None:
        spec = spec.with_(K=_declared_size(spec.K, caps.head_sizes), V=_declared_size(spec.V, caps.head_sizes))
    if spec.beta_max > caps.max_beta:
        spec = spec.with_(beta_max=caps.max_beta)
    if spec.gate == "reset" and not caps.reset_gates:
        spec = spec.with_(gate="masked")
    ok = (caps.gva or spec.G == 1) and (caps.varlen or spec.seqlens is None)
    return spec if ok and (caps.max_T is None or spec.T <= caps.max_T) else None


def in_bucket(spec: CaseSpec, caps: Capabilities, sizes: Sizes) -> CaseSpec:
    """An explicit example on a GPU: its (K, V, H, HV) moved to the nearest of the run's
    compile buckets (among those inside the declared head sizes, and with HV > H where the
    example has grouped value heads), T, B, the packing, gates and seed kept. Each
    (K, V, H, HV) outside the buckets is one more compile and autotuning key for every
    kernel: fitted to the declared sizes alone, the examples reached about ten of them for
    flash-linear-attention (K = V = 16 at seven (H, HV), three wide ones), each a few
    minutes of autotuning cold. The classes the examples stand for on the CPU (a second K
    block, more tiles than SMs) are the buckets' own on a GPU (K = V = 256; H = 16, HV = 64)."""
    buckets = declared_buckets(caps, sizes) or list(sizes.buckets)
    if spec.G > 1 and caps.gva:
        buckets = [b for b in buckets if b[3] > b[2]] or buckets
    K, V, H, HV = min(buckets, key=lambda b: (abs(b[0] - spec.K) + abs(b[1] - spec.V), abs(b[2] - spec.H)))
    return spec.with_(K=K, V=V, H=H, G=HV // H if caps.gva else 1)


def examples_for(family: str, caps: Capabilities, device="cpu") -> list[CaseSpec]:
    """The family's explicit examples inside the declaration (fitted); on a GPU each also
    inside the run's compile buckets (in_bucket)."""
    specs = [s for s in (fitted(s, caps) for s in EXAMPLES.get(family, list)()) if s is not None]
    sizes = sizes_for(device, caps.head_sizes)
    if sizes.buckets is not None and family not in FIXED_FAMILIES:
        specs = [in_bucket(s, caps, sizes) for s in specs]
    return list(dict.fromkeys(specs))


def cases_for(family: str, caps: Capabilities, device="cpu", state_elements: int | None = None):
    """A decorator: @given(spec=...) over the family's cases on device (strategy_for), with its
    explicit examples."""

    def apply(fn):
        fn = given(spec=strategy_for(family, caps, device, state_elements))(fn)
        for spec in reversed(examples_for(family, caps, device)):
            fn = example(spec=spec)(fn)
        return fn

    return apply


# Families of the gradient checks (gradients.py): an initial state always given, and T not
# a multiple of the chunk size 64 (short tails and tails after a full chunk).
RAGGED_T = st.sampled_from([1, 5, 17, 33, 63, 65, 77, 100])
CASE_FAMILIES.update(
    with_initial_state=lambda caps: case_specs(caps, h0=True),
    ragged=lambda caps: case_specs(caps, T=RAGGED_T, packed=False),
)
