"""Adapters for the public KDA kernels of serving engines (issue 11), behind the one adapter
mechanism of implementation.py: each is a callable with the chunk_kda contract carrying its
`kdaverify_capabilities` and a `kdaverify_available` check that names the install command.

    kdaverify verify kdaverify.equivalence.public_kernels:sglang_chunk_kda --device=cuda

The engines' packages are not imported whole: shim.py loads the kernel files (SGLang
0.5.23, vLLM 0.33.0) from the installed package or from the wheel named by
KDAVERIFY_SGLANG / KDAVERIFY_VLLM. MATRIX lists every public implementation the matrix
reports on, with the reason for those that have no adapter.

How the engines' calling conventions are met (each adapter says which apply):
- state pools: the engines keep states in a pool [slots, HV, V, K] indexed per sequence
  and updated in place. The adapter builds a pool from the initial state (zeros without
  one), indexes it with 0..N-1 (vLLM's recurrent kernel: 1..N, its slot 0 being the null
  block) and returns it as the final state. The layout is VK, which
  the declaration states (Implementation transposes; nothing is guessed).
- outputs written into an input: the chunked forwards write o into v's buffer; the
  adapter hands them a copy of v (the contract's inputs are not to be mutated).
- decode kernels take the raw gate projection and the beta logit (the gate and the
  sigmoid are fused in the kernel). The contract's g and beta are mapped exactly onto
  them: with A_log = 0 and dt_bias = 0 the kernel computes g = -softplus(a), so
  a = log(expm1(-g)) (a = -g past the kernels' softplus threshold of 20, where they use
  x itself), and b = logit(beta), both in float64 and passed in float32, so the adapter
  adds at most a float32 rounding of a and b. beta above 1 has no logit: those kernels
  declare max_beta = 1. A decode kernel that takes one token per call runs token by token
  from the state, all active sequences of the batch in one call per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import shim
from .capabilities import GPU_HEAD_SIZES, Capabilities

SOFTPLUS_THRESHOLD = 20.0  # the kernels' softplus switches to x above it (softplus_threshold=20.0)


# ---------------------------------------------------------------- loading


def _sglang_stubs() -> dict[str, dict]:
    """The engine helpers SGLang's Triton KDA files import, written here from what each
    returns on the platform at hand (CUDA or the CPU under Triton's interpreter)."""
    import torch
    from packaging import version

    def cuda() -> bool:
        return torch.cuda.is_available() and torch.version.hip is None

    def sm() -> int:
        major, minor = torch.cuda.get_device_capability() if cuda() else (0, 0)
        return 10 * major + minor

    class Arch:  # what get_jit_cuda_arch() answers: the device's compute capability
        def __init__(self):
            self.major, self.minor = divmod(sm(), 10)

    false = lambda *a, **k: False  # noqa: E731  (platforms the adapters never run on: NPU, ROCm, XPU)
    return {
        "sglang.srt.utils.common": {"torch_release": version.parse(torch.__version__).release},
        "sglang.srt.utils": {
            "cdiv": lambda a, b: -(a // -b),
            "next_power_of_2": lambda n: 1 if n < 1 else 1 << (n - 1).bit_length(),
            "is_cpu": lambda: not torch.cuda.is_available(),
            "is_cuda": cuda,
            "is_npu": false,
            "is_hip": false,
            "is_xpu": false,
            "is_gfx95_supported": false,
            "cpu_has_amx_support": false,
            "get_device_sm": sm,
            "is_sm90_supported": lambda: cuda() and sm() >= 90,
        },
        # programmatic dependent launch on sm90+, as SGLang decides it; the kernels'
        # numerics do not depend on it (it only overlaps launches)
        "sglang.kernels.jit.utils": {"is_arch_support_pdl": lambda: cuda() and sm() >= 90, "get_jit_cuda_arch": Arch},
    }


def _vllm_stubs() -> dict[str, dict]:
    """The vLLM helpers its FLA-derived KDA files import, written here."""
    import contextlib
    import types

    import torch
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice

    def cuda() -> bool:
        return torch.cuda.is_available() and torch.version.hip is None

    def family(major: int, device_id=None) -> bool:
        return cuda() and torch.cuda.get_device_capability(device_id)[0] * 10 == major

    platform = types.SimpleNamespace(
        is_cuda=cuda, is_cuda_alike=cuda, is_rocm=lambda: False, is_xpu=lambda: False,
        is_device_capability_family=family,
    )  # fmt: skip

    def _to_device(data, dtype, device, pin_memory=False):  # data: a list or a host tensor
        return torch.as_tensor(data, dtype=dtype).to(device)

    class CustomOp(torch.nn.Module):  # only the module classes beside the kernels use it
        @classmethod
        def register(cls, name):
            return lambda c: c

    return {
        "vllm.triton_utils": {"triton": triton, "tl": tl, "tldevice": tldevice},
        "vllm.platforms": {"current_platform": platform},
        "vllm.model_executor.custom_op": {"CustomOp": CustomOp},
        "vllm.utils.gpu_sync_debug": {"gpu_sync_allowed": contextlib.nullcontext},
        "vllm.utils.torch_utils": {
            "async_tensor_h2d": _to_device,
        },
        "vllm.utils.platform_utils": {
            "num_compute_units": lambda device_id=0: (
                torch.cuda.get_device_properties(device_id).multi_processor_count if cuda() else 1
            )
        },
    }


# SGLang packages whose __init__.py runs (shim.load's run_init): constants only, imported by
# the kernel files beside them
_SGLANG_INITS = ("sglang.kernels.ops.attention.helion",)


def sglang_module(name: str):
    """sglang.kernels.ops.attention.<name>, loaded by the shim."""
    return _load(shim.SGLANG, f"sglang.kernels.ops.attention.{name}", _sglang_stubs, _SGLANG_INITS)


def vllm_module(name: str):
    """vllm.third_party.flash_linear_attention.ops.<name>, loaded by the shim (vllm.utils.math_utils
    is a small file of its own and is loaded as it is)."""
    return _load(shim.VLLM, f"vllm.third_party.flash_linear_attention.ops.{name}", _vllm_stubs)


def _load(source: shim.Source, module: str, stubs, run_init: tuple[str, ...] = ()):
    from kdaverify.kernels.runtime import INTERPRET  # switches Triton's interpreter on without a GPU

    mod = shim.load(source, module, stubs(), run_init)
    if INTERPRET:
        _interpreter_aliases(source.package)
    return mod


def _interpreter_aliases(package: str) -> None:
    """Under Triton's interpreter only: the FLA-derived files bind Triton's math functions to
    module names (exp = tl.exp, in fla/op.py) and call them from kernels; the interpreter
    patches tl's own attributes, not such aliases, and then refuses the call ("Did you
    forget to add @triton.jit?"). Each alias is rebound to a jitted function that calls the
    same tl function, so the arithmetic is unchanged. An autotuned kernel keeps only its first
    configuration (the interpreter has no timer; block sizes change the order of sums, not
    the math). The input guard's CUDA device context
    (custom_device_ctx) becomes a no-op: there is no device to select. In the modules of
    LOOP_INDEX_CASTS, range yields loop indices that take .to() (_LoopIndex). Compiled kernels
    on a GPU are not touched."""
    import contextlib
    import sys

    import triton.language as tl
    from triton.runtime.autotuner import Autotuner

    from . import interpreter_math as m

    pairs = ((tl.exp, m.exp), (tl.math.exp2, m.exp2), (tl.exp2, m.exp2), (tl.log, m.log), (tl.log2, m.log2))
    wrappers = {id(f): w for f, w in pairs}
    for name, mod in list(sys.modules.items()):
        if name.startswith(package + ".") and mod is not None:
            for attr, value in list(vars(mod).items()):
                if id(value) in wrappers and not attr.startswith("__"):
                    setattr(mod, attr, wrappers[id(value)])
                for layer in _kernel_layers(value):  # nothing to time on a CPU
                    if isinstance(layer, Autotuner) and len(layer.configs) > 1:
                        layer.configs = layer.configs[:1]
            if hasattr(mod, "custom_device_ctx"):  # the device guard has no CPU form (torch.cpu.device)
                mod.custom_device_ctx = lambda index: contextlib.nullcontext()
            if name in LOOP_INDEX_CASTS:
                mod.range = _interpreted_range


# Under the interpreter only. vLLM's chunk_delta_h casts its chunk loop's index (for i_t in
# range(NT): ... i_t.to(tl.int64), lines 144 to 184): compiled, i_t is a Triton integer; the
# interpreter runs the loop in Python, i_t is a plain int and the call raised "'int' object has
# no attribute 'to'", so vllm_chunk_kda could not run on a CPU at all. Only this module's
# kernel loop uses range (its host code does not), so rebinding range there touches nothing else.
LOOP_INDEX_CASTS = ("vllm.third_party.flash_linear_attention.ops.chunk_delta_h",)


class _LoopIndex(int):
    """A loop index of an interpreted kernel: an int whose .to(dtype) is the same int (a Python
    int does not wrap, so widening it to int64 changes nothing)."""

    def to(self, *args, **kwargs):
        return self


def _interpreted_range(*args):
    return map(_LoopIndex, range(*args))


def _requires(source: shim.Source, *modules: str):
    """A kdaverify_available check: the engine's files (shim.available) and the Python
    modules its kernels need beyond torch and Triton, each with its install command. Each module
    is imported, not only found: one that is installed but does not import with this torch (a
    Helion release newer than the torch it finds, on an H200 in the eleventh session) makes the
    implementation unavailable with the import's error, instead of failing every check."""

    def check() -> None:
        import importlib
        import importlib.util

        shim.available(source)
        for module in modules:
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"needs the module {module!r}; install it with: {MODULE_INSTALL[module]}")
            try:
                importlib.import_module(module)
            except Exception as error:
                raise ImportError(f"the module {module!r} is installed but does not import: {error}") from error

    return check


MODULE_INSTALL = {
    "triton": "pip install triton",
    "helion": "pip install 'kdaverify[sglang-helion]'",
    "cutlass": "pip install 'kdaverify[sglang-cutedsl]' (NVIDIA CUTLASS DSL; needs a CUDA GPU to run)",
}


def _kernel_layers(obj):
    """A kernel and the launchers it is wrapped in (heuristics around autotune around jit)."""
    from triton.runtime.jit import KernelInterface

    while isinstance(obj, KernelInterface):
        yield obj
        obj = getattr(obj, "fn", None)


# ---------------------------------------------------------------- helpers


def _sequences(q, cu_seqlens):
    """(N, the first row of each sequence, their lengths) on the CPU, rows of q viewed [B*T]."""
    import torch

    B, T = q.shape[:2]
    if cu_seqlens is None:
        return B, torch.arange(B) * T, torch.full((B,), T)
    cu = cu_seqlens.cpu().long()
    return len(cu) - 1, cu[:-1], cu[1:] - cu[:-1]


def _pool(initial_state, N, HV, V, K, device):
    """The state pool [N, HV, V, K] float32 the kernels update in place: a copy of the (VK)
    initial state, or zeros."""
    import torch

    if initial_state is None:
        return torch.zeros(N, HV, V, K, dtype=torch.float32, device=device)
    return initial_state.to(torch.float32).clone(memory_format=torch.contiguous_format)


def raw_gate(g):
    """a with -softplus(a) == g (A_log = 0, dt_bias = 0), float32: log(expm1(-g)), or -g past
    the kernels' softplus threshold. g = 0 gives -inf (softplus(-inf) = 0) and g = -inf gives
    +inf."""
    import torch

    y = -g.double()
    return torch.where(y > SOFTPLUS_THRESHOLD, y, torch.log(torch.expm1(y))).float()


def beta_logit(beta):
    """b with sigmoid(b) == beta, float32 (beta 0 and 1 give -inf and +inf)."""
    import torch

    if bool((beta > 1).any()) or bool((beta < 0).any()):
        raise ValueError("beta: this kernel takes beta as sigmoid(b), so beta must lie in [0, 1] (max_beta = 1)")
    return torch.logit(beta.double()).float()


def _decode_inputs(g, beta, HV, K, gate_kw):
    """(a, b, A_log, dt_bias, lower_bound) for a kernel with the gate and the beta sigmoid
    fused: the contract's g mapped (raw_gate), or, under use_gate_in_kernel, the suite's raw
    gate with its A_log, dt_bias and lower_bound passed through."""
    import torch

    dev = g.device
    if gate_kw.get("use_gate_in_kernel"):
        a = g.float()
        A_log, dt_bias = gate_kw["A_log"].float().contiguous(), gate_kw["dt_bias"].float().reshape(-1).contiguous()
        lower_bound = gate_kw.get("lower_bound")
    else:
        a = raw_gate(g)
        A_log = torch.zeros(HV, dtype=torch.float32, device=dev)
        dt_bias = torch.zeros(HV * K, dtype=torch.float32, device=dev)
        lower_bound = None
    return a, beta_logit(beta), A_log, dt_bias, lower_bound


def token_by_token(step, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens):
    """Run a one-token decode kernel over whole sequences: at step t every sequence longer
    than t advances one token, in one call. step(rows, pool, slots) -> o rows [n, HV, V]
    takes the rows of q, k, v, g, beta (flattened [B*T, ...]) to run, the state pool
    [N, HV, V, K] (updated in place) and the int32 slot of each row's sequence."""
    import torch

    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    N, starts, lens = _sequences(q, cu_seqlens)
    pool = _pool(initial_state, N, HV, V, K, q.device)
    o = torch.zeros(B * T, HV, V, dtype=q.dtype, device=q.device)
    for t in range(int(lens.max()) if N else 0):
        active = torch.nonzero(lens > t).flatten()
        rows = (starts[active] + t).to(q.device)
        o[rows] = step(rows, pool, active.to(q.device, torch.int32)).reshape(-1, HV, V).to(q.dtype)
    return o.reshape(B, T, HV, V), pool if output_final_state else None


def _packed_qkv(q, k, v, rows):
    """The packed projection [n, 2*H*K + HV*V] the packed decode kernels read."""
    import torch

    flat = (x.reshape(-1, *x.shape[2:])[rows] for x in (q, k, v))
    return torch.cat([x.reshape(len(rows), -1) for x in flat], dim=1).contiguous()


def _flat(x, rows):
    return x.reshape(-1, *x.shape[2:])[rows]


# ---------------------------------------------------------------- SGLang, Triton


def sglang_chunk_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
):  # fmt: skip
    """SGLang's Triton chunk_kda (sglang.kernels.ops.attention.fla.kda), the prefill of its
    Triton KDA backend: state pool updated in place, o written into v's buffer."""
    gate = dict(A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound) if use_gate_in_kernel else {}
    fn = sglang_module("fla.kda").chunk_kda
    return _sglang_prefill(fn, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                           use_qk_l2norm_in_kernel, gate)  # fmt: skip


def _sglang_prefill(fn, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, l2norm, gate):
    """Call one of SGLang's chunk_kda prefills (Triton or Helion, one signature): the state
    is a pool updated in place, slot n for sequence n, and o is written into v's buffer, so
    the kernel gets a copy of v."""
    import torch

    N, _, _ = _sequences(q, cu_seqlens)
    pool = _pool(initial_state, N, v.shape[2], v.shape[3], k.shape[3], q.device)
    o = fn(
        q, k, v.clone(memory_format=torch.contiguous_format), g, beta, scale=scale, initial_state=pool,
        initial_state_indices=torch.arange(N, dtype=torch.int32, device=q.device),
        use_qk_l2norm_in_kernel=l2norm, cu_seqlens=cu_seqlens, **gate,
    )  # fmt: skip
    return o, pool if output_final_state else None


def sglang_fused_recurrent_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False,
):  # fmt: skip
    """SGLang's Triton fused_recurrent_kda (sglang.kernels.ops.attention.fla.kda). Its own
    default is use_qk_l2norm_in_kernel=True; the contract's default, False, is passed."""
    kda = sglang_module("fla.kda")
    N, _, _ = _sequences(q, cu_seqlens)
    pool = _pool(initial_state, N, v.shape[2], v.shape[3], k.shape[3], q.device)
    o, final = kda.fused_recurrent_kda(
        q, k, v, g, beta, scale=scale, initial_state=pool, inplace_final_state=False,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    return o, final if output_final_state else None


def sglang_sigmoid_gating_decode(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
):  # fmt: skip
    """SGLang's Triton fused_sigmoid_gating_delta_rule_update with is_kda=True (the decode()
    and target_verify() of its Triton KDA backend): gate and beta sigmoid fused, state pool
    updated in place. It loops over the tokens of each sequence itself (target_verify runs it
    on several tokens), so the whole sequence is passed in one call."""
    mod = sglang_module("linear.fused_sigmoid_gating_recurrent")
    HV, V, K = v.shape[2], v.shape[3], k.shape[3]
    N, _, _ = _sequences(q, cu_seqlens)
    gate_kw = dict(use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)
    a, b, A_log, dt_bias, lower_bound = _decode_inputs(g, beta, HV, K, gate_kw)
    pool = _pool(initial_state, N, HV, V, K, q.device)
    import torch

    o = mod.fused_sigmoid_gating_delta_rule_update(
        A_log=A_log, a=a, dt_bias=dt_bias, softplus_beta=1.0, softplus_threshold=SOFTPLUS_THRESHOLD,
        q=q, k=k, v=v, b=b, initial_state_source=pool,
        initial_state_indices=torch.arange(N, dtype=torch.int32, device=q.device), scale=scale,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens, is_kda=True, lower_bound=lower_bound,
    )  # fmt: skip
    return o.reshape(v.shape).to(q.dtype), pool if output_final_state else None


def _packed_decode(kernel_of):
    """An adapter for SGLang's packed one-token decode contract (mixed_qkv [n, 2HK + HV V],
    a [n, HV K], b [n, HV], pool [slots, HV, V, K], out [n, 1, HV, V]), run token by token."""

    def adapter(
        q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
        use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
    ):  # fmt: skip
        import torch

        kernel = kernel_of()
        HV, V, K = v.shape[2], v.shape[3], k.shape[3]
        gate_kw = dict(use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)
        a, b, A_log, dt_bias, lower_bound = _decode_inputs(g, beta, HV, K, gate_kw)
        scale = K**-0.5 if scale is None else scale

        def step(rows, pool, slots):
            out = torch.empty(len(rows), 1, HV, V, dtype=q.dtype, device=q.device)
            kernel(
                mixed_qkv=_packed_qkv(q, k, v, rows), a=_flat(a, rows).reshape(len(rows), -1).contiguous(),
                b=_flat(b, rows).contiguous(), A_log=A_log, dt_bias=dt_bias, scale=scale, initial_state=pool,
                out=out, ssm_state_indices=slots, use_qk_l2norm_in_kernel=False, lower_bound=lower_bound,
            )  # fmt: skip
            return out

        return token_by_token(step, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens)

    return adapter


sglang_packed_decode = _packed_decode(lambda: sglang_module("fla.fused_recurrent").fused_recurrent_kda_packed_decode)
sglang_packed_decode.__name__ = sglang_packed_decode.__qualname__ = "sglang_packed_decode"
sglang_packed_decode.__doc__ = (
    "SGLang's Triton fused_recurrent_kda_packed_decode (the packed_decode() fast path of its "
    "Triton KDA backend), one token per call, run token by token."
)

# ---------------------------------------------------------------- SGLang, Helion and CuTe DSL

sglang_helion_packed_decode = _packed_decode(
    lambda: sglang_module("helion.kda_decode").helion_fused_recurrent_kda_packed_decode
)
sglang_helion_packed_decode.__name__ = sglang_helion_packed_decode.__qualname__ = "sglang_helion_packed_decode"
sglang_helion_packed_decode.__doc__ = "SGLang's Helion packed KDA decode, one token per call, run token by token."


def sglang_helion_chunk_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
):  # fmt: skip
    """SGLang's Helion chunk_kda (sglang.kernels.ops.attention.helion.kda_prefill), the same
    public contract as its Triton chunk_kda (one-token inputs go to the Triton kernel)."""
    gate = dict(A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound) if use_gate_in_kernel else {}
    fn = sglang_module("helion.kda_prefill").chunk_kda
    return _sglang_prefill(fn, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                           use_qk_l2norm_in_kernel, gate)  # fmt: skip


def sglang_cutedsl_decode(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False,
):  # fmt: skip
    """SGLang's CuTe DSL KDA decode (cutedsl_fused_sigmoid_gating_kda_update), one token
    per sequence per call in its dense form (q [n, 1, H, K]), run token by token."""
    mod = sglang_module("cutedsl_kda")
    HV, K = v.shape[2], k.shape[3]
    a, b, A_log, dt_bias, _ = _decode_inputs(g, beta, HV, K, {})
    scale = K**-0.5 if scale is None else scale

    def step(rows, pool, slots):
        def one(x):
            return _flat(x, rows).unsqueeze(1).contiguous()

        return mod.cutedsl_fused_sigmoid_gating_kda_update(
            A_log=A_log, dt_bias=dt_bias, q=one(q), k=one(k), v=one(v), a=one(a), b=one(b),
            initial_state_source=pool, initial_state_indices=slots, scale=scale,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )  # fmt: skip

    return token_by_token(step, q, k, v, g, beta, initial_state, output_final_state, cu_seqlens)


# ---------------------------------------------------------------- vLLM


def vllm_chunk_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
):  # fmt: skip
    """vLLM's chunk_kda (vllm.third_party.flash_linear_attention.ops.kda), or with the gate
    in the kernel its chunk_kda_with_fused_gate. It needs an initial state (the adapter
    passes zeros without one) and writes o into v's buffer (the adapter passes a copy)."""
    import torch

    kda = vllm_module("kda")
    N, _, _ = _sequences(q, cu_seqlens)
    h0 = _pool(initial_state, N, v.shape[2], v.shape[3], k.shape[3], q.device)
    common = dict(scale=scale, initial_state=h0, output_final_state=output_final_state,
                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens)  # fmt: skip
    v = v.clone(memory_format=torch.contiguous_format)
    if use_gate_in_kernel:
        bias = None if dt_bias is None else dt_bias.reshape(v.shape[2], -1)
        o, final = kda.chunk_kda_with_fused_gate(q, k, v, g, beta, A_log, bias, lower_bound=lower_bound, **common)
    else:
        o, final = kda.chunk_kda(q, k, v, g, beta, **common)
    return o, final if output_final_state else None


def vllm_fused_recurrent_kda(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False,
):  # fmt: skip
    """vLLM's fused_recurrent_kda, as vLLM calls it: the state pool updated in place through
    ssm_state_indices. Its kernel (fused_recurrent.py, continuous batching with the final
    state in place) fixes three things about the call:
    - slot 0 is vLLM's null block: a sequence whose slot is 0 (or below) is skipped, its state
      neither read nor written and its o never stored. Sequence n takes slot n + 1 of a pool
      with one spare slot in front, which is never returned.
    - the slot of token t is read at the index row's start plus t, whatever token stride the
      index tensor has (the stride is passed but not used). The index is therefore a
      contiguous [N, L] table, L the longest sequence, the sequence's slot in every column;
      with more than one token per sequence, an expanded (stride 0) or one-dimensional index
      makes it read other sequences' slots and then past the index.
    - o is allocated like k ([B, T, H, K]) and written as [B, T, HV, V]: where (HV, V) is not
      (H, K) the call is refused here (see VLLM_O_LIKE_K)."""
    import torch

    kda = vllm_module("kda")
    H, K = k.shape[2:]
    HV, V = v.shape[2:]
    if (HV, V) != (H, K):
        raise ValueError(VLLM_O_LIKE_K.format(H=H, K=K, HV=HV, V=V))
    N, _, lens = _sequences(q, cu_seqlens)
    pool = torch.zeros(N + 1, HV, V, K, dtype=torch.float32, device=q.device)
    pool[1:] = _pool(initial_state, N, HV, V, K, q.device)
    width = max(int(lens.max()) if N else 0, 1)
    slots = torch.arange(1, N + 1, dtype=torch.int32, device=q.device)[:, None].repeat(1, width)
    o, _ = kda.fused_recurrent_kda(
        q, k, v, g, beta, scale=scale, initial_state=pool, inplace_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens, ssm_state_indices=slots,
    )  # fmt: skip
    return o, pool[1:] if output_final_state else None


VLLM_O_LIKE_K = (
    "vLLM's fused_recurrent_kda allocates o like k ([B, T, H, K], here H={H}, K={K}) and writes it as "
    "[B, T, HV, V] (HV={HV}, V={V}): it would write past o or return o in k's shape, so this call is refused "
    "(finding reports/findings/001-vllm-fused_recurrent_kda-gva.md)"
)


# ---------------------------------------------------------------- declarations
#
# Read from each implementation (file names inside the package):
# - precision: a Triton tl.dot on float32 operands at the default input precision is TF32
#   with truncated operands ("tf32"); a kernel with no dot products (fp32 FMAs) is "ieee";
#   Helion's prefill casts its dot operands to bfloat16 explicitly ("bf16").
# - head sizes: the GPU sizes of issue 10 (16..256, GPU_HEAD_SIZES) where a kernel masks by
#   K and V up to 256 (chunk_delta_h asserts K <= 256; the recurrent kernels take one
#   next_power_of_2(K) block); narrower where a kernel says so.
# - GVA: only where q/k and g are indexed by their own head counts.

_SGLANG_CHUNK = Capabilities(
    # fla/kda.py chunk_kda: tl.dot at default precision (tf32); state pool [slots, HV, V, K]
    # (chunk_delta_h make_block_ptr (V, K)); one head count H taken from q for v and g too
    # (chunk_gla_fwd_o_gk's grid is B * H), so no GVA; cu_seqlens; fused gate
    # (kda_gate_chunk_cumsum: -exp(A_log) softplus(z + dt_bias) or the safe form) and q/k L2 norm
    precision="tf32", state_layout="VK", head_sizes=GPU_HEAD_SIZES, gva=False,
    gate_in_kernel=True, l2norm_in_kernel=True,
)  # fmt: skip
_SGLANG_RECURRENT = Capabilities(
    # fla/fused_recurrent.py fused_recurrent_gated_delta_rule_fwd_kernel with IS_KDA: fp32
    # FMAs, no dots (ieee); [BV, BK] state tile, pool [N, HV, V, K]; in KDA mode it reads g
    # at the query head (g + (bos * H + i_h) * K), i.e. g [B, T, H, K]: GVA with a per value
    # head gate is not what it computes, so gva is not declared; no fused gate (g is taken
    # as is); q/k L2 norm in kernel
    precision="ieee", state_layout="VK", head_sizes=GPU_HEAD_SIZES, gva=False, l2norm_in_kernel=True,
)  # fmt: skip
_SGLANG_DECODE = dict(
    # linear/fused_sigmoid_gating_recurrent.py (is_kda): fp32 FMAs (ieee); state [K, V] tile
    # read from a VK pool (o_v * K + o_k); q/k at i_hv // (HV // H) and a, dt_bias at i_hv:
    # GVA; beta = sigmoid(b) so beta <= 1; gate always fused (mapped exactly, see the module
    # docstring), safe form through lower_bound; q/k L2 norm in kernel
    precision="ieee", state_layout="VK", head_sizes=GPU_HEAD_SIZES, max_beta=1.0, gate_in_kernel=True,
)  # fmt: skip
# float32 stays declared up to K = 256 (chunk_kda checks no dtype; chunk_delta_h.py asserts only
# K <= 256), although at K = V = 256 the one fixed launch configuration of its state kernel needs
# more shared memory than an H200 has and the call raises OutOfResources (finding
# reports/findings/007-sglang-triton-chunk_kda-fp32_k256_shared_memory.md)
sglang_chunk_kda.kdaverify_capabilities = _SGLANG_CHUNK
sglang_fused_recurrent_kda.kdaverify_capabilities = _SGLANG_RECURRENT
# its wrapper (fused_sigmoid_gating_delta_rule_update) asserts scale > 0: a stated restriction
sglang_sigmoid_gating_decode.kdaverify_capabilities = Capabilities(
    l2norm_in_kernel=True, scale_zero=False, **_SGLANG_DECODE
)
# fla/fused_recurrent.py fused_recurrent_kda_packed_decode: the same arithmetic one token at a
# time; q, k, v packed ([B, 2 H K + HV V]), so q/k heads equal (H) and HV a multiple of H (GVA).
# With the L2 norm on, SGLang sends covered shapes to its JIT CUDA kernel instead, so the
# Triton row declares no in-kernel L2 norm (the CUDA kernel has a row of its own).
sglang_packed_decode.kdaverify_capabilities = Capabilities(**_SGLANG_DECODE)
# helion/kda_decode.py: the packed decode contract; K and V powers of two (its validation
# raises otherwise); fp32 state arithmetic (ieee); GVA as the Triton kernel
sglang_helion_packed_decode.kdaverify_capabilities = Capabilities(
    **dict(_SGLANG_DECODE, head_sizes=(16, 32, 64, 128, 256))
)
# helion/kda_prefill.py: the Triton chunk_kda's contract; dot operands cast to bfloat16
# (q_off, k_off, k_col_off .to(torch.bfloat16)) and configs written for bf16 inputs: bf16 only
sglang_helion_chunk_kda.kdaverify_capabilities = Capabilities(
    **dict(_SGLANG_CHUNK.declared(), dtypes=("bfloat16",), precision="bf16", backward=False)
)
# cutedsl_kda.py: K == 128 (TILE_K) and V a multiple of 128 (V % 32 and (V / 16) % 8);
# o always bfloat16 (q.new_empty(..., dtype=torch.bfloat16)): bf16 inputs only; the softplus
# gate only (no lower_bound argument), so the fused gate is not declared (the contract's g
# is mapped onto it); beta = sigmoid(b); fp32 state arithmetic in registers (ieee); its
# wrapper asserts scale > 0 (scale_zero=False)
sglang_cutedsl_decode.kdaverify_capabilities = Capabilities(
    dtypes=("bfloat16",), head_sizes=(128,), state_layout="VK", max_beta=1.0, l2norm_in_kernel=True,
    scale_zero=False,
)  # fmt: skip
# vllm .../ops/kda.py chunk_kda: the FLA chunked forward (tf32 dots, K <= 256), one head count
# from q (no GVA), VK state (chunk_delta_h: h0 + i_nh * V * K, [V, K] tiles); fused gate
# through chunk_kda_with_fused_gate (same two gate forms); q/k L2 norm
vllm_chunk_kda.kdaverify_capabilities = Capabilities(**_SGLANG_CHUNK.declared())
# vllm fused_recurrent_kda: IS_KDA reads g at the value head (g + (bos * HV + i_hv) * K), so
# the kernel computes GVA; fp32 FMAs (ieee); VK pool; L2 norm in kernel; no fused gate. Its
# wrapper sizes o by k (ops/kda.py: empty_like(k)), so GVA and V != K are refused by the adapter
# (VLLM_O_LIKE_K): still declared, so they fail in the matrix, loudly rather than past o
# Its kernel loads the gate row without the K mask, so where K is not a power of two the last
# (token, value head) reads past g and can return NaN (finding
# reports/findings/006-vllm-fused_recurrent_kda-unmasked_gate_load.md): those head sizes stay declared
vllm_fused_recurrent_kda.kdaverify_capabilities = Capabilities(**dict(_SGLANG_RECURRENT.declared(), gva=True))

for _fn in (sglang_chunk_kda, sglang_fused_recurrent_kda, sglang_sigmoid_gating_decode, sglang_packed_decode):
    _fn.kdaverify_available = _requires(shim.SGLANG, "triton")
sglang_helion_packed_decode.kdaverify_available = _requires(shim.SGLANG, "triton", "helion")
sglang_helion_chunk_kda.kdaverify_available = _requires(shim.SGLANG, "triton", "helion")
sglang_cutedsl_decode.kdaverify_available = _requires(shim.SGLANG, "cutlass")
vllm_chunk_kda.kdaverify_available = vllm_fused_recurrent_kda.kdaverify_available = _requires(shim.VLLM, "triton")


# ---------------------------------------------------------------- the matrix's rows


@dataclass(frozen=True)
class Entry:
    """One row of the matrix: an implementation, its adapter (None: not adapted, with
    why), the engine it comes from, what it needs beyond this package, and whether it can
    run without a GPU (under Triton's interpreter)."""

    name: str
    engine: str  # "sglang", "vllm", "flashkda"
    what: str
    adapter: str | None = None  # attribute of this module
    needs: str = ""
    cpu: bool = False  # runs under the Triton interpreter
    why_not: str = ""


_JIT = "JIT-compiled CUDA (sglang.kernels.jit: nvcc, apache-tvm-ffi and SGLang's own build helpers)"
MATRIX = [
    Entry("sglang-triton-chunk_kda", "sglang", "Triton chunked prefill (fla/kda.py chunk_kda)",
          "sglang_chunk_kda", "triton", cpu=True),
    Entry("sglang-triton-fused_recurrent_kda", "sglang", "Triton fused recurrent (fla/kda.py fused_recurrent_kda)",
          "sglang_fused_recurrent_kda", "triton", cpu=True),
    Entry("sglang-triton-sigmoid-gating-decode", "sglang",
          "Triton decode and MTP verify (linear/fused_sigmoid_gating_recurrent.py, is_kda)",
          "sglang_sigmoid_gating_decode", "triton", cpu=True),
    Entry("sglang-triton-packed-decode", "sglang", "Triton packed decode (fla/fused_recurrent.py)",
          "sglang_packed_decode", "triton", cpu=True),
    Entry("sglang-helion-chunk_kda", "sglang", "Helion chunked prefill (helion/kda_prefill.py)",
          "sglang_helion_chunk_kda", "helion"),
    Entry("sglang-helion-packed-decode", "sglang", "Helion packed decode (helion/kda_decode.py)",
          "sglang_helion_packed_decode", "helion"),
    Entry("sglang-cutedsl-decode", "sglang", "CuTe DSL decode (cutedsl_kda.py)", "sglang_cutedsl_decode",
          "nvidia-cutlass-dsl"),
    Entry("sglang-cuda-packed-decode", "sglang", "CUDA packed decode (kda_packed_decode.py, kda_packed_decode.cuh)",
          needs=_JIT, why_not="it always L2-normalises q and k (SGLang calls it only with use_qk_l2norm_in_kernel), "
          "so the contract's un-normalised q, k cannot be expressed; the suite has no declaration for an "
          "always-on L2 norm yet"),
    Entry("sglang-cuda-fused-decode", "sglang", "CUDA fused decode (kda_fused_decode.py, csrc kda_fused_decode.cuh)",
          needs=_JIT, why_not="it fuses the short convolution (with its state) and the gated output RMS norm "
          "around the recurrence: its output is not KDA's o"),
    Entry("sglang-cutedsl-mtp-decode", "sglang", "CuTe DSL multi-token (MTP) decode (kda_decode_mtp.py)",
          needs="nvidia-cutlass-dsl", why_not="adapter not written yet: a speculative-decoding verify kernel "
          "(draft tokens, intermediate-state buffers, DSpark layout) that needs its own mapping"),
    Entry("sglang-nvidia-persistent-prefill", "sglang", "CuTe/cuTile persistent prefill (linear/kda_nvidia_prefill)",
          needs="nvidia-cutlass-dsl, cuTile", why_not="Blackwell only (its own notes: sm_100, B200); the machines "
          "of this project are Hopper"),
    Entry("sglang-ptx-prefill", "sglang", "PTX/tcgen05 prefill (linear/kda_ptx_prefill)", needs=_JIT,
          why_not="sm_100a / sm_103a only (tcgen05); not Hopper"),
    Entry("vllm-chunk_kda", "vllm", "Triton chunked prefill (third_party/flash_linear_attention/ops/kda.py)",
          "vllm_chunk_kda", "triton", cpu=True),
    Entry("vllm-fused_recurrent_kda", "vllm", "Triton fused recurrent (third_party/flash_linear_attention/ops/kda.py)",
          "vllm_fused_recurrent_kda", "triton", cpu=True),
    Entry("flashkda", "flashkda", "FlashKDA (MoonshotAI, CUTLASS prefill; also vLLM's _flashkda_C)",
          needs="nvcc: built from source on the GPU machine (GPU-build-only)",
          why_not="its fwd always L2-normalises q and k, applies beta = sigmoid(b) and the safe gate "
          "lower_bound * sigmoid(exp(A_log) (z + dt_bias)) in the kernel (SGLang's FlashKDA backend falls back to "
          "Triton otherwise); the contract's q, k, beta in [0, 2] and gates below -5 cannot be expressed"),
]  # fmt: skip
