"""What an implementation declares it supports, and how that is spelled on a command line.

Torch-free on purpose: the pytest plugin reads this table to register its --kda-* options in
every pytest run of a project that has kdaverify installed, and that must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PRECISIONS = ("ieee", "tf32", "tf32_rn", "bf16")
LAYOUTS = ("KV", "VK")
# the dtype g or beta may have: "input" (q's dtype) or a dtype name
SIDE_DTYPES = ("input", *DTYPE_NAMES)
STATE_DTYPES = ("float32", "bfloat16")
STRIDED = ("yes", "no", "error")
# Head sizes a GPU run draws without a declaration: what models use, and sizes that are not
# powers of two, where a load without its mask reads past K (a block is next_power_of_2(K)).
# Here, torch-free, so declarations (adapters.py, public_kernels.py) can name them cheaply.
GPU_HEAD_SIZES = (16, 32, 48, 64, 80, 96, 100, 128, 192, 256)


@dataclass(frozen=True)
class Capabilities:
    """What an implementation declares.

    dtypes: input dtypes it accepts (o is returned in the input dtype).
    head_sizes: the K and V it supports, or None for any.
    precision: matmul precision class for float32 inputs: "ieee" (full fp32, the default),
        "tf32" (operands truncated to tf32, as Triton's tl.dot does), "tf32_rn" (rounded to
        tf32, as cuBLAS does) or "bf16"; fp32 accumulation in all. 16-bit inputs are always
        held to a bf16-operand reference.
    state_layout: "KV" ([N, HV, K, V], the convention) or "VK" ([N, HV, V, K]); the
        adapter transposes, it never guesses.
    gva: supports HV > H.  varlen: supports cu_seqlens.
    gate_in_kernel: accepts use_gate_in_kernel=True with A_log, dt_bias, lower_bound (g is z).
    l2norm_in_kernel: accepts use_qk_l2norm_in_kernel=True.
    max_T: the longest sequence it is given (None: the suite's own limit).
    g_dtypes, beta_dtypes: the dtypes g and beta may have beside q, k, v: "input" (q's
        dtype) or a dtype name. The default is flash-linear-attention's usual call: 16-bit
        q, k, v with float32 g and beta (and every combination of the two).
    positional: accepts scale, initial_state and output_final_state positionally, in the
        contract's order after beta (as flash-linear-attention's chunk_kda does).
    state_dtype: the precision the state is kept in between tokens and calls: "float32"
        (the contract) or "bfloat16" (then the state-precision check does not apply).
    strided: non-contiguous inputs (views of a fused projection, other layouts, batch
        slices): "yes" it gives the right answer on them (the default: users pass views),
        "error" it refuses them with an error that says so (checked), "no" not tested.
    empty_sequences: accepts zero-length sequences in cu_seqlens (repeated offsets); when
        False, a clear error for them is checked instead.
    backward: its outputs carry autograd (o and final_state are differentiable with respect
        to q, k, v, g, beta and initial_state), so the gradient checks (grad_*) apply.
    max_beta: the largest beta it can be given: 2 (the contract's range [0, 2]), or 1 for
        kernels that take beta as the input of a sigmoid fused in the kernel, where beta > 1
        has no preimage.
    reset_gates: accepts g = -inf, a hard reset of that channel of the state (exp(-inf) = 0;
        what masking code produces). When False the `reset` gate regime is never drawn and
        explicit examples that use it take the `masked` regime (g = -1000) instead: a
        declared restriction, shown in reports, so that the rest of the suite still looks
        past it (flash-linear-attention's chunk_kda returns NaN on it, finding 002).
    scale_zero: accepts scale = 0 (o is then exactly zero). When False, a loud refusal of
        scale = 0 whose message names the scale is checked instead (SGLang's decode wrappers
        assert scale > 0: a documented input restriction, not a wrong answer).
    """

    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    head_sizes: tuple[int, ...] | None = None
    precision: str = "ieee"
    state_layout: str = "KV"
    gva: bool = True
    varlen: bool = True
    gate_in_kernel: bool = False
    l2norm_in_kernel: bool = False
    max_T: int | None = None
    g_dtypes: tuple[str, ...] = ("input", "float32")
    beta_dtypes: tuple[str, ...] = ("input", "float32")
    positional: bool = True
    state_dtype: str = "float32"
    strided: str = "yes"
    empty_sequences: bool = True
    backward: bool = False
    max_beta: float = 2.0
    reset_gates: bool = True
    scale_zero: bool = True

    def __post_init__(self):
        for d in self.dtypes:
            if d not in DTYPE_NAMES:
                raise ValueError(f"dtypes: expected names from {list(DTYPE_NAMES)}, got {d!r}")
        if not self.dtypes:
            raise ValueError("dtypes: expected at least one dtype")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.state_layout not in LAYOUTS:
            raise ValueError(f"state_layout: expected one of {LAYOUTS}, got {self.state_layout!r}")
        if self.strided not in STRIDED:
            raise ValueError(f"strided: expected one of {STRIDED}, got {self.strided!r}")
        if self.head_sizes is not None and (not self.head_sizes or min(self.head_sizes) < 1):
            raise ValueError(f"head_sizes: expected positive sizes, got {self.head_sizes}")
        for name in ("g_dtypes", "beta_dtypes"):
            values = getattr(self, name)
            if not values or any(d not in SIDE_DTYPES for d in values):
                raise ValueError(f"{name}: expected one or more of {list(SIDE_DTYPES)}, got {values!r}")
        if not 0 < self.max_beta <= 2:
            raise ValueError(f"max_beta: expected a number in (0, 2], got {self.max_beta!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype: expected one of {STATE_DTYPES}, got {self.state_dtype!r}")

    @property
    def state_float32(self) -> bool:
        """The state is kept in float32, as the contract says (the state-precision check's need)."""
        return self.state_dtype == "float32"

    def matmul_precision(self, dtype) -> str:
        """The precision policy of the same-precision reference for inputs of this dtype
        (a torch dtype or its name)."""
        return self.precision if str(dtype).removeprefix("torch.") == "float32" else "bf16"

    def declared(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_capabilities(base: Capabilities, options: dict) -> Capabilities:
    """Override base with user options; option values of None mean 'not given'."""
    given = {k: v for k, v in options.items() if v is not None}
    return replace(base, **given)


# How each declared field is spelled on a command line (pytest --kda-*, kdaverify verify --*):
# the option is the field name with '-' for '_', lower case; booleans take yes / no, tuples a
# comma list. One table, so the pytest plugin and the command line can never disagree.
_YESNO = {"yes": True, "no": False}
FIELD_CHOICES = {"precision": PRECISIONS, "state_layout": LAYOUTS, "state_dtype": STATE_DTYPES, "strided": STRIDED}
_LISTS = ("dtypes", "g_dtypes", "beta_dtypes")


def option_name(field: str) -> str:
    """The command-line spelling of a Capabilities field: max_T -> max-t."""
    return field.replace("_", "-").lower()


def option_specs() -> list[tuple[str, str, dict]]:
    """(field, option name, argparse keyword arguments) for every Capabilities field."""
    specs = []
    for f in fields(Capabilities):
        doc = _FIELD_HELP.get(f.name, f.name)
        kw: dict = {"default": None, "help": doc}
        if f.name in FIELD_CHOICES:
            kw["choices"] = list(FIELD_CHOICES[f.name])
        elif isinstance(f.default, bool):
            kw["choices"] = sorted(_YESNO)
        elif f.name == "max_T":
            kw["type"] = int
            kw["metavar"] = "N"
        elif f.name == "max_beta":
            kw["type"] = float
            kw["metavar"] = "X"
        else:
            kw["metavar"] = "A,B,..."
        specs.append((f.name, option_name(f.name), kw))
    return specs


def options_from_strings(values: dict) -> dict:
    """Capabilities overrides from command-line strings keyed by field name (None: not given)."""
    out = {}
    for f in fields(Capabilities):
        v = values.get(f.name)
        if v is None:
            out[f.name] = None
        elif isinstance(f.default, bool):
            out[f.name] = _YESNO[v]
        elif f.name == "head_sizes":
            try:
                out[f.name] = tuple(int(s) for s in v.split(",") if s)
            except ValueError:
                raise ValueError(f"head_sizes: expected a comma list of integers, got {v!r}") from None
        elif f.name == "max_beta":
            try:
                out[f.name] = float(v)
            except ValueError:
                raise ValueError(f"max_beta: expected a number, got {v!r}") from None
        elif f.name in _LISTS:
            out[f.name] = tuple(s for s in v.split(",") if s)
        else:
            out[f.name] = v
    return out


_FIELD_HELP = {
    "dtypes": "comma list of input dtypes it accepts (float32,bfloat16,float16)",
    "head_sizes": "comma list of the K and V sizes it supports (default: any)",
    "precision": "matmul precision class for float32 inputs",
    "state_layout": "state layout it reads and returns",
    "gva": "supports HV > H (grouped value heads)",
    "varlen": "supports cu_seqlens (packed batches)",
    "gate_in_kernel": "accepts use_gate_in_kernel=True with A_log, dt_bias, lower_bound",
    "l2norm_in_kernel": "accepts use_qk_l2norm_in_kernel=True",
    "max_T": "the longest sequence to give it",
    "g_dtypes": "comma list of the dtypes g may have: input (q's dtype) or a dtype name",
    "beta_dtypes": "comma list of the dtypes beta may have: input (q's dtype) or a dtype name",
    "positional": "accepts scale, initial_state, output_final_state positionally after beta",
    "state_dtype": "the precision the state is kept in between tokens and calls",
    "strided": "non-contiguous inputs: yes (right answers), error (refused loudly, checked), no (not tested)",
    "empty_sequences": "accepts zero-length sequences (repeated offsets) in cu_seqlens",
    "backward": "its outputs carry autograd: run the gradient checks (grad_*)",
    "max_beta": "the largest beta it can be given (default 2; 1 for a sigmoid of beta fused in the kernel)",
    "reset_gates": "accepts g = -inf (a hard reset); no: the reset gate regime is not drawn",
    "scale_zero": "accepts scale = 0; no: a loud refusal of scale = 0 (naming the scale) is checked instead",
}
