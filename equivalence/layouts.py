"""How inputs are laid out in memory when they reach a kernel (issue 10): inside poisoned
guard bands, and as strided views the way serving engines and models hand them over.

A kernel that reads out of bounds silently reads harmless neighbours in a small contiguous
test; here the neighbours are poison (NaN, or a huge finite value that overflows an exp),
so an out-of-bounds read shows up as a non-finite or wrong output, and an out-of-bounds
write changes a guard band, which is checked bitwise after the call.
"""

from __future__ import annotations

import torch

INPUTS = ("q", "k", "v", "g", "beta", "initial_state", "cu_seqlens")
# Poison either side of every input, in elements: more than one row of the widest head a
# kernel block reads (next_power_of_2(256) = 256 lanes) times the 64 value heads a GPU run
# draws, so a load that runs past the last head, the last token or the last state lands in
# poison, not in unallocated memory.
GUARD = 64 * 256
# The second poison: finite, so a kernel that masks NaN but still reads out of bounds is
# caught when exp() of it overflows to Inf. Clamped to the dtype's largest finite value
# (float16 tops out at 65504).
HUGE = 1e30
# cu_seqlens is int64: its poison is an offset far outside any tensor, so a read past its
# end sends a kernel out of bounds (a fault) or into the float poison.
INT_POISON = 2**62


def poison_value(dtype: torch.dtype, kind: str):
    """The guard-band fill for dtype: kind "nan" or "huge"."""
    if not dtype.is_floating_point:
        return INT_POISON if kind == "nan" else -INT_POISON
    return float("nan") if kind == "nan" else min(HUGE, torch.finfo(dtype).max)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """x reinterpreted as integers of the same width, so NaN compares bitwise."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.view(ints[x.element_size()])


class GuardBands:
    """Every input of t copied into the middle of a larger allocation whose GUARD elements
    before and after are filled with poison (kind "nan" or "huge").

    guarded: the inputs as views into those allocations (same shapes, contiguous, the
    storage_offset is GUARD). intact(): the names of inputs whose bands changed."""

    def __init__(self, t: dict, kind: str):
        self.guarded, self._bufs = {}, {}
        for name, x in t.items():
            if x is None:
                self.guarded[name] = None
                continue
            n = x.numel()
            buf = torch.full((GUARD + n + GUARD,), poison_value(x.dtype, kind), dtype=x.dtype, device=x.device)
            buf[GUARD : GUARD + n] = x.reshape(-1)
            self._bufs[name] = (buf, n, buf.clone())
            self.guarded[name] = buf[GUARD : GUARD + n].view(x.shape)

    def changed(self) -> list[str]:
        """Inputs whose guard bands (before or after) are no longer bitwise what was written."""
        out = []
        for name, (buf, n, orig) in self._bufs.items():
            for a, b in ((0, GUARD), (GUARD + n, 2 * GUARD + n)):
                if not torch.equal(_bits(buf[a:b]), _bits(orig[a:b])):
                    out.append(name)
                    break
        return out


# ------------------------------------------------------------------- strided views


def fused_projection(t: dict) -> dict:
    """q, k and v as slices of one fused projection [B, T, H*K + H*K + HV*V] (what a model's
    qkv linear layer returns), and g and beta as slices of a wider tensor too: each is a
    view with a token stride larger than its own row."""
    q, k, v = t["q"], t["k"], t["v"]
    B, T = q.shape[:2]
    widths = [q[0, 0].numel(), k[0, 0].numel(), v[0, 0].numel()]
    fused = torch.cat([x.reshape(B, T, -1) for x in (q, k, v)], dim=-1)
    starts = [0, widths[0], widths[0] + widths[1]]
    out = dict(t)
    for name, x, s, w in zip(("q", "k", "v"), (q, k, v), starts, widths, strict=True):
        out[name] = fused[..., s : s + w].view(x.shape)
    for name in ("g", "beta"):
        x = t[name]
        wide = torch.cat([x.reshape(B, T, -1), torch.zeros_like(x.reshape(B, T, -1)[..., :1])], dim=-1)
        out[name] = wide[..., :-1].view(x.shape)
    return out


def transposed_and_back(t: dict) -> dict:
    """Every per-token input stored heads-first ([B, H, T, K] in memory) and viewed back
    as [B, T, H, K]: the right shape with the strides of another layout."""
    out = dict(t)
    for name in ("q", "k", "v", "g", "beta"):
        out[name] = t[name].transpose(1, 2).contiguous().transpose(1, 2)
    return out


def batch_slice(t: dict) -> dict:
    """Every input (initial_state included) as every other row of a tensor with twice the
    rows: a non-unit batch stride; the rows between hold NaN."""
    out = dict(t)
    for name in ("q", "k", "v", "g", "beta", "initial_state"):
        x = t[name]
        if x is None:
            continue
        both = torch.full((2 * x.shape[0], *x.shape[1:]), float("nan"), dtype=x.dtype, device=x.device)
        both[::2] = x
        out[name] = both[::2]
    return out


STRIDED_LAYOUTS = {
    "fused qkv projection": fused_projection,
    "transposed and back": transposed_and_back,
    "batch slice with stride 2": batch_slice,
}


def as_if_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The elements a kernel reads when it ignores x's strides: x's storage from its
    offset, read with the strides of a contiguous tensor of x's shape."""
    strides, acc = [], 1
    for size in reversed(x.shape):
        strides.insert(0, acc)
        acc *= size
    return torch.as_strided(x, x.shape, strides, x.storage_offset())


def read_past_end(x: torch.Tensor, n: int) -> torch.Tensor:
    """The n elements that follow x's last element in its storage (zeros where the storage
    ends first): what a load that runs past the end of x reads."""
    start = x.storage_offset() + x.numel()
    avail = max(0, min(n, x.untyped_storage().nbytes() // x.element_size() - start))
    tail = torch.as_strided(x, (avail,), (1,), start) if avail else x.new_zeros(0)
    return torch.cat([tail, x.new_zeros(n - avail)])
