"""Triton's math functions wrapped in jitted functions of their own, for
public_kernels._interpreter_aliases: under Triton's interpreter a kernel may call a jitted
function, but not a tl function bound to another module-level name. Only imported when the
interpreter is on."""

import triton
import triton.language as tl


@triton.jit
def exp(x):
    return tl.exp(x)


@triton.jit
def exp2(x):
    return tl.exp2(x)


@triton.jit
def log(x):
    return tl.log(x)


@triton.jit
def log2(x):
    return tl.log2(x)
