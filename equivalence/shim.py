"""Load a serving engine's kernel modules without importing the engine (issue 11).

SGLang's and vLLM's KDA kernels live in ordinary Python files inside packages whose
`__init__` imports the whole engine (schedulers, model registries, HTTP servers, dozens of
optional dependencies). The kernels themselves need torch, Triton and a handful of small
helpers. A shim:

1. finds the package's files: the folder or wheel named by an environment variable
   (`KDAVERIFY_SGLANG`, `KDAVERIFY_VLLM`; a wheel is unpacked once into a cache folder),
   else the installed package's folder (`pip install sglang==0.5.23 --no-deps` puts the
   files there without the engine's dependencies); importlib.util.find_spec locates a
   top-level package without running its `__init__`;
2. registers every parent package of the kernel module as an empty package whose
   `__path__` is the real folder, so `import a.b.c` runs c's file but none of the
   `__init__` files above it;
3. registers stub modules for the few engine helpers the kernel files import (platform
   queries, ceil division): each stub is written here, from what the helper returns on the
   platform at hand, never copied.

Nothing here imports torch at module level: the matrix generator and the tests of the
usage errors import it on machines without either engine.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "KDAVERIFY_CACHE"


@dataclass(frozen=True)
class Source:
    """Where an engine's kernel files come from.

    package: the top-level import name. env: the environment variable that may name a
    wheel or an unpacked folder. version: the release the adapters were written against.
    install: the command that makes the files available."""

    package: str
    env: str
    version: str

    @property
    def install(self) -> str:
        return (
            f"pip download {self.package}=={self.version} --no-deps -d DIR and set {self.env}=DIR/<the wheel>, "
            f"or pip install {self.package}=={self.version} --no-deps (only its kernel files are loaded)"
        )


SGLANG = Source("sglang", "KDAVERIFY_SGLANG", "0.5.23")
VLLM = Source("vllm", "KDAVERIFY_VLLM", "0.33.0")
SOURCES = {s.package: s for s in (SGLANG, VLLM)}


class SourceMissing(ImportError):
    """The engine's files are not available; the message names the install command."""


def _cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kdaverify")
    return Path(base) / "wheels"


def unpack_wheel(wheel: Path, package: str) -> Path:
    """The folder holding `package/` unpacked from wheel (its .py files and the wheel's
    METADATA, once; later calls reuse it)."""
    target = _cache_dir() / wheel.name.removesuffix(".whl")
    if (target / package).is_dir():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    with zipfile.ZipFile(wheel) as zf:
        # the Python files and the metadata only: compiled extensions are never imported
        names = [
            n
            for n in zf.namelist()
            if (n.startswith(f"{package}/") and n.endswith(".py")) or n.endswith(".dist-info/METADATA")
        ]
        zf.extractall(partial, names)
    if target.exists():  # another process unpacked it meanwhile
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.replace(target)
    return target


def package_root(source: Source) -> Path:
    """The folder that contains source.package's folder, or SourceMissing."""
    given = os.environ.get(source.env)
    if given:
        path = Path(given)
        if path.is_file() and path.suffix == ".whl":
            return unpack_wheel(path, source.package)
        if (path / source.package).is_dir():
            return path
        if path.name == source.package and path.is_dir():
            return path.parent
        raise SourceMissing(
            f"{source.env}={given}: expected a {source.package} wheel or a folder holding {source.package}/"
        )
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissing(f"{source.package}'s kernel files are not available; {source.install}")
    return Path(next(iter(spec.submodule_search_locations))).parent


def available(source: Source) -> None:
    """Raise SourceMissing (an ImportError naming the install command) unless the files are there."""
    package_root(source)


def version(source: Source) -> str | None:
    """The version of the files package_root finds (from the wheel's dist-info), or None."""
    try:
        root = package_root(source)
    except ImportError:
        return None
    for meta in sorted(root.glob(f"{source.package}-*.dist-info/METADATA")):
        m = re.search(r"^Version: (\S+)$", meta.read_text(errors="replace"), re.M)
        if m:
            return m.group(1)
    return None


def _package(name: str, path: Path, root: Path) -> types.ModuleType:
    mod = types.ModuleType(name, f"kdaverify shim: {name} from {path}, its __init__ not run")
    mod.__path__ = [str(path)]
    mod.__package__ = name
    mod.__kdaverify_shim__ = str(root)
    return mod


def _register(name: str, mod: types.ModuleType) -> None:
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, mod)


def _package_with_init(name: str, path: Path, root: Path) -> types.ModuleType:
    """The package `name` with its own __init__.py run (registered before it runs, as an
    import does)."""
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    mod = importlib.util.module_from_spec(spec)
    mod.__kdaverify_shim__ = str(root)
    _register(name, mod)
    spec.loader.exec_module(mod)
    return mod


def load(
    source: Source, module: str, stubs: dict[str, dict] | None = None, run_init: tuple[str, ...] = ()
) -> types.ModuleType:
    """Import `module` (a dotted name inside source.package) from its file, with its parent
    packages registered empty and the modules in stubs ({name: {attribute: value}})
    registered as given. The packages named in run_init run their own __init__.py: those
    whose kernel files import a constant from it and whose __init__ imports nothing of the
    engine (SGLang's helion/__init__.py holds KDA_SMALL_VALUE_HEAD_THRESHOLD, which
    helion/kda_decode.py imports). Modules already imported (the real engine, or an earlier
    load) are left as they are."""
    root = package_root(source)
    parts = module.split(".")
    if parts[0] != source.package:
        raise ValueError(f"module: expected a module inside {source.package}, got {module!r}")
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        have = sys.modules.get(name)
        if have is None and name in run_init:
            _package_with_init(name, root.joinpath(*parts[:i]), root)
        elif have is None:
            _register(name, _package(name, root.joinpath(*parts[:i]), root))
        elif getattr(have, "__kdaverify_shim__", str(root)) != str(root):
            raise ImportError(f"{name} was already loaded from {have.__kdaverify_shim__}, not from {root}")
    for name, attrs in sorted((stubs or {}).items()):  # parents before their submodules
        if name in sys.modules:
            continue
        stub = types.ModuleType(name, f"kdaverify stub for {name}")
        stub.__path__ = []  # a package, so stubbed submodules below it can be registered
        stub.__dict__.update(attrs)
        for j in range(1, name.count(".") + 1):
            parent = name.rsplit(".", j)[0]
            if parent not in sys.modules:
                _register(parent, _package(parent, root.joinpath(*parent.split(".")), root))
        _register(name, stub)
    return importlib.import_module(module)
