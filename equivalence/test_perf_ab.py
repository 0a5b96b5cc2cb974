"""perf/ab.py, the in-process A/B of chunk_kda's block choices, on the CPU under the interpreter."""

from __future__ import annotations

import kdaverify.kernels  # noqa: F401  (before triton: it sets TRITON_INTERPRET on a CPU)
import pytest
from kdaverify.kernels import kda_chunk
from kdaverify.perf import ab
from kdaverify.perf.providers import Case


def _case(mode: str) -> Case:
    return Case(B=1, T=20, H=1, HV=2, K=4, V=4, op="chunk", provider="ours", mode=mode, dtype="float32")


def test_rows_compare_every_config_with_the_baseline():
    before = kda_chunk.BLOCKS
    rows = ab.run({"DIAG_COLS": [16, 1]}, _case("fwd"), "cpu", rounds=1, budget_s=0.0)
    assert kda_chunk.BLOCKS is before, "the run must put the module's block sizes back"
    assert [r["DIAG_COLS"] for r in rows] == [16, 1]
    assert all(r["vs_baseline"] == {"o": "bitwise"} and r["ms"] > 0 for r in rows)  # the two forms agree bitwise


def test_forward_and_backward_compares_every_gradient():
    (row,) = ab.run({"GRADS_DIAG_COLS": [16]}, _case("fwdbwd"), "cpu", rounds=1, budget_s=0.0)
    assert set(row["vs_baseline"]) == {"o", "dq", "dk", "dv", "dg", "dbeta"}


def test_another_implementation_is_timed_on_the_same_inputs():
    """--with-fla's path, with our own chunk_kda standing in for fla's (no fla-core on the CPU)."""
    from kdaverify.kernels import chunk_kda

    rows = ab.run({"DIAG_COLS": [16]}, _case("fwd"), "cpu", rounds=1, budget_s=0.0, other=("stand-in", chunk_kda))
    assert [r.get("provider") for r in rows] == [None, "stand-in"]
    assert rows[1]["vs_baseline"] == {"o": "bitwise"} and rows[1]["ms"] > 0


def test_a_changed_output_is_reported():
    base = {"o": ab.torch.ones(3)}
    assert ab._compare({"o": ab.torch.tensor([1.0, 1.0, 2.0])}, base)["o"] == pytest.approx(1 / 3**0.5)
    assert ab._compare({"o": ab.torch.tensor([1.0, float("nan"), 1.0])}, base)["o"] == float("inf")


@pytest.mark.parametrize("bad", ["NOT_A_FIELD=1", "DIAG_COLS=", "DIAG_COLS=a,b"])
def test_bad_assignments_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as e:
        ab.main([bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("ChunkBlocks" in err or "integers" in err)
