"""Finding 007: SGLang 0.5.23's Triton chunk_kda (sglang/kernels/ops/attention/fla/kda.py)
cannot run float32 inputs at K = V = 256 on a Hopper GPU: its state kernel
chunk_gated_delta_rule_fwd_kernel_h_blockdim64 (fla/chunk_delta_h.py) has one fixed launch
configuration (BV 32, 4 warps, 2 pipeline stages; the SGLANG_GDN_CHUNK_H_* environment
variables) where flash-linear-attention's autotuner chooses among several and drops those
that do not fit, and at K = 256 with float32 operands that one configuration asks for 286720
bytes of shared memory, more than the 232448 an H200 block may have. The call raises
triton's OutOfResources (loud, not a wrong answer). Seen in the suite's matrix run on an H200
(five float32 checks, each at K = V = 256) and reproduced by this script on an H200 in a fresh
process, at B = T = H = 1.

    KDAVERIFY_SGLANG=path/to/sglang-0.5.23-...whl python 007-sglang-triton-chunk_kda-fp32_k256_shared_memory.py

Exits 1 while the call raises OutOfResources, 0 once it runs (with o finite), 2 when the
check cannot run (no GPU, no SGLang files, or any other error). SGLANG_GDN_CHUNK_H_NUM_STAGES=1
in the environment is SGLang's own knob for the stage count; whether the call then runs is not
known: the one GPU attempt with it stopped at its 40 s limit before the call returned, as did
an attempt without it in the same device call (likely compile time).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch

ENV = "KDAVERIFY_SGLANG"
FLA = "sglang.kernels.ops.attention.fla"  # chunk_kda in kda.py, prepare_chunk_indices in index.py


# ---------------------------------------------------------------- loading SGLang's kernel files


def load_sglang(path: str | None):
    """SGLang's fla/kda.py and fla/index.py modules, and SGLang's version.

    SGLang's package __init__ files import the whole engine, so the packages above the kernel
    files are registered empty (their folders found, their __init__ not run) and the few engine
    helpers the kernel files import are stood in for by engine_stubs."""
    if path:
        root = Path(path)
        if root.is_file() and root.suffix == ".whl":
            root = unpack(root)
        elif root.name == "sglang":
            root = root.parent
    else:
        spec = importlib.util.find_spec("sglang")  # finds the folder without running its __init__
        if spec is None or not spec.submodule_search_locations:
            stop(f"sglang is not installed; give an sglang wheel or folder with --sglang or {ENV}")
        root = Path(next(iter(spec.submodule_search_locations))).parent
    if not root.joinpath(*FLA.split("."), "kda.py").is_file():
        stop(f"{path or root}: no {FLA.replace('.', '/')}/kda.py there (expected SGLang 0.5.23's files)")
    parts = FLA.split(".")
    for name in ("sglang.srt", "sglang.kernels.jit", *(".".join(parts[:i]) for i in range(1, len(parts) + 1))):
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")))]
        sys.modules[name] = package
    for name, attributes in engine_stubs().items():
        stub = types.ModuleType(name)
        stub.__dict__.update(attributes)
        sys.modules[name] = stub
    try:
        kda, index = importlib.import_module(FLA + ".kda"), importlib.import_module(FLA + ".index")
    except ImportError as e:
        stop(f"SGLang's kernel files do not import: {e}")
    metadata = sorted(root.glob("sglang-*.dist-info/METADATA"))  # the wheel's, or site-packages'
    found = re.search(r"^Version: (\S+)$", metadata[0].read_text(), re.M) if metadata else None
    return kda, index, found.group(1) if found else "unknown"


def stop(message: str):
    """Exit with status 2: the check could not run (status 1 is kept for the defect)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def unpack(wheel: Path) -> Path:
    """The FLA kernel files and the wheel's metadata, unpacked into a folder removed at exit
    (not earlier: Triton reads a kernel's source when it compiles it)."""
    folder = Path(tempfile.mkdtemp(prefix="sglang-kda-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        kernels = FLA.replace(".", "/") + "/"
        names = [n for n in zf.namelist() if n.startswith(kernels) and n.endswith(".py")]
        zf.extractall(folder, names + [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")])
    return folder


def engine_stubs() -> dict[str, dict]:
    """What the kernel files take from the engine: fla/utils.py reads torch's release, and
    fla/fused_norm_gate.py (imported by kda.py for a layer norm that chunk_kda does not call)
    asks at import whether it runs on an NPU or an AMX CPU and imports four more helpers."""

    def unused(*args, **kwargs):
        raise RuntimeError("an SGLang engine helper this script stands in for was called")

    no = lambda *args, **kwargs: False  # noqa: E731
    release = tuple(int(x) for x in re.match(r"[\d.]*\d", torch.__version__).group().split("."))
    return {
        "sglang.srt.utils": {"__path__": [], "is_npu": no, "is_cpu": no, "cpu_has_amx_support": no,
                             "cdiv": unused, "next_power_of_2": unused},
        "sglang.srt.utils.common": {"torch_release": release},
        "sglang.kernels.jit.utils": {"get_jit_cuda_arch": unused, "is_arch_support_pdl": unused},
    }  # fmt: skip


# ---------------------------------------------------------------- the check


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-size", type=int, default=256, help="K = V (default 256)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--sglang", default=os.environ.get(ENV), help=f"sglang wheel or folder (default: ${ENV}, else installed)"
    )
    a = p.parse_args()
    if not torch.cuda.is_available():
        stop("needs a CUDA GPU: shared memory per block is a property of the compiled kernel on the card")
    kda, _, version = load_sglang(a.sglang)
    import triton
    from triton.runtime.errors import OutOfResources

    K = V = a.head_size
    dtype = getattr(torch, a.dtype)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(1, 1, 1, K, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(1, 1, 1, V, generator=gen)
    g = -torch.rand(1, 1, 1, K, generator=gen)
    beta = torch.rand(1, 1, 1, generator=gen)
    q, k, v, g, beta = (x.to("cuda", dtype) for x in (q, k, v, g, beta))
    pool = torch.zeros(1, 1, V, K, device="cuda", dtype=torch.float32)  # SGLang's VK state pool
    print(f"sglang {version}, torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    print(f"chunk_kda: B = 1, T = 1, H = 1, K = V = {K}, {a.dtype}")
    try:
        o = kda.chunk_kda(
            q, k, v.clone(), g, beta, initial_state=pool,
            initial_state_indices=torch.zeros(1, dtype=torch.int32, device="cuda"),
            cu_seqlens=torch.tensor([0, 1], device="cuda"),
        )  # fmt: skip
        torch.cuda.synchronize()
    except OutOfResources as e:
        print(f"FAILS: raises {type(e).__name__}: {e}")
        return 1
    except Exception as e:  # noqa: BLE001 (anything else: the check could not run)
        stop(f"SGLang's code raised {type(e).__name__}: {e}")
    finite = bool(torch.isfinite(o).all())
    print(f"runs; o {'finite' if finite else 'NOT finite'}")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
