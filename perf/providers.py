"""The implementations a sweep times, behind one adapter mechanism.

A Provider names a callable (loaded lazily: an optional dependency that is missing, or a
kernel not written yet, makes the provider *unavailable* with the reason, never a crash),
the op it computes (perf.models.OPS), the modes it runs, the devices it is meaningful on,
and the matmul precision class the verification holds it to. `Case` is one row's
configuration, `inputs` builds its tensors and `runner` returns the zero-argument call the
timer repeats.

Shapes (DESIGN.md section 3): q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, K];
beta [B, T, HV]; decode: B = N sequences of T = 1 token with a float32 state [N, HV, K, V].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .models import Shape, Sizes

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class Case(Sizes):
    """One row of a sweep: which op, by whom, in which mode, at which sizes and dtype:
    Case(B, T, H, HV, K, V, op=..., provider=..., mode=..., dtype=...)."""

    op: str
    provider: str
    mode: str
    dtype: str

    @property
    def shape(self) -> Shape:
        return Shape(self.B, self.T, self.H, self.HV, self.K, self.V, DTYPES[self.dtype].itemsize)

    @property
    def id(self) -> str:
        sizes = f"B{self.B}-T{self.T}-H{self.H}-HV{self.HV}-K{self.K}-V{self.V}"
        return f"{self.op}-{self.provider}-{self.mode}-{sizes}-{self.dtype}"

    def as_dict(self) -> dict:
        """The row's key fields, in the report's column order."""
        d = asdict(self)
        return {n: d[n] for n in ("op", "provider", "mode", "B", "T", "H", "HV", "K", "V", "dtype")}


class Unavailable(Exception):
    """A provider that cannot run here; the message is the reason shown in the report."""


@dataclass(frozen=True)
class Provider:
    name: str
    op: str
    modes: tuple[str, ...]
    load: Callable[[], Callable]  # may raise ImportError / NotImplementedError
    precision: str = "ieee"  # matmul precision class for float32 inputs (Capabilities.precision)
    triton: bool = False  # runs Triton kernels: under the CPU interpreter its timings mean nothing
    devices: tuple[str, ...] = ("cuda", "cpu")
    note: str = ""
    default: bool = True  # in a sweep that names no providers; False: only when named (--providers)
    state_layout: str = "KV"  # the layout its states take and come in (Capabilities.state_layout)

    def native(self, t: dict) -> dict:
        """The inputs with the initial state in this provider's layout, made before timing:
        the timed call gets the state as its kernel takes it (a serving engine keeps its pool
        in that layout), not a transpose per call."""
        h0 = t.get("initial_state")
        if self.state_layout == "KV" or h0 is None:
            return t
        return {**t, "initial_state": h0.transpose(-1, -2).contiguous()}

    def in_kv(self, fn):
        """fn taking and returning states in the suite's "KV" layout, for the check before
        timing: the suite's own adapter mechanism (Implementation.call) does the conversion."""
        if self.state_layout == "KV":
            return fn
        from kdaverify.equivalence.capabilities import Capabilities
        from kdaverify.equivalence.implementation import Implementation

        impl = Implementation(fn, self.name, Capabilities(state_layout=self.state_layout))

        def kv(q, k, v, g, beta, initial_state=None, output_final_state=False):
            t = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, cu_seqlens=None)
            return impl.call(t, output_final_state=output_final_state)

        return kv

    def callable(self):
        """The callable, or Unavailable with the reason."""
        try:
            return self.load()
        except (ImportError, NotImplementedError, AttributeError) as e:
            raise Unavailable(f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- loaders


def _ours(name):
    def load():
        import kdaverify.kernels as kernels

        return getattr(kernels, name)

    return load


def _adapter(name):
    def load():
        from kdaverify.equivalence import adapters

        fn = getattr(adapters, name)
        if name.startswith("fla_"):
            adapters._fla_kda()  # import fla now, with backend dispatch off, so a missing fla is reported here
        return fn

    return load


def _numpy_recurrent():
    from kdaverify.reference import kda_recurrent_np

    def kda_numpy(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        o, S = kda_recurrent_np(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)  # fmt: skip
        return torch.from_numpy(o).to(q.dtype), None if S is None else torch.from_numpy(S).float()

    return kda_numpy


def _dplr_reference():
    from kdaverify.reference import dplr_recurrent

    def dplr_float32(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False):
        args = (x.float() for x in (q, k, v, a, b, gk))
        o, S = dplr_recurrent(*args, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
        return o.to(q.dtype), S

    return dplr_float32


def _public(adapter: str):
    """A public kernel through the matrix's adapter (equivalence/public_kernels.py), or
    ImportError with the reason it cannot run here (its engine's files or kernel language)."""

    def load():
        from kdaverify.equivalence import public_kernels

        fn = getattr(public_kernels, adapter)
        fn.kdaverify_available()  # raises ImportError with the install command
        return fn

    return load


def _public_providers() -> list[Provider]:
    """One provider per matrix entry that has an adapter, named as its matrix row, so that the
    matrix's error and time columns (equivalence/matrix.perf_cells) come from the sweep:
    chunked prefill kernels as chunk_kda (fwd), decode and fused recurrent kernels as
    recurrent_kda (decode). GPU only and only when named (`--providers`): their engines'
    files are optional. The initial state is handed over in the declared layout (most are
    "VK") before timing (Provider.native); the timing includes what the adapter does around
    the kernel (a decode adapter packs each step's rows and copies the state pool), so a row
    is an upper bound on the kernel's own time; the note says so."""
    from kdaverify.equivalence import public_kernels

    out = []
    for e in public_kernels.MATRIX:
        if e.adapter is None:
            continue
        chunked = "chunk_kda" in e.adapter
        caps = getattr(public_kernels, e.adapter).kdaverify_capabilities
        out.append(Provider(
            e.name, "chunk_kda" if chunked else "recurrent_kda", ("fwd",) if chunked else ("decode",),
            _public(e.adapter), precision=caps.precision, triton=e.needs in ("triton", "helion"), devices=("cuda",),
            state_layout=caps.state_layout,
            note=f"{e.what}, {e.engine}, through kdaverify's adapter (its work around the kernel timed too)",
            default=False,
        ))  # fmt: skip
    return out


def _flashkda():
    import flash_kda  # noqa: F401  (FlashKDA, where it installs)

    raise NotImplementedError("FlashKDA imports, but kdaverify has no adapter for its calling convention yet")


def _sdpa():
    import torch.nn.functional as F

    def causal_sdpa(q, k, v):
        """q, k [B, T, H, D], v [B, T, H, V] -> o [B, T, H, V]."""
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2)

    return causal_sdpa


PROVIDERS = [
    Provider("ours", "chunk_kda", ("fwd", "fwdbwd"), _ours("chunk_kda"), precision="tf32", triton=True),
    Provider("ours", "recurrent_kda", ("decode",), _ours("fused_recurrent_kda"), triton=True),
    Provider("ours", "chunk_dplr", ("fwd",), _ours("fused_recurrent_dplr_delta_rule"), triton=True,
             note="fused_recurrent_dplr_delta_rule: token by token, full fp32 products (no chunked DPLR kernel yet)"),
    Provider("fla", "chunk_kda", ("fwd", "fwdbwd"), _adapter("fla_chunk_kda"), precision="tf32", triton=True,
             devices=("cuda",)),
    Provider("fla", "recurrent_kda", ("decode",), _adapter("fla_fused_recurrent_kda"), triton=True,
             devices=("cuda",)),
    Provider("fla", "chunk_dplr", ("fwd",), _adapter("fla_chunk_dplr_delta_rule"), precision="tf32", triton=True,
             devices=("cuda",)),
    Provider("flashkda", "chunk_kda", ("fwd",), _flashkda, devices=("cuda",)),
    Provider("sdpa", "attention", ("fwd", "fwdbwd"), _sdpa),
    # the oracle tiers: what the CPU sweep times (their cost growing with T)
    Provider("reference-chunkwise", "chunk_kda", ("fwd",), _adapter("reference_chunk_kda"), devices=("cpu",),
             note="kda_chunkwise in float32"),
    Provider("reference-recurrent", "recurrent_kda", ("fwd", "fwdbwd", "decode"), _adapter("reference_recurrent_kda"),
             devices=("cpu",), note="kda_recurrent (PyTorch) in float32"),
    Provider("reference-numpy", "recurrent_kda", ("fwd",), _numpy_recurrent, devices=("cpu",),
             note="kda_recurrent_np in float64 (the gold)"),
    Provider("reference-dplr", "chunk_dplr", ("fwd",), _dplr_reference, devices=("cpu",),
             note="dplr_recurrent (PyTorch) in float32"),
]  # fmt: skip
PROVIDERS += _public_providers()


def find(name: str, op: str) -> Provider:
    for p in PROVIDERS:
        if p.name == name and p.op == op:
            return p
    raise ValueError(f"provider: expected one of {sorted({(p.name, p.op) for p in PROVIDERS})}, got {(name, op)}")


# ---------------------------------------------------------------- inputs and calls


def inputs(case: Case, device: str, seed: int = 0) -> dict:
    """The tensors of one case, in its dtype on device: unit-norm q and k (as models feed
    KDA), v ~ N(0, 1), g = logsigmoid(N(0, 1)) / 16 and beta = sigmoid(N(0, 1)) (the gates of
    DESIGN.md section 7). Decode adds initial_state [N, HV, K, V] float32 ~ N(0, 1) / sqrt(K).
    chunk_dplr gets KDA written as DPLR (reference.kda_as_dplr): a, b, gk [B, T, HV, K] and
    beta folded into v. attention gets q, k, v only."""
    from kdaverify.reference import kda_as_dplr, l2norm

    gen = torch.Generator().manual_seed(seed)
    B, T, H, HV, K, V = case.B, case.T, case.H, case.HV, case.K, case.V

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = l2norm(randn(B, T, H, K)), l2norm(randn(B, T, H, K))
    v = randn(B, T, HV, V)
    g = torch.nn.functional.logsigmoid(randn(B, T, HV, K)) / 16
    beta = torch.sigmoid(randn(B, T, HV))
    if case.op == "attention":
        t = dict(q=q, k=k, v=v)
    elif case.op == "chunk_dplr":
        t = kda_as_dplr(q, k, v, g, beta)
    else:
        t = dict(q=q, k=k, v=v, g=g, beta=beta)
    dtype = DTYPES[case.dtype]
    t = {n: x.to(device, dtype).contiguous() for n, x in t.items()}
    if case.mode == "decode":
        t["initial_state"] = (randn(B, HV, K, V) / K**0.5).to(device)
    return t


def forward(fn, op: str, t: dict, output_final_state: bool = False):
    """One forward call on prepared tensors: (o, final_state or None)."""
    if op == "attention":
        return fn(t["q"], t["k"], t["v"]), None
    h0 = t.get("initial_state")
    if op == "chunk_dplr":
        names = ("q", "k", "v", "a", "b", "gk")
    else:
        names = ("q", "k", "v", "g", "beta")
    return fn(*(t[n] for n in names), initial_state=h0, output_final_state=output_final_state or h0 is not None)


def runner(fn, case: Case, t: dict):
    """The zero-argument call the timer repeats, and the output of one call of it (o, state).

    fwd and decode: one forward. fwdbwd: a forward and o.backward(do) with every input
    requiring grad (gradients are reset each call, never accumulated); a provider whose
    output does not require grad has no backward and is Unavailable."""
    if case.mode != "fwdbwd":
        return (lambda: forward(fn, case.op, t)), forward(fn, case.op, t)
    leaves = {n: x.detach().requires_grad_(x.is_floating_point()) for n, x in t.items()}
    o, S = forward(fn, case.op, leaves)
    if not o.requires_grad:
        raise Unavailable("no backward: its output does not require grad")
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.device, o.dtype)

    def step():
        for x in leaves.values():
            x.grad = None
        out, _ = forward(fn, case.op, leaves)
        out.backward(do)
        return out

    return step, (o.detach(), S)
