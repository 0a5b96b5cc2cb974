"""kdaverify tuning: Triton's autotuning results carried between machines (equivalence/tuning.py)."""

from __future__ import annotations

import io
import tarfile

import pytest
from kdaverify.equivalence import tuning

from kdaverify.cli import main


def _cache(root):
    """A Triton cache as a tuning run leaves it: two results, a compiled kernel, a stray file."""
    (root / "aa11").mkdir(parents=True)
    (root / "aa11" / "chunk_fwd.autotune.json").write_text('{"key": [64], "configs_timings": []}')
    (root / "bb22").mkdir()
    (root / "bb22" / "chunk_bwd.autotune.json").write_text('{"key": [128], "configs_timings": []}')
    (root / "bb22" / "chunk_bwd.cubin").write_bytes(b"\x7fELF")
    (root / "notes.txt").write_text("not a tuning result")
    return root


def test_export_then_import_carries_only_the_tuning_results(tmp_path):
    cache = _cache(tmp_path / "cache")
    archive = tmp_path / "tuning.tar.gz"
    assert main(["tuning", "export", str(archive), "--cache-dir", str(cache)]) == 0
    fresh = tmp_path / "fresh"
    (fresh / "bb22").mkdir(parents=True)
    (fresh / "bb22" / "chunk_bwd.autotune.json").write_text("kept")  # already there: not overwritten
    assert tuning.import_(archive, fresh) == 2
    assert (fresh / "aa11" / "chunk_fwd.autotune.json").read_text() == '{"key": [64], "configs_timings": []}'
    assert (fresh / "bb22" / "chunk_bwd.autotune.json").read_text() == "kept"
    assert not (fresh / "bb22" / "chunk_bwd.cubin").exists() and not (fresh / "notes.txt").exists()


def test_an_empty_or_missing_cache_exports_nothing(tmp_path):
    assert tuning.export(tmp_path / "t.tar.gz", tmp_path / "nowhere") == 0
    assert tuning.import_(tmp_path / "t.tar.gz", tmp_path / "fresh") == 0


@pytest.mark.parametrize(
    "name, kind",
    [("../escape.autotune.json", tarfile.REGTYPE), ("/abs/x.autotune.json", tarfile.REGTYPE),
     ("aa11/x.cubin", tarfile.REGTYPE), ("aa11/x.autotune.json", tarfile.SYMTYPE),
     ("x.autotune.json", tarfile.REGTYPE)],
)  # fmt: skip
def test_an_archive_with_anything_else_is_refused_before_writing(tmp_path, name, kind):
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        good = tarfile.TarInfo("cc33/ok.autotune.json")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"{}"))
        bad = tarfile.TarInfo(name)
        bad.type = kind
        if kind == tarfile.SYMTYPE:
            bad.linkname = "/etc/passwd"
        else:
            bad.size = 2
        tar.addfile(bad, io.BytesIO(b"{}") if kind == tarfile.REGTYPE else None)
    with pytest.raises(SystemExit, match="tuning: file: expected only"):
        main(["tuning", "import", str(archive), "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "cache").exists()
