"""Which launch config of chunk_kda's sequential kernels fits an H100's shared memory, decided
on a machine without a GPU: Triton compiles each config for sm_90 (its bundled ptxas does the
rest) and the compiled kernel's `metadata.shared` is the figure a GPU's OutOfResources error
reports (checked on one NVIDIA H100 80GB HBM3, Triton 3.6, 2026-11-27: 262144, 245760 and
327680 bytes for three configs that failed there, the same three figures here). It mirrors
`runtime.launch_fitting`: the first config of `ChunkBlocks.fitting` that fits is the one a
GPU would run.

Run in a process of its own with TRITON_INTERPRET=0 (the kernels must be compiled, not
interpreted): `python -m kdaverify.kernels.sm90_fit` prints one JSON line per case.
equivalence/test_kernel_fit.py does that on every CI run. With --usage each line also gives
the fitting config's registers per thread and spill bytes (register_usage).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

# Shared memory per block on an H100 (SXM and PCIe): 227 KiB, the limit Triton checks against.
H100_SHARED_BYTES = 232448

# Argument types by parameter name. "in": the input dtype (q, k, v, o and their gradients
# dv, do); "mat": the dtype of the Aqk, M, Minv buffers (that of the dot operands).
_POINTERS = {
    "q": "in", "k": "in", "v": "in", "o": "in", "do": "in", "dv": "in",
    "Aqk": "mat", "M": "mat", "Minv": "mat", "QG": "mat", "KG": "mat", "KD": "mat", "W2": "mat",
    "G": "fp32", "L": "fp32", "beta": "fp32", "h0": "fp32", "ht": "fp32", "h": "fp32", "dh": "fp32", "dh0": "fp32",
    "dht": "fp32", "dq": "fp32", "dk": "fp32", "dg": "fp32", "dbeta": "fp32", "P": "fp32", "DL": "fp32",
    "DVL": "fp32", "Rs": "i8", "cu_seqlens": "i32", "chunk_first": "i32", "chunks": "i32",
}  # fmt: skip


def _signature(fn, dtype: str, consts: dict) -> dict:
    """Triton's signature of `fn` for inputs of `dtype` ("bf16" or "fp32")."""
    names = {"in": dtype, "mat": dtype, "fp32": "fp32", "i8": "i8", "i32": "i32"}
    sig = {}
    for p in inspect.signature(fn.fn).parameters:
        if p in consts:
            sig[p] = "constexpr"
        elif p in _POINTERS:
            sig[p] = "*" + names[_POINTERS[p]]
        elif p == "scale":
            sig[p] = "fp32"
        else:  # T, NT, NBH and the runtime flags
            sig[p] = "i32"
    return sig


def compile_sm90(fn, dtype: str, consts: dict, num_warps: int, num_stages: int):
    """`fn` compiled for sm_90 with these constexprs and options (Triton's CompiledKernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = inspect.signature(fn.fn).parameters
    params = list(sig)
    # constexprs with a default (ONLY, KP, RELOAD, ...) take it, as a launch that omits them does
    defaults = {n: p.default for n, p in sig.items() if p.default is not inspect.Parameter.empty}
    consts = {**defaults, **{n: v for n, v in consts.items() if n in params}}
    constexprs = {(params.index(n),): v for n, v in consts.items()}
    signature = _signature(fn, dtype, consts)
    # Every pointer 16-byte aligned, as a launch on fresh torch tensors specializes it (Triton's
    # "D" attribute): without it the compiler may not vectorize or pipeline a load, and the
    # registers and shared memory reported would not be the GPU's.
    attrs = {(params.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t.startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def register_usage(compiled) -> dict:
    """Registers per thread and spill bytes (stores, loads: sizes of the spill instructions in
    the code, not of the traffic they make) of a compiled kernel, from `ptxas -v` (the ptxas
    Triton bundles) on its PTX. A kernel at 255 registers with spills keeps part of its tiles
    in local memory (L1/L2): chunk_grads at bf16 K = 128 spilled 16 KB of stores (2026-11-28)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        command = [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "kernel.o")]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


def first_fit(kernel: str, dtype: str, K: int, V: int, usage: bool = False) -> dict:
    """The config launch_fitting would take for `kernel` ("recurrence", "dh_recurrence",
    "grads" or "pair_grads") at this head size, with the shared memory of every config tried; "fits": None
    when no config fits (launch_fitting then raises its ValueError). With usage, also the
    registers and spills of the config that fits (register_usage)."""
    import triton.language as tl
    from kdaverify.kernels import kda_chunk_backward, kda_chunk_inter
    from kdaverify.kernels.kda_chunk import BLOCKS

    dot = tl.float32 if dtype == "fp32" else tl.bfloat16
    fn, BK = {
        "recurrence": (kda_chunk_inter.chunk_recurrence, BLOCKS.bk(K)),
        "dh_recurrence": (kda_chunk_backward.chunk_dh_recurrence, BLOCKS.bk(K)),
        "grads": (kda_chunk_backward.chunk_grads, BLOCKS.bk_grads(K, dot)),
        "pair_grads": (kda_chunk_backward.chunk_pair_grads, BLOCKS.bk_pair_grads(K, dot)),
    }[kernel]
    consts = dict(H=1, HV=1, K=K, V=V, BT=BLOCKS.BT, BC=BLOCKS.BC, BK=BK, IS_VARLEN=False, RESETS=False,
                  HAS_H0=True, STORE_H=True, HAS_DHT=True, STORE_DH0=True, L2NORM=False, BETA_SIGMOID=False,
                  NEG_EIGVAL=False, DOT_DTYPE=dot, PRECISION="tf32", DIAG_COLS=BLOCKS.GRADS_DIAG_COLS)  # fmt: skip
    if kernel == "recurrence":
        consts["MATS_ROWS"] = BLOCKS.mats_rows(1, dot)
    elif kernel in ("grads", "dh_recurrence"):
        consts["MATS_ROWS"] = BLOCKS.mats_rows(2, dot)
    tried = []
    if kernel == "pair_grads":  # one config, no fallback (kda_chunk.chunk_kda_backward)
        configs, warps = [{}], BLOCKS.PAIR_GRADS_WARPS
    else:
        BV = BLOCKS.bv(K, V)
        warps = BLOCKS.recurrence_warps(K) if kernel == "recurrence" else BLOCKS.warps(BK)
        if kernel == "dh_recurrence":  # its own block choices (kda_chunk.chunk_kda_backward)
            BV, warps = BLOCKS.DH_BV or BV, BLOCKS.dh_warps(K, dot)
            consts["OPS"] = BLOCKS.dh_ops(dot)
            consts["SPLIT"] = bool(BLOCKS.DH_SPLIT) and dot != tl.float32
        configs = BLOCKS.fitting(BV, dot, reload=kernel == "grads" and BK >= 256)
    for config in configs:
        meta = {n: v for n, v in config.items() if n != "num_stages"}
        compiled = compile_sm90(fn, dtype, {**consts, **meta}, warps, config.get("num_stages", 3))
        tried.append({**config, "shared": compiled.metadata.shared})
        if compiled.metadata.shared <= H100_SHARED_BYTES:
            fit = {"kernel": kernel, "dtype": dtype, "K": K, "V": V, "fits": config, "tried": tried}
            return {**fit, "usage": register_usage(compiled)} if usage else fit
    return {"kernel": kernel, "dtype": dtype, "K": K, "V": V, "fits": None, "tried": tried}


KERNELS = ("recurrence", "dh_recurrence", "grads", "pair_grads")
CASES = [(kernel, dtype, K) for kernel in KERNELS for dtype in ("bf16", "fp32") for K in (64, 128, 256)]


def _case(text: str) -> tuple[str, str, int]:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in KERNELS or parts[1] not in ("bf16", "fp32") or not parts[2].isdigit():
        expected = f"KERNEL:DTYPE:K with KERNEL in {KERNELS} and DTYPE bf16 or fp32"
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return parts[0], parts[1], int(parts[2])


def main(argv=None) -> int:
    """Arguments: cases as KERNEL:DTYPE:K (K = V), default every case of CASES; --usage adds
    registers and spills of each fitting config."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("sm90_fit: run with TRITON_INTERPRET=0 (kernels must compile, not interpret)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m kdaverify.kernels.sm90_fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", type=_case, help="KERNEL:DTYPE:K (K = V); default: every case of CASES")
    parser.add_argument("--usage", action="store_true", help="registers and spill bytes of each fitting config")
    args = parser.parse_args(argv)
    for kernel, dtype, K in args.cases or CASES:
        print(json.dumps(first_fit(kernel, dtype, K, K, args.usage)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
