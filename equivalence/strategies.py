"""The Hypothesis strategies of the suite, in one place (DESIGN.md section 5).

Every test draws CaseSpecs from here: shapes (T = 1, ragged T, T not a multiple of any
chunk size, odd K and V, K != V, HV > H), gate regimes (zero, near 0, logsigmoid, mild,
safe, strong to -20, masked -1000), beta in [0, 1] or [0, 2], input scales from 1e-2 to
1e2, explicit or default scale, with and without an initial state, packed batches with
length-1 sequences, and long histories with small heads. Strategies respect an
implementation's declared capabilities, so an undeclared case is never drawn.
"""

from __future__ import annotations

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


# Families of the gradient checks (gradients.py): an initial state always given, and T not
# a multiple of the chunk size 64 (short tails and tails after a full chunk).
RAGGED_T = st.sampled_from([1, 5, 17, 33, 63, 65, 77, 100])
CASE_FAMILIES.update(
    with_initial_state=lambda caps: case_specs(caps, h0=True),
    ragged=lambda caps: case_specs(caps, T=RAGGED_T, packed=False),
)
