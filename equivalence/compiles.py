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

    @property
    def compiles(self) -> int:
        return sum(self.kernels.values())

    def _lock(self, name: str, key) -> None:
        self._unlock()  # compiles do not nest: a lock still held is from a compile that raised
        if self._lock_dir is None:
            return
        digest = hashlib.sha256(f"{name}\n{key}".encode()).hexdigest()[:32]
        f = open(self._lock_dir / digest, "a")
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
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

    def __enter__(self):
        try:
            from triton import knobs
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
        return self

    def __exit__(self, *exc):
        for f in self._locks.values():
            f.close()
        self._locks.clear()
        if self._saved is not None:
            from triton import knobs

            knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._saved
        return False
