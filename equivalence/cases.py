"""A test case as a small, printable recipe: shapes, regimes and a seed.

Hypothesis draws a CaseSpec (strategies.py); the arrays are made from its seed by NumPy, so
a failing example prints as one line that rebuilds the same inputs anywhere:

    >>> spec = CaseSpec(B=1, T=5, H=1, G=2, K=3, V=4, gate="strong", seed=7)
    >>> inputs = spec.arrays()          # float64 NumPy arrays, the values before rounding

(Drawing every element through Hypothesis would hit its buffer limit at a few thousand
tokens and degrade to constant fill, so values come from the seed and structure from
Hypothesis.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Gate regimes of DESIGN.md section 5, as functions of a standard normal draw z and a
# uniform draw u, both [B, T, HV, K]. Values are log-space decays g <= 0.
GATE_REGIMES = {
    "zero": lambda z, u: np.zeros_like(z),  # no decay: plain (delta-rule) DeltaNet
    "near_zero": lambda z, u: -1e-3 * u,
    "logsigmoid": lambda z, u: -np.logaddexp(0.0, -z),
    "mild": lambda z, u: -np.logaddexp(0.0, -z) / 16,  # the gate of DESIGN.md section 7
    "safe": lambda z, u: -5.0 * u,  # the safe gate's range [-5, 0)
    "strong": lambda z, u: -20.0 * u,
    # padding tokens masked with g = -1000 between ordinary logsigmoid tokens
    "masked": lambda z, u: np.where(u < 0.25, -1000.0, -np.logaddexp(0.0, -z)),
    # g = -inf: a hard reset (exp(-inf) = 0 wipes the state), what masking code produces;
    # part of the contract (see the README's domain section)
    "reset": lambda z, u: np.where(u < 0.1, -np.inf, -np.logaddexp(0.0, -z)),
}


@dataclass(frozen=True)
class CaseSpec:
    """Everything that determines one KDA call.

    B, T, H, K, V as in DESIGN.md section 3; HV = G * H. seqlens: lengths of a packed batch
    (then B == 1 and sum(seqlens) == T) or None. gate: a key of GATE_REGIMES; shared_gate
    makes g equal across the K channels (Gated DeltaNet). beta_max: beta ~ U(0, beta_max).
    input_scale multiplies q and v (k is L2-normalised, as real models do, so the
    transition stays a contraction for beta <= 2). scale: the scale argument (None: the
    default K ** -0.5). h0: pass a random initial state. zero_beta: beta = 0 everywhere.
    """

    B: int = 1
    T: int = 8
    H: int = 1
    G: int = 1
    K: int = 4
    V: int = 4
    gate: str = "logsigmoid"
    shared_gate: bool = False
    beta_max: float = 1.0
    input_scale: float = 1.0
    scale: float | None = None
    h0: bool = False
    seqlens: tuple[int, ...] | None = None
    seed: int = 0
    zero_beta: bool = False

    def __post_init__(self):
        if self.seqlens is not None and (self.B != 1 or sum(self.seqlens) != self.T):
            raise ValueError(f"seqlens: expected B == 1 and sum == T = {self.T}, got B={self.B}, {self.seqlens}")
        if self.gate not in GATE_REGIMES:
            raise ValueError(f"gate: expected one of {sorted(GATE_REGIMES)}, got {self.gate!r}")

    @property
    def HV(self) -> int:
        return self.G * self.H

    @property
    def N(self) -> int:
        return len(self.seqlens) if self.seqlens is not None else self.B

    def with_(self, **changes) -> CaseSpec:
        return replace(self, **changes)

    def arrays(self) -> dict:
        """The float64 inputs: q, k, v, g, beta, initial_state (or None), cu_seqlens (or None)."""
        rng = np.random.default_rng(self.seed)
        B, T, H, HV, K, V = self.B, self.T, self.H, self.HV, self.K, self.V
        q = self.input_scale * rng.standard_normal((B, T, H, K))
        k = rng.standard_normal((B, T, H, K))
        k /= np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
        v = self.input_scale * rng.standard_normal((B, T, HV, V))
        gshape = (B, T, HV, 1) if self.shared_gate else (B, T, HV, K)
        g = GATE_REGIMES[self.gate](rng.standard_normal(gshape), rng.uniform(size=gshape))
        g = np.broadcast_to(g, (B, T, HV, K)).copy()
        beta = rng.uniform(0.0, self.beta_max, size=(B, T, HV))
        if self.zero_beta:
            beta[:] = 0.0
        h0 = rng.standard_normal((self.N, HV, K, V)) * self.input_scale if self.h0 else None
        cu = None if self.seqlens is None else np.concatenate([[0], np.cumsum(self.seqlens)]).astype(np.int64)
        return dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, cu_seqlens=cu)

    def dplr_arrays(self) -> dict:
        """The float64 inputs of a general DPLR call (reference.dplr): q, k, v, gk = g and
        initial_state, cu_seqlens from arrays(), with a and b drawn apart from k (not KDA's
        tied pair): a = 0.5 unit(x) exp(g), b = -0.5 u unit(y), u ~ U(0, 1) per token. So
        |b| |a| <= 1/4 and the transition Diag(exp(gk)) + b a^T stays within 1.25 in norm:
        histories neither explode nor hide a comparison in huge values."""
        arrays = self.arrays()
        rng = np.random.default_rng(self.seed + 5)
        g = arrays.pop("g")
        arrays.pop("beta")
        shape = g.shape

        def unit(x):
            return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)

        a = 0.5 * unit(rng.standard_normal(shape)) * np.exp(g)
        b = -0.5 * rng.uniform(size=shape[:3] + (1,)) * unit(rng.standard_normal(shape))
        return dict(arrays, a=a, b=b, gk=g)
