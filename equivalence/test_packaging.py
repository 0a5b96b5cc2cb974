"""kdaverify as other projects install it: one wheel, one namespace, a command and a plugin.

From a copy of the source checkout's tracked files this test builds the sdist and, from it, the wheel (python -m build,
without isolation: the test environment already has setuptools), checks that nothing lands
under a top-level name other than `kdaverify`, installs the wheel into a fresh virtual
environment outside the repository, and there runs `kdaverify verify` and
`pytest --kda-impl=...` against a callable in a throwaway package, and a host test that
reuses one check through the `kdaverify` marker. The fresh environment gets the run-time
dependencies (torch, numpy, pytest, hypothesis, tqdm) from this one through a .pth file, so
nothing is downloaded; kdaverify itself comes only from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import kdaverify

ROOT = Path(kdaverify.__file__).resolve().parent.parent
checkout = pytest.mark.skipif(
    not (ROOT / "pyproject.toml").exists(), reason="needs kdaverify's source checkout (pyproject.toml) to build from"
)
# one xdist worker builds and installs once (nox runs pytest with --dist=loadgroup)
pytestmark = pytest.mark.xdist_group("packaging")
TOP_LEVEL = {"kdaverify"}
CHECKS = "oracle-float32 or causality-float32"  # two checks: the install is what is tested here


def _run(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc) -> None:
    # head and tail: a build's first lines say what it found, its last ones how it failed
    out = proc.stdout if len(proc.stdout) < 8000 else proc.stdout[:3000] + "\n[...]\n" + proc.stdout[-5000:]
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr[-6000:]}"


def _tracked_files(root: Path) -> list[str]:
    """The files a clean clone has: git's list when this is a git checkout, otherwise every
    file outside build products and virtual environments."""
    proc = _run(["git", "-C", str(root), "ls-files", "-z"], cwd=root) if (root / ".git").exists() else None
    if proc is not None and proc.returncode == 0 and proc.stdout:
        return [f for f in proc.stdout.split("\0") if f and (root / f).is_file()]
    skip = {".git", ".nox", ".venv", "build", "dist", "__pycache__"}
    return [
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not (skip & set(p.relative_to(root).parts)) and ".egg-info" not in str(p)
    ]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    # Build from a copy of the tracked files, never in the checkout itself: setuptools writes
    # build/, *.egg-info and the release tree into the source folder, and what an editable
    # install or an earlier build left there must not decide what the sdist holds.
    src = tmp_path_factory.mktemp("src")
    for name in _tracked_files(ROOT):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    _ok(_run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)], cwd=out))
    wheel = next(out.glob("kdaverify-*.whl"))
    sdist = next(out.glob("kdaverify-*.tar.gz"))
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="module")
def fresh_env(dists, tmp_path_factory) -> dict:
    """A virtual environment with only the wheel installed; dependencies reach it by .pth."""
    base = tmp_path_factory.mktemp("fresh")
    venv = base / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base))
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base).stdout.strip()
    )
    before = set(os.listdir(site))
    _ok(_run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
              str(dists["wheel"])], cwd=base))  # fmt: skip
    installed = set(os.listdir(site)) - before
    (site / "zz-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    env.update(OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return {"venv": venv, "python": python, "site": site, "installed": installed, "env": env, "base": base}


@checkout
def test_wheel_has_one_top_level_package(dists):
    names = zipfile.ZipFile(dists["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == TOP_LEVEL, f"the wheel installs top-level names {sorted(tops)}"
    for sub in ("reference", "kernels", "equivalence", "perf"):
        assert f"kdaverify/{sub}/__init__.py" in names, f"kdaverify.{sub} missing from the wheel"
    meta = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(dists["wheel"]).read(meta).decode()
    assert "[pytest11]" in entry_points and "kdaverify.equivalence.plugin" in entry_points
    assert "kdaverify = kdaverify.cli:main" in entry_points


@checkout
def test_sdist_keeps_the_repository_layout(dists):
    names = tarfile.open(dists["sdist"]).getnames()
    root = names[0].split("/")[0]
    for path in (
        "pyproject.toml",
        "reference/kda.py",
        "equivalence/plugin.py",
        "kernels/__init__.py",
        "kdaverify/cli.py",
    ):
        assert f"{root}/{path}" in names, f"{path} missing from the sdist"


@checkout
def test_fresh_environment_holds_only_kdaverify(fresh_env):
    tops = {n for n in fresh_env["installed"] if not n.endswith(".dist-info")}
    assert tops == TOP_LEVEL, f"installing the wheel added {sorted(tops)} to site-packages"
    where = _run([str(fresh_env["python"]), "-c", "import kdaverify.reference as r; print(r.__file__)"],
                 cwd=fresh_env["base"], env=fresh_env["env"])  # fmt: skip
    _ok(where)
    assert where.stdout.strip().startswith(str(fresh_env["site"])), where.stdout


@checkout
def test_command_verifies_from_the_wheel(fresh_env):
    out = fresh_env["base"] / "report"
    junit = fresh_env["base"] / "junit.xml"
    cmd = [str(fresh_env["venv"] / "bin" / "kdaverify"), "verify", "kdaverify.equivalence.adapters:reference_chunk_kda",
           "--profile=ci", f"--out={out}", f"--junitxml={junit}", "--", "-k", CHECKS]  # fmt: skip
    proc = _run(cmd, cwd=fresh_env["base"], env=fresh_env["env"])
    _ok(proc)
    report = json.loads((out / "report.json").read_text())
    assert report["conforms"] and report["counts"]["passed"] == 2, report["counts"]
    assert junit.exists()


THROWAWAY = """
from kdaverify.equivalence.adapters import reference_recurrent_kda


def my_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    return reference_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def wrong_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    return my_kda(q, k, v, g, beta, None, initial_state, output_final_state, cu_seqlens)  # ignores scale


def raising_kda(*args, **kwargs):
    raise RuntimeError("boom: this kernel raises")
"""

HOST_TEST = """
import pytest

from kdaverify.equivalence.cases import CaseSpec


@pytest.mark.kdaverify(impl="throwaway_kda:my_kda", head_sizes=(16,))
def test_state_split_on_my_kernel(kda_check):
    kda_check("state_split", spec=CaseSpec(T=70, K=16, V=16, h0=True, seed=3))
"""


@pytest.fixture(scope="module")
def host_project(fresh_env) -> Path:
    proj = fresh_env["base"] / "host"
    (proj / "throwaway_kda").mkdir(parents=True)
    (proj / "throwaway_kda" / "__init__.py").write_text(textwrap.dedent(THROWAWAY))
    (proj / "tests").mkdir()
    (proj / "tests" / "test_host.py").write_text(textwrap.dedent(HOST_TEST))
    return proj


def _host_pytest(fresh_env, proj, *args) -> subprocess.CompletedProcess:
    env = dict(fresh_env["env"], PYTHONPATH=str(proj))
    return _run([str(fresh_env["python"]), "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=proj, env=env)


@checkout
def test_plugin_runs_the_suite_in_a_host_project(fresh_env, host_project):
    good = _host_pytest(fresh_env, host_project, "--kda-impl=throwaway_kda:my_kda", "--kda-profile=ci", "-k", CHECKS)
    _ok(good)
    assert "2 passed" in good.stdout and "verdict: conforms" in good.stdout, good.stdout[-3000:]
    wrong = _host_pytest(
        fresh_env, host_project, "--kda-impl=throwaway_kda:wrong_kda", "--kda-profile=ci", "-k", CHECKS
    )
    assert wrong.returncode == 1 and "FAILED oracle [float32]" in wrong.stdout, wrong.stdout[-3000:]


@checkout
def test_a_raising_callable_fails_its_checks_not_the_run(fresh_env, host_project):
    proc = _host_pytest(
        fresh_env, host_project, "--kda-impl=throwaway_kda:raising_kda", "--kda-profile=ci", "-k", CHECKS
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "2 failed" in proc.stdout and "RuntimeError" in proc.stdout, proc.stdout[-3000:]


@checkout
def test_host_tests_reuse_one_check(fresh_env, host_project):
    _ok(_host_pytest(fresh_env, host_project, "tests"))


@checkout
def test_plugin_is_inert_without_kda_impl(fresh_env, host_project):
    """Without --kda-impl the host's own run collects only its own tests and imports no torch."""
    proc = _host_pytest(fresh_env, host_project, "--collect-only", "tests")
    _ok(proc)
    assert "test_conformance" not in proc.stdout
    probe = "import sys, pytest; pytest.main(['--co', '-q', 'tests']); print('torch' in sys.modules)"
    env = dict(fresh_env["env"], PYTHONPATH=str(host_project))
    out = _run([str(fresh_env["python"]), "-c", probe], cwd=host_project, env=env)
    assert out.stdout.strip().endswith("False"), out.stdout[-2000:]
