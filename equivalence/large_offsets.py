"""Large-offset cases (issue 10): inputs past 2^31 elements and grids past 65535 blocks,
where kernels that compute pointer offsets in 32 bits, or put a large count on a grid
dimension limited to 65535, go wrong. Only a short tail of each case is held to the
oracle, so the check costs one big kernel call, not a big oracle.

Four cases (B, T, H, HV, K, V chosen from the declared head sizes; below at K = V = 128):

    packed_offset  a packed batch whose last, short sequence (100 tokens) starts past
                   2^31 / (HV * K) tokens: its token offsets times HV * K pass 2^31
    row_offset     an unpacked batch of 193-token rows whose last row starts past 2^31
                   elements; B * HV is past 65535 too (a grid of sequences x heads)
    state_pool     a packed batch of N one-token sequences and a 100-token tail with an
                   initial state, N * HV * K * V past 2^31 (the state pool's offsets);
                   N * HV is past 65535
    many_chunks    one sequence of more than 65535 chunks of 64 tokens (H = HV = 1 and the
                   smallest head size, so it stays small)

Memory each needs on the device (inputs, outputs and states, times WORKSPACE for what the
kernel allocates itself), at K = V = 128 and HV = 4:

    case           bfloat16    float32
    packed_offset    40 GiB     80 GiB
    row_offset       51 GiB     91 GiB
    state_pool       32 GiB     33 GiB     (the float32 states dominate)
    many_chunks     1.3 GiB    2.5 GiB     (K = V = 16)

(`python -m kdaverify.equivalence.large_offsets` prints this table; need_bytes computes it.) A case
runs only where the device has that much free; otherwise it is reported "not applicable:
needs N GiB", never as passed. Inputs are generated on the device from a seed (a
torch.Generator), so nothing large crosses to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kdaverify.reference.conventions import Sizes

LIMIT = 2**31  # where a signed 32-bit element offset wraps
GRID = 65535  # the largest grid y / z dimension (and the old x limit) on NVIDIA GPUs
TAIL = 100  # tokens held to the oracle: not a multiple of 16, 32 or 64 (a ragged last chunk)
# Row length of row_offset: three chunks of 64 and a 1-token ragged tail; short enough that
# B * HV passes 65535 at HV = 4, long enough that the rows' final states (float32
# [B, HV, K, V]) stay a fraction of the inputs.
ROW_T = 193
# A chunked kernel allocates work buffers beside its inputs (gated copies of q and k, the
# WY factors w and u, per-chunk states) of about the size of its inputs; budgeting the same
# again as the inputs and outputs is the estimate, and running out of memory anyway is
# reported as not applicable with the measured free memory.
WORKSPACE = 2.0


@dataclass(frozen=True)
class LargeCase(Sizes):
    """One large-offset case: sizes, its name, the packing (seqlens, or None for B rows of
    T), and which sequence is the tail held to the oracle (always the last one)."""

    name: str
    seqlens: tuple[int, ...] | None
    h0: bool
    tail: int | None = None  # tokens at the end of the last row held to the oracle (None: the last sequence)

    @property
    def N(self) -> int:
        return len(self.seqlens) if self.seqlens is not None else self.B

    def tail_span(self) -> tuple[int, int, int]:
        """(row, start, end) of the tail in tokens of its row: the last `tail` tokens, or
        the last sequence."""
        if self.tail is not None:
            return self.B - 1, self.T - self.tail, self.T
        if self.seqlens is None:
            return self.B - 1, 0, self.T
        return 0, self.T - self.seqlens[-1], self.T


def cases(K: int, V: int, K_small: int, H: int = 4, HV: int = 4) -> dict[str, LargeCase]:
    """The four cases at head sizes K, V (and K_small for many_chunks)."""
    filler = LIMIT // (HV * K) + 64  # tokens before the tail: its offsets * HV * K pass 2^31
    rows = LIMIT // (ROW_T * HV * max(K, V)) + 2  # the last row starts past 2^31 elements
    pool = LIMIT // (HV * K * V) + 2  # sequences whose states pass 2^31 elements
    long_t = (GRID + 1) * 64 + TAIL
    return {
        "packed_offset": LargeCase(1, filler + TAIL, H, HV, K, V, "packed_offset", (filler, TAIL), True),
        "row_offset": LargeCase(rows, ROW_T, H, HV, K, V, "row_offset", None, False),
        "state_pool": LargeCase(1, pool - 1 + TAIL, H, HV, K, V, "state_pool", (1,) * (pool - 1) + (TAIL,), True),
        "many_chunks": LargeCase(1, long_t, 1, 1, K_small, K_small, "many_chunks", None, False, tail=TAIL),
    }


def need_bytes(c: LargeCase, dtype: torch.dtype) -> int:
    """Device memory one case needs: q, k, v, g, beta and o in dtype, initial and final
    state in float32, times WORKSPACE."""
    es = torch.empty(0, dtype=dtype).element_size()
    tokens = c.B * c.T
    per_token = 2 * c.H * c.K + c.HV * (c.V + c.K + 1 + c.V)  # q, k; v, g, beta, o
    states = (2 if c.h0 else 1) * c.N * c.HV * c.K * c.V * 4
    return int(WORKSPACE * (tokens * per_token * es + states))


def gib(n: int) -> float:
    return n / 2**30


def not_applicable(c: LargeCase, dtype: torch.dtype, device: torch.device, free: int | None = None) -> str | None:
    """Why case c cannot run on device (None: it can). free: the device's free bytes (read
    from the device when None)."""
    need = need_bytes(c, dtype)
    if device.type != "cuda":
        return f"not applicable: needs {gib(need):.0f} GiB of CUDA device memory ({c.name} runs on a GPU only)"
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    if free < need:
        return f"not applicable: needs {gib(need):.0f} GiB, {device} has {gib(free):.0f} GiB free"
    return None


def generate(c: LargeCase, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """The inputs of case c, made on the device from seed: q, v ~ N(0, 1), k unit rows,
    g = logsigmoid(z) / 16 (the gate of DESIGN.md section 7), beta ~ U(0, 1), a N(0, 1)
    initial state where c.h0. Filled in slabs of tokens, so no float32 temporary is the
    size of a whole input."""
    gen = torch.Generator(device=device).manual_seed(seed)
    B, T = c.B, c.T
    t = {
        "q": torch.empty(B, T, c.H, c.K, dtype=dtype, device=device),
        "k": torch.empty(B, T, c.H, c.K, dtype=dtype, device=device),
        "v": torch.empty(B, T, c.HV, c.V, dtype=dtype, device=device),
        "g": torch.empty(B, T, c.HV, c.K, dtype=dtype, device=device),
        "beta": torch.empty(B, T, c.HV, dtype=dtype, device=device),
    }
    flat = {n: x.view(B * T, *x.shape[2:]) for n, x in t.items()}  # contiguous: views
    step = max(1, 2**24 // (c.HV * max(c.K, c.V)))  # tokens per slab: 16 Mi elements at most
    for s in range(0, B * T, step):
        for name in ("q", "v"):
            x = flat[name][s : s + step]
            x.copy_(torch.randn(x.shape, generator=gen, device=device))
        k = torch.randn(flat["k"][s : s + step].shape, generator=gen, device=device)
        flat["k"][s : s + step].copy_(k / (k.square().sum(-1, keepdim=True) + 1e-6).sqrt())
        g = flat["g"][s : s + step]
        g.copy_(torch.nn.functional.logsigmoid(torch.randn(g.shape, generator=gen, device=device)) / 16)
        bt = flat["beta"][s : s + step]
        bt.copy_(torch.rand(bt.shape, generator=gen, device=device))
    t["initial_state"] = (
        torch.randn(c.N, c.HV, c.K, c.V, generator=gen, device=device, dtype=torch.float32) if c.h0 else None
    )
    cu = None
    if c.seqlens is not None:
        cu = torch.zeros(c.N + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(c.seqlens, dtype=torch.int64).cumsum(0)
        cu = cu.to(device)
    t["cu_seqlens"] = cu
    return t


def tail_inputs(c: LargeCase, t: dict, state: torch.Tensor | None) -> dict:
    """The tail of case c as a call of its own, starting from `state` [1, HV, K, V] (the
    state it starts from; None: zeros)."""
    row, a, b = c.tail_span()
    out = {n: t[n][row : row + 1, a:b].clone() for n in ("q", "k", "v", "g", "beta")}
    return dict(out, initial_state=state, cu_seqlens=None)


def main() -> None:
    """Print the memory each case needs, at the sizes a GPU run uses."""
    for dtype in (torch.bfloat16, torch.float32):
        for c in cases(128, 128, 16).values():
            print(f"{c.name:<14} {str(dtype):<15} B={c.B} T={c.T} N={c.N}: {gib(need_bytes(c, dtype)):.1f} GiB")


if __name__ == "__main__":
    main()
