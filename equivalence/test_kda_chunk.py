"""kernels.chunk_kda (and chunk_kda_ieee) against the float64 oracle, under the suite's one
tolerance rule (relations.Harness, tolerance.judge), on explicit small cases chosen for where
chunked kernels break: T around the chunk (64) and sub-chunk (16) sizes, K and V not powers
of two and below 16, K != V, GVA, packed batches with length-1 and empty sequences, an
initial state, masked gates (g = -1000, in-chunk cumulative sums to -64000), and the
in-kernel options. Runs under the Triton interpreter on the CPU (kernels/runtime.py), and
compiled on a CUDA GPU when there is one.
"""

from __future__ import annotations

import kdaverify.kernels  # noqa: F401  (before triton: it sets TRITON_INTERPRET on a CPU)
import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from kdaverify.equivalence.cases import CaseSpec
from kdaverify.equivalence.gradients import (
    GRAD_INPUTS,
    autograd_grads,
    cotangents,
    expect_gradients,
    grad_determinism,
    grad_gate_in_kernel,
    grad_l2norm_in_kernel,
    judge_gradients,
    oracle_grads,
    reference_grads,
)
from kdaverify.equivalence.implementation import DTYPES, load_implementation
from kdaverify.equivalence.relations import Harness, bitwise_equal, causality, gate_in_kernel, l2norm_in_kernel
from kdaverify.equivalence.tolerance import as_f64
from kdaverify.kernels import chunk_kda, chunk_kda_ieee
from kdaverify.kernels.kda_chunk_intra import round_to
from kdaverify.reference import beta_activation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT = load_implementation(chunk_kda, device=DEVICE)
IEEE = load_implementation(chunk_kda_ieee, device=DEVICE)

CASES = [
    CaseSpec(T=1, K=3, V=3, h0=True, seed=1),
    CaseSpec(T=15, K=16, V=20, G=2, seed=2),
    CaseSpec(T=16, K=20, V=16, gate="strong", seed=3),
    CaseSpec(B=2, T=17, K=3, V=64, h0=True, gate="masked", seed=4),
    CaseSpec(T=65, K=64, V=3, H=2, G=2, gate="masked", beta_max=2.0, seed=5),
    CaseSpec(T=130, K=16, V=16, h0=True, gate="mild", input_scale=10.0, scale=0.3, seed=6),
    CaseSpec(T=84, K=20, V=20, G=2, h0=True, seqlens=(1, 17, 1, 65), gate="masked", seed=7),
    CaseSpec(T=64, K=3, V=20, shared_gate=True, gate="safe", seed=8),
    # g = -inf (hard resets): the in-chunk sums restart, ratios across a reset are 0
    CaseSpec(B=2, T=19, H=2, G=2, K=5, V=7, gate="reset", h0=True, seed=10),
    CaseSpec(T=150, K=16, V=16, G=2, h0=True, seqlens=(1, 84, 65), gate="reset", seed=9),
]


def _id(spec: CaseSpec) -> str:
    return f"B{spec.B}T{spec.T}H{spec.H}G{spec.G}K{spec.K}V{spec.V}-{spec.gate}" + ("-packed" if spec.seqlens else "")


@pytest.mark.parametrize("spec", CASES, ids=_id)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_oracle(spec, dtype):
    h = Harness(DEFAULT, DTYPES[dtype])
    h.expect_oracle("chunk_kda", h.inputs(spec.arrays()), spec.scale)


@pytest.mark.parametrize("spec", [CASES[3], CASES[6]], ids=_id)
def test_ieee_held_to_fp32_budget(spec):
    """chunk_kda_ieee declares full-fp32 products: the ieee same-precision reference scales its budget."""
    assert IEEE.caps.precision == "ieee"
    h = Harness(IEEE, torch.float32)
    h.expect_oracle("chunk_kda_ieee", h.inputs(spec.arrays()), spec.scale)


def test_large_heads():
    """K, V past 128 and not powers of two: BK = 256, V split in three 64-column programs."""
    spec = CaseSpec(T=20, K=200, V=130, h0=True, seed=3)
    h = Harness(DEFAULT, torch.bfloat16)
    h.expect_oracle("chunk_kda K200 V130", h.inputs(spec.arrays()), spec.scale)


def test_bfloat16_final_state_not_biased_at_K256():
    """The case the GPU conformance run shrank to (2026-11-27): bf16, K = V = 256, T = 65.
    Rounding V - W S to bf16 before M and V' again as the state update's operand left the
    final state with an error along itself of -1.3e-4 at this seed, 4.1x its bias budget
    (3.2e-5), at only 1.3x the reference's RMS error (kernels/NOTES.md "bf16 rounding of
    V - W S")."""
    spec = CaseSpec(B=2, T=65, H=2, G=2, K=256, V=256, input_scale=0.01, seed=1)
    h = Harness(DEFAULT, torch.bfloat16)
    h.expect_oracle("chunk_kda bf16 K256", h.inputs(spec.arrays()), spec.scale)


def test_bfloat16_initial_state_gradient_is_not_biased():
    """The case the H100 conformance run of 2026-11-28 shrank to (grad_oracle, grad_output_only
    and grad_initial_state at bf16): dh0 with an error along itself of -3.6e-4 at rel_rms
    1.7e-3, against a bias budget of 2.2e-4 when the budget's noise counted elements. Over 20
    draws of this shape the kernel's bias has mean 0.05e-4 and std 2.3e-4 (the bf16 chunkwise
    reference's std: 1.3e-4): noise of errors shared along each K-row, which the budget now
    counts by rows (tolerance.BIAS_SIGMAS). The same rows still catch a real scale error
    (mutants.output_scaled)."""
    spec = CaseSpec(B=1, T=17, H=1, G=2, K=80, V=192, gate="logsigmoid", input_scale=0.01, h0=True, seed=2)
    expect_gradients(Harness(DEFAULT, torch.bfloat16), "gradients", spec)


def test_float16_inputs():
    spec = CASES[5]
    h = Harness(DEFAULT, torch.float16)
    h.expect_oracle("chunk_kda fp16", h.inputs(spec.arrays()), spec.scale)


def test_masked_chunk_does_not_overflow():
    """A whole chunk of g = -1000 (in-chunk cumulative sum down to -64000) after ordinary
    tokens: exp(-G) would overflow fp32; the kernel must stay finite and right."""
    spec = CaseSpec(T=150, K=16, V=16, h0=True, gate="logsigmoid", seed=9)
    arrays = spec.arrays()
    arrays["g"][:, 40:110] = -1000.0
    h = Harness(DEFAULT, torch.float32)
    h.expect_oracle("masked chunk", h.inputs(arrays), spec.scale)


@pytest.mark.parametrize("seed", [11, 12])
def test_causality_under_masked_gates(seed):
    """No future gate reaches a past output, even through rounding (bitwise), with masked gates."""
    causality(Harness(DEFAULT, torch.float32), CaseSpec(T=70, K=20, V=16, gate="masked", seed=seed))


def test_empty_sequences():
    """Zero-length sequences in a packed batch: their final state is their initial state
    (written), and the other sequences are computed exactly as without them."""
    spec = CaseSpec(T=20, K=16, V=16, h0=True, seqlens=(3, 17), seed=13)
    t = Harness(DEFAULT, torch.float32).inputs(spec.arrays())
    o, S = chunk_kda(**t, output_final_state=True)
    h0 = torch.cat([t["initial_state"][:1], torch.randn_like(t["initial_state"][:2]), t["initial_state"][1:]])
    cu = torch.tensor([0, 3, 3, 3, 20], dtype=torch.int64, device=DEVICE)
    o_e, S_e = chunk_kda(**dict(t, initial_state=h0, cu_seqlens=cu), output_final_state=True)
    bitwise_equal("o with empty sequences", o_e, o)
    bitwise_equal("final state of the non-empty sequences", S_e[[0, 3]], S)
    bitwise_equal("final state of the empty sequences", S_e[1:3], h0[1:3])


@pytest.mark.parametrize("gate", ["mild", "safe"])
def test_gate_in_kernel(gate):
    gate_in_kernel(Harness(DEFAULT, torch.float32), CaseSpec(T=33, K=20, V=16, G=2, gate=gate, seed=14))


def test_l2norm_in_kernel():
    l2norm_in_kernel(Harness(DEFAULT, torch.bfloat16), CaseSpec(T=33, K=20, V=16, h0=True, seed=15))


@pytest.mark.parametrize("neg", [False, True])
def test_beta_sigmoid_in_kernel(neg):
    spec = CaseSpec(T=33, K=16, V=16, seed=16)
    h = Harness(DEFAULT, torch.float32)
    arrays = spec.arrays()
    raw = h.inputs(dict(arrays, beta=np.random.default_rng(16).standard_normal(arrays["beta"].shape)))
    meaning = dict(raw, beta=beta_activation(raw["beta"].double(), neg).float())
    extra = dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=neg)
    h.expect_oracle("beta sigmoid in kernel", raw, spec.scale, meaning=meaning, **extra)


def _call(**changes):
    spec = CaseSpec(B=2, T=5, H=1, G=2, K=3, V=4, h0=True)
    t = Harness(DEFAULT, torch.float32).inputs(spec.arrays())
    return dict(t, **{n: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for n, x in changes.items()})


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("precision", dict(precision="bf16")),
        (
            "q",
            dict(
                q=torch.zeros(2, 5, 1, 300),
                k=torch.zeros(2, 5, 1, 300),
                g=torch.zeros(2, 5, 2, 300),
                initial_state=None,
            ),
        ),  # K > 256
        ("q", dict(q=torch.zeros(2, 5, 1, 3, dtype=torch.float64))),
        ("initial_state", dict(initial_state=torch.zeros(2, 2, 4, 3))),
        ("cu_seqlens", dict(cu_seqlens=torch.tensor([0, 2, 5]))),
        ("A_log", dict(use_gate_in_kernel=True, A_log=torch.zeros(3))),
        ("dt_bias", dict(use_gate_in_kernel=True, A_log=torch.zeros(2), dt_bias=torch.zeros(5))),
        ("lower_bound", dict(use_gate_in_kernel=True, A_log=torch.zeros(2), lower_bound=1.0)),
        ("A_log", dict(A_log=torch.zeros(2))),
        ("allow_neg_eigval", dict(allow_neg_eigval=True)),
    ],
)
def test_bad_input(name, changes):
    with pytest.raises(ValueError, match=f"^{name}:"):
        chunk_kda(**_call(**changes))
    if name != "precision":
        with pytest.raises(ValueError, match=f"^{name}:"):
            chunk_kda_ieee(**_call(**changes))


# ------------------------------------------------------------------ backward (ChunkKDAFunction)
# Gradients are held to the float64 adjoint oracle under the tolerance rule with the float32
# recurrence's autograd as the same-precision reference (equivalence/gradients.py): that
# reference is full fp32, so these run on chunk_kda_ieee with float32 inputs.

GRAD_CASES = [
    CaseSpec(T=1, K=3, V=3, h0=True, seed=21),
    CaseSpec(T=70, K=20, V=16, H=2, G=2, h0=True, gate="strong", seed=22),
    CaseSpec(B=2, T=33, K=16, V=20, gate="masked", beta_max=2.0, seed=23),
    CaseSpec(T=84, K=20, V=20, G=2, h0=True, seqlens=(1, 17, 1, 65), gate="masked", seed=24),
    CaseSpec(T=64, K=3, V=40, shared_gate=True, gate="safe", input_scale=10.0, scale=0.3, seed=25),
    CaseSpec(T=150, K=8, V=8, G=2, h0=True, seqlens=(1, 84, 65), gate="reset", seed=26),
]


@pytest.mark.parametrize("spec", GRAD_CASES, ids=_id)
def test_gradients_match_oracle(spec):
    expect_gradients(Harness(IEEE, torch.float32), "chunk_kda_ieee gradients", spec)


@pytest.mark.parametrize("loss", ["o only", "final_state only"])
def test_gradients_of_one_output(loss):
    """dht absent (a loss on o alone) and do absent (on the final state alone)."""
    expect_gradients(Harness(IEEE, torch.float32), "chunk_kda_ieee", GRAD_CASES[3], loss)


def test_gradients_through_a_masked_chunk():
    """g = -1000 over 70 tokens: the backward's exponents stay bounded (pairs formed as
    exp(G_r - G_i), r >= i), so no gradient overflows and all agree with the oracle."""
    spec = CaseSpec(T=150, K=16, V=16, h0=True, gate="logsigmoid", seed=26)
    arrays = spec.arrays()
    arrays["g"][:, 40:110] = -1000.0
    h = Harness(IEEE, torch.float32)
    t = h.inputs(arrays)
    do, dht = cotangents(spec, torch.float32, DEVICE, "o and final_state")
    got = autograd_grads(lambda x: IEEE.call(x, scale=spec.scale), t, do, dht)
    want = oracle_grads(t, do, dht, spec.scale)
    judge_gradients(h, "masked chunk", got, want, reference_grads(spec.scale, t, do, dht), t)


def test_gradients_of_in_kernel_options():
    """dz, dA_log, ddt_bias (both gate forms) and dq, dk through the L2 norm."""
    h = Harness(IEEE, torch.float32)
    grad_gate_in_kernel(h, CaseSpec(T=40, K=16, V=16, G=2, h0=True, gate="mild", seed=27))
    grad_gate_in_kernel(h, CaseSpec(T=40, K=16, V=16, gate="safe", seed=28))
    grad_l2norm_in_kernel(h, CaseSpec(T=40, K=20, V=16, h0=True, seed=29))


@pytest.mark.parametrize("seed", [10, 14])
def test_bfloat16_gate_gradients_with_resets(seed):
    """bf16 gate-parameter gradients where the gate resets the state: dg reaches dA_log and
    ddt_bias through sums over tokens in which the pair terms' contributions cancel. With one
    bf16 dot per pair product, chunk_grads gave ddt_bias 1.54e-2 at both seeds against a
    budget of 1.42e-2 and 1.17e-2 (conformance check grad_gate_in_kernel, its explicit
    example at seed 10); mma_hilo gives 3.4e-3 and 2.3e-3."""
    h = Harness(DEFAULT, torch.bfloat16)
    grad_gate_in_kernel(h, CaseSpec(B=2, T=19, H=2, G=2, K=5, V=7, gate="reset", h0=True, seed=seed))


@pytest.mark.parametrize("neg", [False, True])
def test_gradient_of_beta_sigmoid(neg):
    """d(raw beta) = dbeta * the sigmoid's derivative (times 2 with negative eigenvalues)."""
    spec = CaseSpec(T=40, K=16, V=16, seed=30)
    h = Harness(IEEE, torch.float32)
    raw = h.inputs(dict(spec.arrays(), beta=np.random.default_rng(30).standard_normal((1, 40, 1))))
    do, dht = cotangents(spec, torch.float32, DEVICE, "o and final_state")
    extra = dict(use_beta_sigmoid_in_kernel=True, allow_neg_eigval=neg)
    got = autograd_grads(lambda x: IEEE.call(x, scale=spec.scale, **extra), raw, do, dht)
    b = torch.as_tensor(as_f64(raw["beta"]))
    act = beta_activation(b, neg)
    want = oracle_grads(dict(raw, beta=act.numpy()), do, dht, spec.scale)
    want["beta"] = want["beta"] * (act * (1 - act / (2 if neg else 1))).numpy()
    refs = reference_grads(spec.scale, raw, do, dht, lambda x: dict(x, beta=beta_activation(x["beta"], neg)))
    judge_gradients(h, "beta sigmoid in kernel", got, want, refs, raw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_forward_equals_inference_forward(dtype):
    """The autograd path (keeping the chunk states) computes o and the final state bitwise
    as the inference path does: storing h changes no arithmetic."""
    spec = CaseSpec(T=84, K=20, V=20, G=2, h0=True, seqlens=(1, 17, 1, 65), gate="masked", seed=31)
    t = Harness(DEFAULT, DTYPES[dtype]).inputs(spec.arrays())
    with torch.no_grad():
        o, S = chunk_kda(**t, output_final_state=True)
    o_g, S_g = chunk_kda(**dict(t, q=t["q"].clone().requires_grad_()), output_final_state=True)
    assert o_g.requires_grad and S_g.requires_grad
    bitwise_equal("o with autograd", o_g.detach(), o)
    bitwise_equal("final state with autograd", S_g.detach(), S)


# (K, V) where the compiled kernels went wrong on an H100 with bf16 dots when BV was smaller
# than 64 (kernels/NOTES.md, "Block sizes that miscompile"): o and every gradient are
# judged, so a GPU run of this file catches a block size that miscompiles.
BLOCK_CASES = [(16, 16), (32, 32), (64, 3), (128, 128)]


@pytest.mark.parametrize("K,V", BLOCK_CASES, ids=[f"K{k}V{v}" for k, v in BLOCK_CASES])
def test_bfloat16_gradients_match_oracle(K, V):
    """bf16 gradients against the float64 oracle, with the bf16 same-precision references
    (gradients.py: the chunkwise oracle's operands rounded to bfloat16), masked gates."""
    spec = CaseSpec(T=70, K=K, V=V, H=1, G=2, h0=True, gate="masked", beta_max=2.0, seed=40 + K)
    h = Harness(DEFAULT, torch.bfloat16)
    h.expect_oracle("chunk_kda bf16", h.inputs(spec.arrays()), spec.scale)
    expect_gradients(h, "chunk_kda bf16 gradients", spec)


def test_float32_gradients_at_K128():
    """fp32 at K = V = 128: on an H100 the backward's first two launch configs do not fit
    in shared memory and BV = 32 runs (ChunkBlocks.fitting); judged against the oracle."""
    spec = CaseSpec(T=70, K=128, V=128, h0=True, gate="logsigmoid", seed=44)
    expect_gradients(Harness(IEEE, torch.float32), "chunk_kda_ieee K128 gradients", spec)


def test_float32_gradients_at_K256():
    """fp32 at K = V = 256: on an H100 chunk_grads fits only with its RELOAD config (168 KiB of
    shared memory; 320 KiB without, ChunkBlocks.fitting), which a GPU run of this test takes;
    judged against the oracle."""
    spec = CaseSpec(T=70, K=256, V=256, h0=True, gate="logsigmoid", seed=45)
    expect_gradients(Harness(IEEE, torch.float32), "chunk_kda_ieee K256 gradients", spec)


@pytest.mark.parametrize("impl", [DEFAULT, IEEE], ids=["tf32", "ieee"])
def test_reload_config_changes_no_bit(impl, monkeypatch):
    """chunk_grads' RELOAD config (each operand loaded again before its dot) gives the same
    gradients, bit for bit, as the plain kernel at the same BV. Forced here at small K
    (two V blocks), so the interpreter, which always runs the first config, runs it too."""
    from kdaverify.kernels import kda_chunk, runtime

    spec = CaseSpec(T=70, K=40, V=48, H=1, G=2, h0=True, gate="logsigmoid", seed=46)
    h = Harness(impl, torch.float32)
    t = h.inputs(spec.arrays())
    do, dht = cotangents(spec, torch.float32, DEVICE, "o and final_state")
    got = {}
    for reload in (False, True):
        monkeypatch.setattr(runtime, "_FITTING", {})  # no remembered config index
        # chunk_grads is the one caller that passes `reload`; the other kernels get BV = 32
        configs = [dict(BV=32, num_stages=1)], [dict(BV=32, num_stages=1, RELOAD=reload)]
        monkeypatch.setattr(
            kda_chunk.ChunkBlocks, "fitting", lambda self, BV, dt, reload=None, c=configs: c[reload is not None]
        )
        got[reload] = autograd_grads(lambda x: impl.call(x, scale=spec.scale), t, do, dht)
    for n, d in got[False].items():
        assert torch.equal(d, got[True][n]), f"d{n}: RELOAD changed the result"


DIAG_CASES = [  # (spec, dtype, L2 norm in the kernel)
    (CASES[6], "float32", False),  # packed, length-1 sequences, masked gates, GVA, initial state
    (CaseSpec(T=40, K=5, V=7, H=2, G=2, h0=True, seqlens=(3, 21, 16), gate="reset", seed=48), "bfloat16", True),
    (CaseSpec(T=40, K=80, V=24, G=2, h0=True, gate="strong", seed=47), "float32", True),  # two K blocks of 64
]


@pytest.mark.parametrize(("spec", "dtype", "l2"), DIAG_CASES, ids=[_id(c[0]) for c in DIAG_CASES])
def test_diagonal_tile_forms_agree_bitwise(spec, dtype, l2, monkeypatch):
    """chunk_pairs' diagonal tile in column steps (DIAG_COLS = 1, the GPU's form), in steps of 4
    and 16 columns (16: the interpreter's form) and token-parallel in chunk_diag (DIAG_COLS = 0,
    one and four value heads a program), and the gate cumsum over all of K or in blocks of 16
    columns (CUMSUM_BK), or row by row (CUMSUM_ROWS: 16 columns, and 128, past K), and the
    recurrence's Aqk and M (MATS_ROWS) or the solve's diagonal blocks (SOLVE_ROWS) under the row
    mask give the same o and final state, bit for bit under the interpreter: the interpreter's
    runs of the suite check the GPU's forms through this test. Compiled, the diagonal forms
    differ by rounding (about 4e-5 relative in bf16 on an H200: the compiler contracts products
    and sums in other orders), so there each form is held to the oracle instead."""
    from dataclasses import replace

    from kdaverify.kernels import kda_chunk
    from kdaverify.kernels.runtime import INTERPRET
    from kdaverify.reference.gates import l2norm

    h = Harness(DEFAULT, DTYPES[dtype])
    t = h.inputs(spec.arrays())
    meaning = dict(t, q=l2norm(t["q"].double()).to(h.dtype), k=l2norm(t["k"].double()).to(h.dtype)) if l2 else t
    forms = {
        "1": dict(DIAG_COLS=1),
        "4": dict(DIAG_COLS=4),
        "16": dict(DIAG_COLS=16),
        "token, 4 heads": dict(DIAG_COLS=0, DIAG_HEADS=4),
        "token, 1 head": dict(DIAG_COLS=0, DIAG_HEADS=1),
        "token, columns stored as formed": dict(DIAG_COLS=0, DIAG_HEADS=4, DIAG_EACH=1),
        "1, cumsum in 16 columns": dict(DIAG_COLS=1, CUMSUM_BK=16),
        "1, cumsum by rows of 16 columns": dict(DIAG_COLS=1, CUMSUM_ROWS=16),
        "1, cumsum by rows of 128 columns": dict(DIAG_COLS=1, CUMSUM_ROWS=128),
        # MATS_ROWS: the recurrence reads Aqk and M under the row mask alone, so every
        # element above the diagonal must have been written as 0 by each diagonal form (the
        # scratch is NaN-filled in these tests: an element left unwritten turns o into NaN)
        "1, matrices under the row mask": dict(DIAG_COLS=1, MATS_ROWS=1),
        "16, matrices under the row mask": dict(DIAG_COLS=16, MATS_ROWS=1),
        "token, stored as formed, matrices under the row mask": dict(
            DIAG_COLS=0, DIAG_HEADS=4, DIAG_EACH=1, MATS_ROWS=1
        ),
        "1, the solve's diagonal blocks under the row mask": dict(DIAG_COLS=1, SOLVE_ROWS=1),
    }
    got = {}
    # one K step for both diagonal forms (chunk_pairs' BK_INTRA, chunk_diag's DIAG_BK): the sums
    # over K are added block by block, so the forms agree bit for bit only at the same step
    base = replace(kda_chunk.BLOCKS, DIAG_HEADS=4, CUMSUM_BK=0, BK_INTRA=64, DIAG_BK=64, MATS_ROWS=0)
    for name, fields in forms.items():
        monkeypatch.setattr(kda_chunk, "BLOCKS", replace(base, **fields))
        if INTERPRET:
            got[name] = DEFAULT.call(t, scale=spec.scale, use_qk_l2norm_in_kernel=l2)
        else:
            h.expect_oracle(f"diagonal tile: {name}", t, spec.scale, meaning=meaning, use_qk_l2norm_in_kernel=l2)
    for name in list(got)[1:]:
        for a, b, what in zip(got["1"], got[name], ("o", "final_state"), strict=True):
            assert torch.equal(a, b), f"{what}: diagonal tile '{name}' differs from the column loop"


@pytest.mark.parametrize("bk", [16, 32, 64])
def test_pairs_k_steps_match_oracle(bk, monkeypatch):
    """chunk_pairs summing K in steps of 16, 32 (the GPU's BK_INTRA) and 64 (the interpreter's)
    passes the oracle at K = 80 (its last step partial, with masked columns, at 32 and 64; a
    loop that dropped that step failed both), with resets and a ragged packed batch."""
    from dataclasses import replace

    from kdaverify.kernels import kda_chunk

    monkeypatch.setattr(kda_chunk, "BLOCKS", replace(kda_chunk.BLOCKS, BK_INTRA=bk))
    spec = CaseSpec(T=40, K=80, V=24, H=2, G=2, h0=True, seqlens=(3, 21, 16), gate="reset", seed=52)
    h = Harness(DEFAULT, DTYPES["bfloat16"])
    h.expect_oracle(f"chunk_pairs in K steps of {bk}", h.inputs(spec.arrays()), spec.scale)


def test_scratch_buffers_are_poisoned_in_these_tests():
    """conftest.py turns runtime.POISON_SCRATCH on: every floating scratch buffer of our
    kernels starts as NaN here, so an element read before it is written shows."""
    from kdaverify.kernels import runtime

    assert runtime.POISON_SCRATCH
    assert torch.isnan(runtime.scratch(2, 3, dtype=torch.bfloat16, device="cpu")).all()
    assert runtime.scratch(4, dtype=torch.int8, device="cpu").dtype == torch.int8


@pytest.mark.parametrize("cols", [0, 1, 4, 16])
@pytest.mark.parametrize(
    ("spec", "impl", "dtype"),
    [
        (CaseSpec(T=70, K=40, V=24, G=2, h0=True, gate="strong", seed=49), IEEE, "float32"),
        (CaseSpec(T=40, K=5, V=7, H=2, G=2, h0=True, seqlens=(3, 21, 16), gate="reset", seed=50), DEFAULT, "bfloat16"),
    ],
    ids=["strong-fp32-ieee", "reset-packed-bf16"],
)
def test_pair_grads_diagonal_widths_match_oracle(cols, spec, impl, dtype, monkeypatch):
    """chunk_pair_grads' pairs inside a sub-chunk at every width (GRADS_DIAG_COLS: 1 is the
    GPU's column loop, 16 the interpreter's one step, 0 the token-parallel kernel
    chunk_pair_grads_diag) give gradients that pass the oracle under the tolerance rule: the
    widths add the same terms in different orders. The cases have ragged tails (T = 70, a
    packed batch of 3, 21 and 16 tokens), GVA and resets, which the token-parallel form's
    loop bounds and head blocks must honour."""
    from dataclasses import replace

    from kdaverify.kernels import kda_chunk

    monkeypatch.setattr(kda_chunk, "BLOCKS", replace(kda_chunk.BLOCKS, GRADS_DIAG_COLS=cols))
    expect_gradients(Harness(impl, DTYPES[dtype]), f"pair grads, {cols} columns per step", spec)


@pytest.mark.parametrize(
    ("spec", "impl", "dtype"),
    [
        (CaseSpec(T=70, K=40, V=24, G=2, h0=True, gate="strong", seed=49), IEEE, "float32"),
        (CaseSpec(T=40, K=5, V=7, H=2, G=2, h0=True, seqlens=(3, 21, 16), gate="reset", seed=50), DEFAULT, "bfloat16"),
        (CaseSpec(T=90, K=20, V=12, G=3, h0=True, seqlens=(70, 20), gate="reset", seed=52), DEFAULT, "float32"),
    ],
    ids=["strong-fp32-ieee", "reset-packed-bf16", "reset-packed-fp32"],
)
def test_dg_cumsum_by_rows_matches_oracle(spec, impl, dtype, monkeypatch):
    """chunk_dg_cumsum walking the rows back with one running sum per column (DG_ROWS = 1)
    gives gradients that pass the oracle under the tolerance rule, with resets in the middle
    and at the first row of chunks (each sum restarts where the count changes; a reset token
    gets 0), ragged tails and packed sequences; ragged K (5, 20, 40: masked columns)."""
    from dataclasses import replace

    from kdaverify.kernels import kda_chunk

    monkeypatch.setattr(kda_chunk, "BLOCKS", replace(kda_chunk.BLOCKS, DG_ROWS=1))
    expect_gradients(Harness(impl, DTYPES[dtype]), "dg cumsum by rows", spec)


def test_pair_grads_token_parallel_head_blocks(monkeypatch):
    """chunk_pair_grads_diag over blocks of value heads that do not divide HV: HV = 6 in blocks
    of 4, the second block half masked, with a ragged packed batch and resets."""
    from dataclasses import replace

    from kdaverify.kernels import kda_chunk

    blocks = replace(kda_chunk.BLOCKS, GRADS_DIAG_COLS=0, GRADS_DIAG_HEADS=4)
    monkeypatch.setattr(kda_chunk, "BLOCKS", blocks)
    spec = CaseSpec(T=37, K=20, V=12, H=3, G=2, h0=True, seqlens=(1, 20, 16), gate="reset", seed=51)
    expect_gradients(Harness(DEFAULT, DTYPES["float32"]), "pair grads token-parallel, HV = 6 in blocks of 4", spec)


def test_reset_split_changes_no_bit(monkeypatch):
    """The kernels split by resets (ChunkBlocks.RESET_SPLIT 1, and 2 with chunk_dg_cumsum:
    RESETS off over the chunks without a reset, on over the rest, whose programs take all of
    a chunk's sub-chunks or tokens in turn: ChunkBlocks.span) give the outputs and gradients
    of one launch with RESETS on everywhere, bit for bit under the interpreter (off, the
    counts are zero and every comparison of them is true), and pass the oracle compiled. A
    packed batch with GVA whose middle chunk holds no reset in any head, its others some, the
    last chunk of the first sequence 2 tokens (a span's later sub-chunks past its end); the
    diagonal kernels (token-parallel here on the CPU too) have head blocks of 4 that hold
    heads with and without."""
    from dataclasses import replace

    from kdaverify.kernels import kda_chunk
    from kdaverify.kernels.runtime import INTERPRET

    spec = CaseSpec(T=140, K=8, V=8, H=1, G=4, h0=True, seqlens=(130, 10), gate="reset", seed=52)
    arrays = spec.arrays()
    g = arrays["g"]
    g[:, 64:128] = np.where(np.isinf(g[:, 64:128]), -0.5, g[:, 64:128])  # chunk 1: no reset
    g[:, 130:, 1:] = np.where(np.isinf(g[:, 130:, 1:]), -0.5, g[:, 130:, 1:])  # resets in head 0 only
    assert np.isinf(g[:, :64]).any() and np.isinf(g[:, 128:130]).any() and np.isinf(g[:, 130:, 0]).any()
    h = Harness(DEFAULT, torch.float32)
    t = h.inputs(arrays)
    do, dht = cotangents(spec, h.dtype, DEVICE, "o and final_state")
    got = {}
    for split in (0, 1, 2):
        monkeypatch.setattr(
            kda_chunk, "BLOCKS", replace(kda_chunk.BLOCKS, RESET_SPLIT=split, DIAG_COLS=0, GRADS_DIAG_COLS=0)
        )
        if INTERPRET:
            got[split] = (DEFAULT.call(t, scale=spec.scale), autograd_grads(lambda x: DEFAULT.call(x), t, do, dht))
        else:
            h.expect_oracle(f"reset split {split}", t, spec.scale)
    for split in got:
        for a, b, what in zip(got[0][0], got[split][0], ("o", "final_state"), strict=True):
            assert torch.equal(a, b), f"{what}: the launches split at level {split} differ from one launch"
        for n, d in got[0][1].items():
            assert torch.equal(d, got[split][1][n]), f"d{n}: the launches split at level {split} differ from one launch"


@pytest.mark.parametrize("split", [0, 1])
def test_dh_operand_forms_change_no_bit(monkeypatch, split):
    """chunk_dh_recurrence reading the forward's QG, KG, KD (ChunkBlocks.DH_OPS; kept only with
    16-bit dot operands, so bf16 inputs here) gives every gradient of the form that makes
    them in place, bit for bit under the interpreter (the same products and operands,
    rounded as mma rounds them), and the oracle's compiled; with DH_SPLIT and without
    (chunk_dh_operands then forms Kd itself or reads KD). GVA (their rows are per value
    head, q and k's per query head), a packed batch whose second sequence ends inside a chunk
    (rows past it unwritten in QG), resets, an initial state; and a second backward through
    the same graph (retain_graph), which finds them freed by the first and forms them again:
    it must give the first one's gradients."""
    forms = {ops: dict(DH_SPLIT=split, DH_OPS=ops) for ops in (0, 1)}
    got = _block_forms(monkeypatch, forms, seed=53, twice=True)
    for first, again in got.values():
        for n, d in again.items():
            assert torch.equal(first[n], d), f"{n}: the second backward (operands formed again) differs from the first"
    for n, d in got.get(0, ({}, {}))[0].items():
        assert torch.equal(d, got[1][0][n]), f"{n}: DH_OPS 1 differs from DH_OPS 0 (DH_SPLIT {split})"


def _block_forms(monkeypatch, forms: dict, seed: int, twice: bool = False) -> dict:
    """Our kernel under each form of `forms` (name -> ChunkBlocks fields) on one bf16 case:
    GVA, a packed batch whose first sequence ends inside a chunk, resets and an initial state.
    Under the interpreter {name: _grads(...)} to compare bit for bit; compiled, each form is
    held to the oracle instead and {} returned."""
    from dataclasses import replace

    from kdaverify.kernels import kda_chunk
    from kdaverify.kernels.runtime import INTERPRET

    spec = CaseSpec(T=90, K=20, V=12, H=1, G=3, h0=True, seqlens=(70, 20), gate="reset", seed=seed)
    h = Harness(DEFAULT, DTYPES["bfloat16"])
    t = h.inputs(spec.arrays())
    do, dht = cotangents(spec, h.dtype, DEVICE, "o and final_state")
    got = {}
    for name, fields in forms.items():
        monkeypatch.setattr(kda_chunk, "BLOCKS", replace(kda_chunk.BLOCKS, **fields))
        if INTERPRET:
            got[name] = _grads(t, spec, do, dht, twice)
        else:
            h.expect_oracle(f"{fields}", t, spec.scale)
    return got


def _grads(t, spec, do, dht, twice: bool = False):
    """o, the final state and the gradient of every input, by name (d<input>), of our kernel
    on t; with twice, also a second backward through the same graph (gradients only)."""
    leaves = {n: t[n].detach().clone().requires_grad_() for n in GRAD_INPUTS if t[n] is not None}
    o, ht = DEFAULT.call({**t, **leaves}, scale=spec.scale)
    first = torch.autograd.grad([o, ht], list(leaves.values()), [do, dht], retain_graph=twice)
    got = {"o": o, "final_state": ht, **{f"d{n}": g for n, g in zip(leaves, first, strict=True)}}
    if not twice:
        return got
    again = torch.autograd.grad([o, ht], list(leaves.values()), [do, dht])
    return got, {f"d{n}": g for n, g in zip(leaves, again, strict=True)}


@pytest.mark.parametrize("split", [0, 1])
def test_matrix_row_loads_change_no_bit(monkeypatch, split):
    """Aqk, M and Minv loaded under the row mask alone (ChunkBlocks.MATS_ROWS = 2: the
    recurrence's loads and the backward's, in chunk_dh_operands with DH_SPLIT, in
    chunk_dh_recurrence without it, and in chunk_grads) give o, the final state and every
    gradient of the triangle-masked loads (MATS_ROWS = 0) bit for bit under the interpreter,
    where the scratch buffers start as NaN (conftest): an element above the diagonal that the
    forward left unwritten would reach the result. A packed batch whose first sequence ends
    inside a chunk, resets, GVA and an initial state. Compiled, each form is held to the
    oracle. bf16 inputs: only 16-bit dot operands take the row mask (ChunkBlocks.mats_rows)."""
    got = _block_forms(monkeypatch, {rows: dict(MATS_ROWS=rows, DH_SPLIT=split) for rows in (0, 2)}, seed=54)
    for what, x in got.get(0, {}).items():
        assert torch.equal(x, got[2][what]), f"{what}: MATS_ROWS 2 differs from the triangle-masked loads"


def test_bfloat16_backward_is_deterministic_and_typed():
    """The bf16 backward is deterministic, finite and returns each gradient in its input's dtype."""
    spec = GRAD_CASES[1]
    h = Harness(DEFAULT, torch.bfloat16)
    grad_determinism(h, spec)
    t = h.inputs(spec.arrays())
    do, dht = cotangents(spec, torch.bfloat16, DEVICE, "o and final_state")
    got = autograd_grads(lambda x: DEFAULT.call(x, scale=spec.scale), t, do, dht)
    for n, d in got.items():
        assert d.dtype == t[n].dtype, f"d{n}: dtype {d.dtype}, expected {t[n].dtype}"
        assert torch.isfinite(d.float()).all(), f"d{n}: not finite"


def test_gradients_with_empty_sequences():
    """An empty sequence passes its final state's cotangent straight to its dh0, and the
    other sequences' gradients are those of the batch without it, bitwise."""
    spec = CaseSpec(T=20, K=16, V=16, h0=True, seqlens=(3, 17), seed=32)
    t = Harness(IEEE, torch.float32).inputs(spec.arrays())
    do, dht = cotangents(spec, torch.float32, DEVICE, "o and final_state")
    call = lambda x: IEEE.call(x, scale=spec.scale)  # noqa: E731
    base = autograd_grads(call, t, do, dht)
    h0 = torch.cat([t["initial_state"][:1], torch.randn_like(t["initial_state"][:2]), t["initial_state"][1:]])
    dht_e = torch.cat([dht[:1], torch.randn_like(dht[:2]), dht[1:]])
    cu = torch.tensor([0, 3, 3, 3, 20], dtype=torch.int64, device=DEVICE)
    got = autograd_grads(call, dict(t, initial_state=h0, cu_seqlens=cu), do, dht_e)
    for n in ("q", "k", "v", "g", "beta"):
        bitwise_equal(f"d{n} with empty sequences", got[n], base[n])
    bitwise_equal("dh0 of the non-empty sequences", got["initial_state"][[0, 3]], base["initial_state"])
    bitwise_equal("dh0 of the empty sequences", got["initial_state"][1:3], dht_e[1:3])


def test_gate_gradient_exactly_zero_without_history():
    """T = 1 (alone and packed) without an initial state: nothing is decayed, so dg is exactly
    0, as in the oracle. The diagonal pairs of Aqk must not leave a rounding residual there:
    relative to a zero gradient any residual is an infinite error (the suite's grad_length_one
    found 1e-9)."""
    for spec in (CaseSpec(T=1, H=3, K=1, V=1, seed=0), CaseSpec(T=3, K=5, V=4, seqlens=(1, 1, 1), seed=1)):
        t = Harness(IEEE, torch.float32).inputs(spec.arrays())
        do, dht = cotangents(spec, torch.float32, DEVICE, "o and final_state")
        got = autograd_grads(lambda x, s=spec: IEEE.call(x, scale=s.scale), t, do, dht)
        assert torch.equal(got["g"], torch.zeros_like(got["g"])), f"dg: expected exact zeros, got {got['g'].flatten()}"


def test_launch_fitting_takes_the_first_config_that_loads():
    """runtime.launch_fitting: a config that does not fit (OutOfResources at load, before it
    runs) is skipped, the first that loads runs and is remembered for its key, and when none
    fits a ValueError names the kernel, the sizes and the configs tried."""
    from kdaverify.kernels import runtime
    from triton.runtime.errors import OutOfResources

    class Kernel:
        __name__ = "fake_kernel"

        def __init__(self, fits):
            self.fits, self.launched, self.attempts = fits, [], 0

        def __getitem__(self, grid):
            def launch(*args, **meta):
                self.attempts += 1
                if not self.fits(meta):
                    raise OutOfResources(300_000, 232_448, "shared memory")
                self.launched.append((grid, meta))

            return launch

    configs = [dict(BV=64), dict(BV=64, num_stages=1), dict(BV=32, num_stages=1)]
    kernel = Kernel(lambda meta: meta["BV"] == 32)
    key = ("test", id(kernel))
    used = runtime.launch_fitting(kernel, key, configs, lambda cfg: (cfg["BV"],), (1, 2), K=8)
    assert used == configs[2] and kernel.launched == [((32,), dict(K=8, BV=32, num_stages=1))]
    runtime.launch_fitting(kernel, key, configs, lambda cfg: (cfg["BV"],), (1, 2), K=8)
    assert len(kernel.launched) == 2 and kernel.attempts == 4  # the remembered config ran first
    with pytest.raises(ValueError, match=r"fake_kernel: no launch config fits .*K=256") as err:
        runtime.launch_fitting(Kernel(lambda meta: False), ("none",), configs, lambda cfg: (1,), (), K=256)
    assert isinstance(err.value.__cause__, OutOfResources)


@triton.jit
def _bf16_round_trip(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, round_to(tl.load(x_ptr + i), tl.bfloat16).to(tl.float32))


def test_bfloat16_conversions_round_to_nearest():
    """float32 -> bfloat16 -> float32 inside a kernel equals torch's rounding (to nearest,
    ties to even; NaN kept, subnormals exact), compiled or interpreted: the interpreter's own
    cast truncated, and its way back got subnormals wrong (kernels/runtime.py)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1024) * 10.0 ** rng.integers(-42, 38, 1024)).astype(np.float32)
    halfway = (rng.standard_normal(64).astype(np.float32).view(np.uint32) & 0xFFFF0000) | 0x8000
    x[:64] = halfway.view(np.float32)  # ties between two bfloat16 values
    x[64:69] = [np.nan, np.inf, -np.inf, 0.0, 6.131231e-39]
    xt = torch.from_numpy(x).to(DEVICE)
    y = torch.empty_like(xt)
    _bf16_round_trip[(1,)](xt, y, N=1024)
    torch.testing.assert_close(y, xt.to(torch.bfloat16).float(), rtol=0, atol=0, equal_nan=True)


def test_two_stages_sits_between_default_and_unpipelined():
    """ChunkBlocks.TWO_STAGES puts a 2-stage config between Triton's default pipelining and
    none, at the same BV (the shared-memory fallbacks of launch_fitting, in order)."""
    import triton.language as tl
    from kdaverify.kernels.kda_chunk import ChunkBlocks

    assert [c.get("num_stages") for c in ChunkBlocks(TWO_STAGES=0).fitting(64, tl.bfloat16)] == [None, 1]
    configs = ChunkBlocks(TWO_STAGES=1).fitting(64, tl.bfloat16)
    assert [(c["BV"], c.get("num_stages")) for c in configs] == [(64, None), (64, 2), (64, 1)]


@pytest.mark.parametrize(
    "spec",
    [
        # GVA, a packed batch whose second sequence ends inside a chunk, resets, an initial state
        CaseSpec(T=90, K=20, V=12, H=1, G=3, h0=True, seqlens=(70, 20), gate="reset", seed=53),
        CaseSpec(B=2, T=150, K=64, V=80, H=2, G=1, h0=True, gate="logsigmoid", beta_max=2.0, seed=7),
    ],
)
def test_dh_split_gradients_hold_to_the_oracle(monkeypatch, spec):
    """ChunkBlocks.DH_SPLIT (the dh chain's dS-free parts formed for all chunks first,
    chunk_dh_operands) rounds differently from the default, so it is held to the float64
    oracle's gradients under the tolerance rule (bf16: the split applies to 16-bit dot
    operands only), and must differ from the default somewhere: a flag that changed nothing
    would pass the first part vacuously."""
    from dataclasses import replace

    from kdaverify.kernels import kda_chunk

    h = Harness(DEFAULT, DTYPES["bfloat16"])
    t = h.inputs(spec.arrays())
    do, dht = cotangents(spec, h.dtype, DEVICE, "o and final_state")
    got = {}
    for split in (0, 1):
        monkeypatch.setattr(kda_chunk, "BLOCKS", replace(kda_chunk.BLOCKS, DH_SPLIT=split))
        got[split] = autograd_grads(lambda x: DEFAULT.call(x, scale=spec.scale), t, do, dht)
        if split:
            expect_gradients(h, "DH_SPLIT 1", spec)
    assert any(not torch.equal(got[0][n], got[1][n]) for n in got[0]), "DH_SPLIT 1 gave the default's gradients"


def test_sanitizer_cases_arguments(monkeypatch):
    """kernels.sanitizer_cases takes the device, `sweep` and block choices in any order, and
    refuses anything else by name (its GPU runs are a compute-sanitizer command line)."""
    from kdaverify.kernels import kda_chunk, sanitizer_cases

    calls = []
    monkeypatch.setattr(sanitizer_cases, "run", lambda device: calls.append(("cases", device)))
    monkeypatch.setattr(sanitizer_cases, "run_sweep_shape", lambda device: calls.append(("sweep", device)))
    monkeypatch.setattr(kda_chunk, "BLOCKS", kda_chunk.BLOCKS)  # restored after the test
    sanitizer_cases.main(["DH_SPLIT=0", "sweep", "cpu"])
    assert calls == [("sweep", "cpu")] and kda_chunk.BLOCKS.DH_SPLIT == 0
    sanitizer_cases.main([])
    assert calls[-1] == ("cases", "cuda")
    with pytest.raises(SystemExit, match="cuda, cpu, sweep"):
        sanitizer_cases.main(["bogus"])
    with pytest.raises(SystemExit, match="expected one value"):
        sanitizer_cases.main(["DH_SPLIT=0,1"])


def test_sanitizer_sweep_shape_runs_small():
    """sanitizer_cases.run_sweep_shape's call (no state in or out, one sequence, fwd+bwd) runs
    at a small size here, so the GPU's memcheck command cannot fail on the script itself."""
    from kdaverify.kernels import sanitizer_cases

    sanitizer_cases.run_sweep_shape(DEVICE, T=70, H=2, K=20)


@pytest.mark.parametrize("gate", ["mild", "safe"])
def test_cumsum_rows_gate_in_kernel(gate, monkeypatch):
    """The gate cumsum row by row (ChunkBlocks.CUMSUM_ROWS, the GPU default) with the gate
    computed in the kernel, both forms (safe: lower_bound sigmoid): o and the final state
    bitwise those of the tile scan under the interpreter, and the oracle's."""
    from dataclasses import replace

    from kdaverify.equivalence.relations import gate_inputs
    from kdaverify.kernels import kda_chunk
    from kdaverify.kernels.runtime import INTERPRET

    h = Harness(DEFAULT, torch.float32)
    spec = CaseSpec(T=70, K=20, V=16, G=2, h0=True, seqlens=(50, 20), gate=gate, seed=61)
    t, A_log, dt_bias, lower_bound = gate_inputs(h, spec)
    dev = h.impl.device
    extra = dict(use_gate_in_kernel=True, A_log=A_log.to(dev), dt_bias=dt_bias.to(dev), lower_bound=lower_bound)
    got = {}
    for rows in (0, 32):
        monkeypatch.setattr(kda_chunk, "BLOCKS", replace(kda_chunk.BLOCKS, CUMSUM_ROWS=rows))
        got[rows] = DEFAULT.call(t, scale=spec.scale, **extra)
    gate_in_kernel(h, spec)  # CUMSUM_ROWS 32 against the oracle
    if INTERPRET:
        for a, b, what in zip(got[0], got[32], ("o", "final_state"), strict=True):
            assert torch.equal(a, b), f"{what}: the cumsum by rows differs from the tile scan"
