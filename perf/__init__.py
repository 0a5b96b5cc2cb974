"""Roofline performance sweeps: FLOP/byte models, measured ceilings and pytest-benchmark
sweeps against the kernels people use today (DESIGN.md section 6). Empty until the first
kernel lands."""
