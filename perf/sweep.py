"""What a sweep covers (presets), how one row is produced, and the run's environment.

Presets:
    quick  DESIGN.md section 7 on a GPU: bf16, H = 32, K = V = 128 at B1 T4096, B1 T16384,
           B8 T4096, B1 T65536: chunk_kda fwd and fwd+bwd, chunk_dplr and causal SDPA fwd;
           decode of N in {1, 64, 256} sequences with fp32 states [N, 32, 128, 128].
    full   T 1K..64K, B in {1, 8}, H in {16, 32}, K = V in {64, 128, 256}, bf16 and fp32,
           every mode (hours of device time: split it with pytest -k).
    cpu    the reference implementations on a CPU: B1, H2, K = V = 64, float32, T 256..2048.
    smoke  a few tiny rows of every kind (the test suite's check of the machinery).

A row: one Case (op, provider, mode, B, T, H, HV, K, V, dtype) with its status (`ok`,
`unverified`, `unavailable: <reason>`, `excluded: <reason>`), the verification, ms, TFLOP/s,
GB/s, the model's floor under the measured ceilings, the fraction of roofline and the peak
memory.
"""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
import time
from importlib import metadata

import torch

from . import models
from .ceilings import compute_class, datasheet, measure
from .providers import PROVIDERS, Case, Unavailable, find, inputs, runner
from .report import slug
from .timing import CPU_BUDGET_S, kernel_ms, median_ms, peak_mib
from .verify import summary, verify

PRESETS = ("quick", "full", "cpu", "smoke")


def _grid(names, ops_modes, shapes, dtypes, device):
    cases = []
    for (op, mode), (B, T, H, K), dtype in itertools.product(ops_modes, shapes, dtypes):
        for p in PROVIDERS:
            if p.op == op and mode in p.modes and device in p.devices and (p.name in names if names else p.default):
                cases.append(Case(B, T, H, H, K, K, op=op, provider=p.name, mode=mode, dtype=dtype))
    return cases


def cases(preset: str, device: str, providers: list[str] | None = None) -> list[Case]:
    """The cases of a preset on device ('cuda' or 'cpu'), optionally only these providers.
    The CPU presets also list the GPU-only providers at one shape, so that the report shows
    them as unavailable rather than leaving them out."""
    return list(dict.fromkeys(_cases(preset, device, providers)))


def _cases(preset, device, providers):
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
    prefill = [("chunk_kda", "fwd"), ("chunk_kda", "fwdbwd"), ("chunk_dplr", "fwd"), ("attention", "fwd")]
    if preset == "quick":
        shapes = [(1, 4096, 32, 128), (1, 16384, 32, 128), (8, 4096, 32, 128), (1, 65536, 32, 128)]
        decode = [(n, 1, 32, 128) for n in (1, 64, 256)]
        out = _grid(providers, prefill, shapes, ["bfloat16"], device)
        return out + _grid(providers, [("recurrent_kda", "decode")], decode, ["bfloat16"], device)
    if preset == "full":
        shapes = list(itertools.product((1, 8), (1024, 4096, 16384, 65536), (16, 32), (64, 128, 256)))
        decode = list(itertools.product((1, 16, 64, 256, 1024), (1,), (16, 32), (64, 128, 256)))
        modes = prefill + [("attention", "fwdbwd")]
        out = _grid(providers, modes, shapes, ["bfloat16", "float32"], device)
        return out + _grid(providers, [("recurrent_kda", "decode")], decode, ["bfloat16", "float32"], device)
    if preset == "cpu":
        shapes = [(1, t, 2, 64) for t in (256, 512, 1024, 2048)]
        modes = [("chunk_kda", "fwd"), ("recurrent_kda", "fwd"), ("chunk_dplr", "fwd"), ("attention", "fwd")]
        out = _grid(providers, modes, shapes, ["float32"], device)
        out += _grid(providers, [("recurrent_kda", "fwdbwd"), ("attention", "fwdbwd")], shapes[:3], ["float32"],
                     device)  # fmt: skip
        out += _grid(providers, [("chunk_kda", "fwd")], shapes[:1], ["float32"], "cuda")  # shown as unavailable
        return out + _grid(providers, [("recurrent_kda", "decode")], [(n, 1, 2, 64) for n in (1, 16, 64)],
                           ["float32"], device)  # fmt: skip
    small, long = [(1, 32, 2, 16)], [(2, 300, 2, 16)]  # smoke; T = 300: past the verified tail, not a chunk multiple
    modes = [("chunk_kda", "fwd"), ("recurrent_kda", "fwd"), ("chunk_dplr", "fwd"), ("attention", "fwd")]
    out = _grid(providers, modes, small, ["float32"], device)
    out += _grid(providers, [m for m in modes if m[0] != "recurrent_kda"], long, ["float32"], device)
    out += _grid(providers, [("recurrent_kda", "fwdbwd")], small, ["float32"], device)
    out += _grid(providers, modes[:1], small, ["float32"], "cuda")
    return out + _grid(providers, [("recurrent_kda", "decode")], [(3, 1, 2, 16)], ["float32"], device)


def device_slug(device: str) -> str:
    """reports/<slug>/: the GPU's name, or cpu-<model name>, lower case, safe characters."""
    return slug(device_name(device))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name}"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(device: str, preset: str) -> dict:
    name = device_name(device)
    env = {
        "device": name,
        "slug": device_slug(device),
        "kind": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "preset": preset,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "kdaverify": _version("kdaverify"),
        "fla-core": _version("fla-core"),
        "flash-kda": _version("flash-kda") or _version("flash_kda"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # other processes on the host slow CPU timings down: the 1-minute load average at the end
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        env.update(cuda=torch.version.cuda, driver=_driver())
    return env


def ceilings(device: str, smoke: bool = False) -> dict:
    return {
        "measured": measure(device, smoke),
        "datasheet": datasheet(device_name(device)) if device == "cuda" else None,
    }


class Sweep:
    """Produces rows on one device under ceilings measured once."""

    def __init__(self, device: str, ceilings: dict, budget_s: float = CPU_BUDGET_S):
        self.device, self.ceilings, self.budget_s = device, ceilings, budget_s
        self.rows: list[dict] = []

    def run(self, case: Case) -> tuple[dict, object]:
        """The row of case (also appended to self.rows) and the call to time (None when the
        provider did not run)."""
        row = case.as_dict()
        shape = case.shape
        row.update(flops=models.flops(case.op, case.mode, shape), bytes=models.nbytes(case.op, case.mode, shape))
        self.rows.append(row)
        provider = find(case.provider, case.op)
        row["note"] = provider.note
        if self.device not in provider.devices:
            row["status"] = f"unavailable: needs a CUDA GPU ({self.device} run)"
            return row, None
        if provider.triton and self.device != "cuda":
            row["status"] = "excluded: Triton interpreter on the CPU (its timings mean nothing)"
            return row, None
        try:
            fn = provider.callable()
            t = inputs(case, self.device)
            call, out = runner(fn, case, provider.native(t))
        except Unavailable as e:
            row["status"] = f"unavailable: {e}"
            return row, None
        except (NotImplementedError, ImportError) as e:
            row["status"] = f"unavailable: {type(e).__name__}: {e}"
            return row, None
        row.update(summary(verify(provider.in_kv(fn), case, t, out, provider.precision)))
        if case.mode == "fwdbwd":
            row["check"] += " (forward output only; gradients not checked)"
        ms, how = median_ms(call, self.device, self.budget_s)
        m = self.ceilings["measured"]
        peak = m[compute_class(case.dtype, provider.precision)]
        floor = models.floor_ms(case.op, case.mode, shape, peak, m["copy_gbs"])
        row.update(
            status="ok" if row["verified"] else "unverified",
            ms=ms,
            timer=how,
            tflops=row["flops"] / (ms * 1e9),
            gbs=row["bytes"] / (ms * 1e6),
            floor_ms=floor,
            roofline_fraction=floor / ms,
            peak_mib=peak_mib(call, self.device),
        )
        if self.device == "cuda":
            # the GPU's time in kernels per call: well below ms, the call waits on the host's
            # launches (a launch-bound row; report.LAUNCH_BOUND)
            row["gpu_ms"] = sum(kernel_ms(call).values())
        return row, call
