"""Roofline performance sweeps (DESIGN.md section 6).

models.py     FLOP and byte models of each op, with their derivations
ceilings.py   ceilings measured at the start of every run; datasheet peaks
providers.py  the implementations timed (ours, flash-linear-attention, FlashKDA, SDPA,
              the reference tiers), behind one adapter mechanism
verify.py     the check before timing (sampled tail against the float64 oracle)
timing.py     do_bench medians on a GPU, wall-clock medians on a CPU; peak memory
sweep.py      presets, one row per case, the run's environment
plugin.py     pytest plugin: options, progress bar, perf.json
bench_kda.py  the sweep as pytest-benchmark tests
report.py     perf.json -> README.md with figures
"""
