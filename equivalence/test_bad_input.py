"""Bad calls fail loudly, the same way at every entry point of the oracle: a ValueError whose
message starts with the name of the offending argument (reference/conventions.py, gates.py,
chunkwise.py). Also: the NumPy oracle leaves its inputs alone and accepts torch tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from kdaverify.equivalence.implementation import Capabilities
from kdaverify.equivalence.strategies import case_specs
from kdaverify.reference import (
    dplr_recurrent,
    dplr_recurrent_np,
    kda_as_dplr,
    kda_chunkwise,
    kda_gate,
    kda_recurrent,
    kda_recurrent_np,
    round_operand,
)

# Sizes all distinct (K != V, HV = 2 H) so that a swapped or misread dimension is caught.
B, T, H, HV, K, V = 2, 5, 2, 4, 3, 2

KDA_ENTRIES = {"kda_recurrent_np": kda_recurrent_np, "kda_recurrent": kda_recurrent, "kda_chunkwise": kda_chunkwise}
DPLR_ENTRIES = {"dplr_recurrent_np": dplr_recurrent_np, "dplr_recurrent": dplr_recurrent}
ENTRIES = {**KDA_ENTRIES, **DPLR_ENTRIES}
TORCH_ENTRIES = {"kda_recurrent", "kda_chunkwise", "dplr_recurrent"}


def valid_call(entry: str, batch: int = B) -> dict:
    """Keyword arguments of a correct call of entry, as NumPy arrays (converted to tensors
    at call time for the torch entry points)."""
    rng = np.random.default_rng(0)
    k = rng.standard_normal((batch, T, H, K))
    kw = dict(
        q=rng.standard_normal((batch, T, H, K)),
        k=k / np.linalg.norm(k, axis=-1, keepdims=True),
        v=rng.standard_normal((batch, T, HV, V)),
        g=-rng.uniform(size=(batch, T, HV, K)),
        beta=rng.uniform(size=(batch, T, HV)),
    )
    if entry in DPLR_ENTRIES:
        kw = kda_as_dplr(**kw)
    return dict(kw, initial_state=rng.standard_normal((batch, HV, K, V)), output_final_state=True)


def packed_call(entry: str) -> dict:
    """A correct packed call: B = 1, two sequences (lengths 2 and 3), one state each."""
    kw = valid_call(entry, batch=1)
    return dict(kw, cu_seqlens=np.array([0, 2, T], dtype=np.int64), initial_state=np.zeros((2, HV, K, V)))


def call(entry: str, kw: dict, raw: tuple[str, ...] = ()):
    """Call entry with kw, NumPy arrays turned into torch tensors for the torch entries
    (anything else, a list or None, and the arguments named in raw are passed as they are)."""
    if entry in TORCH_ENTRIES:
        kw = {n: torch.as_tensor(x) if isinstance(x, np.ndarray) and n not in raw else x for n, x in kw.items()}
    return ENTRIES[entry](**kw)


def entries(names):
    return pytest.mark.parametrize("entry", sorted(names))


# ------------------------------------------------------------- the base calls are valid


@entries(ENTRIES)
def test_valid_calls_pass(entry):
    """The unbroken calls run (so each error below is the mutation's doing)."""
    for kw in (valid_call(entry), packed_call(entry)):
        o, S = call(entry, kw)
        assert tuple(o.shape) == kw["v"].shape and tuple(S.shape) == kw["initial_state"].shape


# ------------------------------------------------------------- q, k, v (every entry)

QKV_CASES = {
    "q rank 3": (lambda kw: dict(kw, q=kw["q"][0]), r"^q: expected rank 4"),
    "q rank 5": (lambda kw: dict(kw, q=kw["q"][..., None]), r"^q: expected rank 4"),
    "q empty head": (lambda kw: dict(kw, q=kw["q"][:, :, :0], k=kw["k"][:, :, :0]), r"^q: expected every dimension"),
    "q not an array": (lambda kw: dict(kw, q=kw["q"].tolist()), r"^q: expected an array"),
    "q None": (lambda kw: dict(kw, q=None), r"^q: expected an array"),
    "k wider than q": (lambda kw: dict(kw, k=np.concatenate([kw["k"], kw["k"][..., :1]], -1)), r"^k: expected shape"),
    "k with HV heads": (lambda kw: dict(kw, k=np.repeat(kw["k"], HV // H, axis=2)), r"^k: expected shape"),
    "k shorter T": (lambda kw: dict(kw, k=kw["k"][:, :-1]), r"^k: expected shape"),
    "v wrong B": (lambda kw: dict(kw, v=kw["v"][:1]), r"^v: expected shape"),
    "v wrong T": (lambda kw: dict(kw, v=kw["v"][:, :-1]), r"^v: expected shape"),
    "v rank 3": (lambda kw: dict(kw, v=kw["v"][..., 0]), r"^v: expected shape"),
    "HV not a multiple of H": (lambda kw: dict(kw, v=kw["v"][:, :, :3]), r"^v: expected HV .* multiple of H"),
    "HV < H": (lambda kw: dict(kw, v=kw["v"][:, :, :1]), r"^v: expected HV .* multiple of H"),
}


@entries(ENTRIES)
@pytest.mark.parametrize("case", sorted(QKV_CASES))
def test_bad_qkv(entry, case):
    breaks, match = QKV_CASES[case]
    with pytest.raises(ValueError, match=match):
        call(entry, breaks(valid_call(entry)))


# ------------------------------------------------------------- transitions

GATE_CASES = {
    "g missing a channel": ("g", lambda g, beta: g[..., :-1]),
    "g with H heads": ("g", lambda g, beta: g[:, :, :H]),
    "g without batch": ("g", lambda g, beta: g[0]),
    "g wrong T": ("g", lambda g, beta: g[:, 1:]),
    "beta rank 4": ("beta", lambda g, beta: beta[..., None]),
    "beta with H heads": ("beta", lambda g, beta: beta[:, :, :H]),
    "beta per channel like g": ("beta", lambda g, beta: g),
    "beta wrong T": ("beta", lambda g, beta: beta[:, :-1]),
}


@entries(KDA_ENTRIES)
@pytest.mark.parametrize("case", sorted(GATE_CASES))
def test_bad_g_or_beta(entry, case):
    name, breaks = GATE_CASES[case]
    kw = valid_call(entry)
    kw[name] = breaks(kw["g"], kw["beta"])
    with pytest.raises(ValueError, match=rf"^{name}: expected shape \[B, T, HV"):
        call(entry, kw)


@entries(KDA_ENTRIES)
@pytest.mark.parametrize("name", ["g", "beta"])
def test_missing_g_or_beta(entry, name):
    kw = valid_call(entry)
    kw[name] = None
    with pytest.raises(ValueError, match=rf"^{name}: expected an array"):
        call(entry, kw)


@entries(DPLR_ENTRIES)
@pytest.mark.parametrize("name", ["a", "b", "gk"])
@pytest.mark.parametrize(
    "breaks",
    [
        pytest.param(lambda x: x[..., :-1], id="short K"),
        pytest.param(lambda x: x[:, :, :H], id="H heads"),
        pytest.param(lambda x: x[..., 0], id="rank 3"),
        pytest.param(lambda x: x[:, :-1], id="wrong T"),
    ],
)
def test_bad_dplr_transition(entry, name, breaks):
    kw = valid_call(entry)
    kw[name] = breaks(kw[name])
    with pytest.raises(ValueError, match=rf"^{name}: expected shape \[B, T, HV, K\]"):
        call(entry, kw)


# ------------------------------------------------------------- cu_seqlens (every entry)

CU_CASES = {
    "decreasing": ([0, 4, 2, T], r"^cu_seqlens: expected non-decreasing"),
    "not starting at 0": ([1, 3, T], r"^cu_seqlens: expected cu_seqlens\[0\] == 0"),
    "negative start": ([-1, 3, T], r"^cu_seqlens: expected cu_seqlens\[0\] == 0"),
    "ending before T": ([0, 2, T - 1], r"^cu_seqlens: expected the last offset to equal T"),
    "ending after T": ([0, 2, T + 1], r"^cu_seqlens: expected the last offset to equal T"),
    "float dtype": (np.array([0.0, 2.0, T]), r"^cu_seqlens: expected an integer dtype"),
    "bool dtype": (np.array([False, True]), r"^cu_seqlens: expected an integer dtype"),
    "2-D": ([[0, 2, T]], r"^cu_seqlens: expected a 1-D array"),
    "single offset": ([0], r"^cu_seqlens: expected a 1-D array"),
    "scalar": (np.int64(T), r"^cu_seqlens: expected a 1-D array"),
}


@entries(ENTRIES)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("case", sorted(CU_CASES))
def test_bad_cu_seqlens(entry, case, as_tensor):
    cu, match = CU_CASES[case]
    cu = np.asarray(cu) if np.asarray(cu).dtype.kind in "fb" else np.asarray(cu, dtype=np.int64)
    kw = dict(packed_call(entry), cu_seqlens=torch.as_tensor(cu) if as_tensor else cu)
    with pytest.raises(ValueError, match=match):
        call(entry, kw, raw=("cu_seqlens",))


@entries(ENTRIES)
def test_cu_seqlens_needs_batch_of_one(entry):
    kw = dict(valid_call(entry), cu_seqlens=np.array([0, 2, T], dtype=np.int64))  # B = 2
    with pytest.raises(ValueError, match=r"^cu_seqlens: a packed batch requires B == 1"):
        call(entry, kw)


# ------------------------------------------------------------- initial_state, scale (every entry)

STATE_CASES = {
    "one state too many": lambda kw: kw["initial_state"][[0, 0, 0]],
    "H heads": lambda kw: kw["initial_state"][:, :H],
    "[N, HV, V, K] layout": lambda kw: kw["initial_state"].swapaxes(-1, -2),
    "no batch dimension": lambda kw: kw["initial_state"][0],
    "not an array": lambda kw: kw["initial_state"].tolist(),
}


@entries(ENTRIES)
@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_bad_initial_state(entry, case):
    kw = valid_call(entry)
    with pytest.raises(ValueError, match=r"^initial_state: expected"):
        call(entry, dict(kw, initial_state=STATE_CASES[case](kw)))


@entries(ENTRIES)
def test_packed_initial_state_is_per_sequence(entry):
    """With cu_seqlens N is the number of sequences (2 here), not B (1)."""
    kw = dict(packed_call(entry), initial_state=np.zeros((1, HV, K, V)))
    with pytest.raises(ValueError, match=r"^initial_state: expected shape \[N, HV, K, V\] = \(2,"):
        call(entry, kw)


@entries(ENTRIES)
@pytest.mark.parametrize(
    "scale",
    [float("nan"), float("inf"), -float("inf"), np.float32("nan"), "abc"],
    ids=["nan", "inf", "-inf", "f32nan", "str"],
)
def test_non_finite_scale(entry, scale):
    with pytest.raises(ValueError, match=r"^scale: expected a finite number"):
        call(entry, dict(valid_call(entry), scale=scale))


# ------------------------------------------------------------- chunkwise options


@pytest.mark.parametrize("chunk_size", [0, -4, 3, 48, 2.5, 100, None, True, "16"])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=r"^chunk_size: expected a power of two"):
        call("kda_chunkwise", dict(valid_call("kda_chunkwise"), chunk_size=chunk_size))


@pytest.mark.parametrize("precision", ["fp16", "TF32", "fp32", "", 32])
def test_bad_matmul_precision(precision):
    with pytest.raises(ValueError, match=r"^matmul_precision: expected one of"):
        call("kda_chunkwise", dict(valid_call("kda_chunkwise"), matmul_precision=precision))
    with pytest.raises(ValueError, match=r"^matmul_precision: expected one of"):
        round_operand(torch.ones(3), precision)


# ------------------------------------------------------------- kda_gate


def gate_args():
    z = torch.randn(B, T, HV, K, generator=torch.Generator().manual_seed(0))
    return z, torch.zeros(HV), torch.zeros(HV * K)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        pytest.param("z", lambda z, A, dt: (z[0], A, dt), id="z rank 3"),
        pytest.param("z", lambda z, A, dt: (z.numpy(), A, dt), id="z not a tensor"),
        pytest.param("A_log", lambda z, A, dt: (z, A[:H], dt), id="A_log per key head"),
        pytest.param("A_log", lambda z, A, dt: (z, A[:, None], dt), id="A_log [HV, 1]"),
        pytest.param("A_log", lambda z, A, dt: (z, torch.zeros(HV * K), dt), id="A_log per channel"),
        pytest.param("dt_bias", lambda z, A, dt: (z, A, dt.view(HV, K)), id="dt_bias [HV, K]"),
        pytest.param("dt_bias", lambda z, A, dt: (z, A, dt[:K]), id="dt_bias [K]"),
        pytest.param("dt_bias", lambda z, A, dt: (z, A, torch.zeros(H * K)), id="dt_bias [H * K]"),
    ],
)
def test_bad_gate_shapes(name, change):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        kda_gate(*change(*gate_args()))


@pytest.mark.parametrize("lower_bound", [0.0, -0.0, 0.5, -5.001, -10.0, float("nan"), -float("inf"), "x"])
def test_bad_lower_bound(lower_bound):
    with pytest.raises(ValueError, match=r"^lower_bound: expected a float in \[-5, 0\)"):
        kda_gate(*gate_args(), lower_bound=lower_bound)


def test_lower_bound_edges_accepted():
    """-5 is inside [-5, 0), and so is the smallest negative float."""
    for lb in (-5.0, -np.finfo(np.float64).tiny):
        assert bool((kda_gate(*gate_args(), lower_bound=lb) <= 0).all())


# ------------------------------------------------------------- inputs are not mutated

CAPS = Capabilities()


def snapshot(kw: dict) -> dict:
    return {n: (x.copy() if isinstance(x, np.ndarray) else x.clone()) for n, x in kw.items() if hasattr(x, "shape")}


def assert_unchanged(before: dict, after: dict) -> None:
    for n, x in before.items():
        y = after[n]
        same = np.array_equal(x, y) if isinstance(x, np.ndarray) else torch.equal(x, y)
        assert same and x.dtype == y.dtype, f"{n} was modified by the call"


@given(spec=case_specs(CAPS, h0=True))
def test_numpy_oracle_does_not_mutate_inputs(spec):
    """kda_recurrent_np and dplr_recurrent_np write none of their inputs, initial_state and
    cu_seqlens included (the state is updated in place internally, on a copy)."""
    a = spec.arrays()
    kw = dict(a, scale=spec.scale, output_final_state=True)
    before = snapshot(kw)
    _, S = kda_recurrent_np(**kw)
    assert_unchanged(before, kw)
    assert not np.shares_memory(S, a["initial_state"])
    dplr = dict(
        kda_as_dplr(*(a[n] for n in ("q", "k", "v", "g", "beta"))),
        initial_state=a["initial_state"],
        cu_seqlens=a["cu_seqlens"],
    )
    before = snapshot(dplr)
    dplr_recurrent_np(**dplr, scale=spec.scale, output_final_state=True)
    assert_unchanged(before, dplr)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(spec=case_specs(CAPS, h0=True))
def test_numpy_oracle_accepts_torch_tensors(dtype, spec):
    """kda_recurrent_np takes torch CPU tensors (even ones that require grad), does not
    write them, and gives bitwise what it gives on the same values as NumPy arrays."""
    a = spec.arrays()
    t = {n: None if x is None else torch.as_tensor(x) for n, x in a.items()}
    for n in ("q", "k", "v", "g", "beta", "initial_state"):
        t[n] = t[n].to(dtype).requires_grad_(n == "q")
    before = snapshot(t)
    o, S = kda_recurrent_np(**t, scale=spec.scale, output_final_state=True)
    assert_unchanged(before, t)
    assert isinstance(o, np.ndarray) and o.dtype == np.float64 and S.dtype == np.float64
    same_values = {n: None if x is None else x.detach().double().numpy() for n, x in t.items()}
    same_values["cu_seqlens"] = a["cu_seqlens"]
    o2, S2 = kda_recurrent_np(**same_values, scale=spec.scale, output_final_state=True)
    assert np.array_equal(o, o2) and np.array_equal(S, S2)
