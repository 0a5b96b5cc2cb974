"""Triton compiles during a check: how many, how long (issue 10: where a GPU run's time goes),
and one compile per kernel specialization across pytest-xdist workers instead of one each.

Triton compiles a @triton.jit function once per specialization: each new set of constexpr
values, argument dtypes, and integer or pointer attributes (== 1, divisible by 16, 16-byte
aligned). A conformance run draws many shapes, so a kernel may compile dozens of times, and
on a GPU that costs far more than running it. Measured on an H100 (our chunk_kda, profile
gpu, 12 workers): the gradient checks spent 2226 s of their 2287 s inside the implementation
compiling (802 compiles; chunk_grads alone 151, 11.5 s each), the forward checks 542 of 557 s.

CompileClock times each compile between Triton's two JIT hooks (knobs.runtime.jit_cache_hook,
called before a compile, and jit_post_compile_hook after it), so a load from Triton's on-disk
cache counts too (milliseconds where a compile takes seconds). Workers share that cache, but
Triton has no lock: workers that meet the same new specialization at once all compile it.
So, where the platform has POSIX file locks, the clock holds a lock per (kernel,
specialization) while one compiles; the others wait for it and then load its result from the
disk cache.

Autotuning is the other per-shape cost (a kernel under @triton.autotune compiles and times
every config at each new key). With Triton's on-disk autotuning cache on (the plugin sets
TRITON_CACHE_AUTOTUNING=1 on CUDA), the clock also holds a lock per (kernel, tuning key)
while one worker tunes: the others wait and then read its result from the disk cache,
instead of all timing the same configs at once on one GPU. It counts the tunings and their
seconds (their compiles included) beside the compiles.

Under the interpreter nothing compiles and the clock reads zero. With KDAVERIFY_COMPILE_LOG
set to a file, every compile appends one line there: seconds, the kernel, its constexpr values
and the argument attributes Triton specialized on (which one changed shows why it compiled).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from pathlib import Path

try:
    import fcntl
except ImportError:  # no POSIX locks: workers may compile the same kernel twice, nothing worse
    fcntl = None

# A worker waits at most this long for another's compile of the same kernel, then compiles it
# itself (a compile that raised leaves its lock to the end of that worker's check).
LOCK_WAIT_S = 300.0


class CompileClock:
    """Counts and times the Triton compiles inside `with clock:` (one clock at a time per
    process; the hooks it replaces are called too and put back on exit)."""

    def __init__(self):
        self.seconds = 0.0
        self.kernels: Counter[str] = Counter()  # compiles per kernel name
        self._started: dict[tuple[int, object], float] = {}
        self._locks: dict[int, object] = {}  # per thread: the lock file held during its compile
        self._lock_dir: Path | None = None
        self._saved = None
        self.tunes: Counter[str] = Counter()  # autotunings that timed configs, per kernel name
        self.tune_seconds = 0.0  # their time, compiles of the configs included
        self._saved_tuner = None

    @property
    def compiles(self) -> int:
        return sum(self.kernels.values())

    def _acquire(self, what: str):
        """The lock file for `what`, held (or after LOCK_WAIT_S, not held), or None."""
        if self._lock_dir is None:
            return None
        digest = hashlib.sha256(what.encode()).hexdigest()[:32]
        f = open(self._lock_dir / digest, "a")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return f
                time.sleep(0.05)

    def _lock(self, name: str, key) -> None:
        self._unlock()  # compiles do not nest: a lock still held is from a compile that raised
        f = self._acquire(f"{name}\n{key}")
        if f is not None:
            self._locks[threading.get_ident()] = f

    def _unlock(self) -> None:
        f = self._locks.pop(threading.get_ident(), None)
        if f is not None:
            f.close()  # closing the file releases its lock

    def _before(self, **kw):
        self._lock(kw["fn"].name, kw["key"])
        self._started[(threading.get_ident(), kw["key"])] = time.perf_counter()
        return self._saved[0](**kw) if self._saved[0] else False  # False: go on and compile

    def _after(self, **kw):
        started = self._started.pop((threading.get_ident(), kw["key"]), None)
        self._unlock()
        if started is not None:
            seconds = time.perf_counter() - started
            self.seconds += seconds
            self.kernels[kw["fn"].name] += 1
            log = os.environ.get("KDAVERIFY_COMPILE_LOG")
            if log:
                c = kw.get("compile", {})
                line = f"{seconds:.3f} {kw['fn'].name} {c.get('constants')} {c.get('configs')}"
                with open(log, "a") as f:
                    f.write(line.replace("\n", " ") + "\n")
        return self._saved[1](**kw) if self._saved[1] else None

    def _tuner(self, original):
        """Autotuner.check_disk_cache (tuning key -> True if read from the disk cache, else the
        configs are timed and stored) under a lock per (kernel, tuning key), timed."""
        clock = self

        def check_disk_cache(tuner, tuning_key, configs, bench_fn):
            name = getattr(getattr(tuner, "base_fn", None), "__name__", "?")
            # Triton times configs with a pre_hook (or an empty key) every time, never from the
            # disk: waiting for another worker would not spare this one the timing
            cacheable = bool(tuning_key) and not any(getattr(c, "pre_hook", None) for c in configs)
            f = clock._acquire(f"autotune\n{name}\n{tuning_key}") if cacheable else None
            started = time.perf_counter()
            try:
                cached = original(tuner, tuning_key, configs, bench_fn)
            finally:
                if f is not None:
                    f.close()
            if not cached:
                clock.tunes[name] += 1
                clock.tune_seconds += time.perf_counter() - started
            return cached

        return check_disk_cache

    def __enter__(self):
        try:
            from triton import knobs
            from triton.runtime.autotuner import Autotuner
        except ImportError:  # no Triton (a CPU-only torch): nothing can compile, the clock reads 0
            return self
        if fcntl is not None:
            try:
                self._lock_dir = Path(knobs.cache.dir) / "kdaverify-compile-locks"
                self._lock_dir.mkdir(parents=True, exist_ok=True)
            except OSError:  # a cache folder we cannot write to: count compiles, share nothing
                self._lock_dir = None
        self._saved = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._before, self._after
        self._saved_tuner = Autotuner.check_disk_cache
        Autotuner.check_disk_cache = self._tuner(self._saved_tuner)
        return self

    def __exit__(self, *exc):
        for f in self._locks.values():
            f.close()
        self._locks.clear()
        if self._saved is not None:
            from triton import knobs
            from triton.runtime.autotuner import Autotuner

            knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._saved
            Autotuner.check_disk_cache = self._saved_tuner
        return False
