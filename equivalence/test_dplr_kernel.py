"""kernels.fused_recurrent_dplr_delta_rule, our DPLR kernel, against the float64 DPLR
recurrence (reference.dplr_recurrent_np) under the tolerance rule of DESIGN.md section 5:
its budget scales with the float32 DPLR recurrence (reference.dplr_recurrent, output rounded
to the input dtype), the same-precision reference of a kernel with full fp32 products. On a
CPU under Triton's interpreter, compiled on a GPU."""

from __future__ import annotations

import kdaverify.kernels  # noqa: F401, I001  (before triton: it sets TRITON_INTERPRET on a CPU)
import numpy as np
import pytest
import torch
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.implementation import DTYPES
from kdaverify.equivalence.tolerance import errors, judge
from kdaverify.kernels import fused_recurrent_dplr_delta_rule
from kdaverify.reference import dplr_recurrent, dplr_recurrent_np, kda_as_dplr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "a", "b", "gk")

CASES = [
    # GVA, K and V not powers of two, an initial state
    (CaseSpec(B=2, T=37, H=2, G=2, K=20, V=48, h0=True, seed=61), "float32"),
    # a packed batch with an empty and a length-1 sequence, K = 100 (BK = 128 lanes, 28 masked)
    (CaseSpec(T=50, H=1, G=2, K=100, V=70, h0=True, seqlens=(1, 0, 29, 20), seed=62), "bfloat16"),
    # one token, no initial state
    (CaseSpec(T=1, K=16, V=16, seed=63), "float32"),
    # masked gates (g = -1000: exp underflows to 0 and the state restarts from b a^T S and k v^T)
    (CaseSpec(T=24, K=8, V=12, G=3, gate="masked", h0=True, seed=64), "float32"),
]


def _call(d: dict, dtype: torch.dtype, **kw):
    """Our kernel on the float64 arrays d rounded to dtype (the state stays float32)."""
    t = {n: torch.from_numpy(d[n]).to(DEVICE, dtype) for n in NAMES}
    h0 = d.get("initial_state")
    cu = d.get("cu_seqlens")
    return fused_recurrent_dplr_delta_rule(
        *(t[n] for n in NAMES),
        initial_state=None if h0 is None else torch.from_numpy(h0).to(DEVICE, torch.float32),
        cu_seqlens=None if cu is None else torch.from_numpy(cu).to(DEVICE),
        **kw,
    )


def _expect_oracle(d: dict, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    rounded = {n: torch.from_numpy(d[n]).to(dtype).double().numpy() for n in NAMES}  # the inputs the kernel sees
    h0, cu = d.get("initial_state"), d.get("cu_seqlens")
    h0_32 = None if h0 is None else torch.from_numpy(h0).float()
    kw = dict(output_final_state=True, cu_seqlens=None if cu is None else torch.from_numpy(cu))
    h0_64 = None if h0_32 is None else h0_32.double().numpy()
    gold = dplr_recurrent_np(*(rounded[n] for n in NAMES), initial_state=h0_64, **kw)
    ref = dplr_recurrent(*(torch.from_numpy(rounded[n]).float() for n in NAMES), initial_state=h0_32, **kw)
    o, ht = _call(d, dtype, output_final_state=True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    for what, x, want, r in (("o", o, gold[0], ref[0].to(dtype)), ("final_state", ht, gold[1], ref[1])):
        verdict = judge(what, x.cpu(), want, [errors(r, want)], dtype)
        assert verdict.passed, str(verdict)


@pytest.mark.parametrize(("spec", "dtype"), CASES, ids=lambda c: getattr(c, "seed", c))
def test_matches_the_dplr_oracle(spec, dtype):
    """o and the final state within the tolerance rule's budget of the float64 recurrence,
    a and b drawn apart from k (CaseSpec.dplr_arrays)."""
    _expect_oracle(spec.dplr_arrays(), dtype)


def test_kda_written_as_dplr():
    """KDA's arguments mapped to DPLR (reference.kda_as_dplr: a tied to k, b = -beta k, beta
    folded into v) give the DPLR oracle's answer too: the case the Kimi Linear paper writes
    KDA as, with strong gates."""
    spec = CaseSpec(T=40, H=2, G=2, K=24, V=20, gate="strong", h0=True, seed=65)
    a = spec.arrays()
    d = dict(kda_as_dplr(a["q"], a["k"], a["v"], a["g"], a["beta"]), initial_state=a["initial_state"])
    _expect_oracle(d, "float32")


def test_final_state_optional():
    """Without output_final_state the state is None and o is the same, bit for bit."""
    d = CaseSpec(T=9, K=8, V=8, h0=True, seed=66).dplr_arrays()
    o1, _ = _call(d, torch.float32, output_final_state=True)
    o2, none = _call(d, torch.float32)
    assert none is None and torch.equal(o1, o2)


def _bad_inputs():
    d = CaseSpec(T=5, K=8, V=8, seed=67).dplr_arrays()
    t = {n: torch.from_numpy(d[n]).float().to(DEVICE) for n in NAMES}
    cu = torch.tensor([0, 2, 5], device=DEVICE)
    yield "a", dict(t, a=t["a"][..., :4]), {}
    yield "b", dict(t, b=t["b"].to(torch.int32)), {}
    yield "gk", dict(t, gk=t["gk"][:, :, :, None]), {}
    yield "v", dict(t, v=t["v"].double()), {}
    yield "q", {n: torch.zeros(1, 5, 1, 300, device=DEVICE) if n in ("q", "k", "a", "b", "gk") else x
                for n, x in t.items()}, {}  # fmt: skip
    yield "cu_seqlens", t, dict(cu_seqlens=torch.tensor([0, 3, 2], device=DEVICE))
    yield "initial_state", t, dict(cu_seqlens=cu, initial_state=torch.zeros(1, 1, 8, 8, device=DEVICE))
    yield "initial_state", t, dict(initial_state=torch.zeros(1, 1, 8, 8, dtype=torch.float64, device=DEVICE))
    yield "scale", t, dict(scale=float("nan"))


@pytest.mark.parametrize(("name", "t", "kw"), list(_bad_inputs()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_names_the_argument(name, t, kw):
    """Bad input raises a ValueError whose message starts with the argument's name."""
    with pytest.raises(ValueError, match=f"^{name}:"):
        fused_recurrent_dplr_delta_rule(*(t[n] for n in NAMES), **kw)


def test_gva_heads_share_q_and_k():
    """Value heads of a group read their query head's q and k: the same call with q and k
    repeated per value head (H = HV) gives the same o and state, bit for bit."""
    d = CaseSpec(T=12, H=2, G=3, K=8, V=8, h0=True, seed=68).dplr_arrays()
    o, ht = _call(d, torch.float32, output_final_state=True)
    rep = dict(d, q=np.repeat(d["q"], 3, axis=2), k=np.repeat(d["k"], 3, axis=2))
    o2, ht2 = _call(rep, torch.float32, output_final_state=True)
    assert torch.equal(o, o2) and torch.equal(ht, ht2)
