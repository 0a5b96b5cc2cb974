"""Autotuning results carried from one machine to the next (issue 10: a fast GPU run).

A kernel under @triton.autotune compiles and times every config at each new tuning key; for
flash-linear-attention's chunk_kda that is most of a cold conformance run (its first fp32
gradient check spent about 430 s on an H200, thirteenth session). With Triton's on-disk
autotuning cache on (TRITON_CACHE_AUTOTUNING=1, which the plugin sets on CUDA), each tuning
leaves `<cache>/<hash>/<kernel>.autotune.json`: the configs and their timings, read back
before any benchmark at the same key. The hash (Triton 3.6, runtime/autotuner.py) covers
Triton's version, the target (e.g. cuda 90), the kernel's source, the cache-invalidating
environment variables, the tuning key and the config list: nothing of the machine itself,
so the files tuned on one H200 serve another H200 with the same software, and a fresh
machine then compiles only each key's chosen config.

    kdaverify tuning export FILE.tar.gz    # after a run: every *.autotune.json of the cache
    kdaverify tuning import FILE.tar.gz    # on a fresh machine, before the run

The cache is TRITON_CACHE_DIR or Triton's default (triton.knobs.cache.dir). Only autotuning
results travel (kilobytes; the compiled kernels stay behind, they are per machine anyway).
A run that reads carried results has skipped the timing, not the checking: every kernel is
still compiled and checked as it runs, at the config the earlier tuning chose.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath

SUFFIX = ".autotune.json"


def cache_dir() -> Path:
    """Triton's cache folder: TRITON_CACHE_DIR, else Triton's default."""
    import triton

    return Path(triton.knobs.cache.dir)


def export(path: str | Path, cache: str | Path | None = None) -> int:
    """Write every autotuning result under the cache into the tar.gz at path; their count."""
    cache = Path(cache) if cache else cache_dir()
    files = sorted(cache.rglob(f"*{SUFFIX}")) if cache.is_dir() else []
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.relative_to(cache).as_posix(), recursive=False)
    return len(files)


def _member_ok(member: tarfile.TarInfo) -> bool:
    """A regular file <hash>/<name>.autotune.json: no links, no absolute or parent paths."""
    parts = PurePosixPath(member.name).parts
    return (
        member.isfile()
        and len(parts) == 2
        and member.name.endswith(SUFFIX)
        and not any(p in ("", ".", "..") for p in parts)
        and not member.name.startswith("/")
    )


def import_(path: str | Path, cache: str | Path | None = None) -> int:
    """Unpack the autotuning results of the tar.gz at path into the cache; their count.
    Anything else in the archive (another file name, a link, a path that leaves the cache)
    raises ValueError before a file is written."""
    cache = Path(cache) if cache else cache_dir()
    with tarfile.open(path, "r:gz") as tar:
        members = tar.getmembers()
        bad = [m.name for m in members if not _member_ok(m)]
        if bad:
            raise ValueError(f"file: expected only <hash>/<kernel>{SUFFIX} entries, got {bad[:3]}")
        for m in members:
            target = cache / m.name
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(m).read()
            if not target.exists():  # a result already in the cache stays as it is
                target.write_bytes(data)
    return len(members)
