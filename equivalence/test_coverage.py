"""The suite reaches what it claims to: every class of CLASSES on every run (by explicit
examples, not by luck), and the README's "what the suite draws" tables are the ones the
strategies generate today."""

from __future__ import annotations

from pathlib import Path

import pytest
from kdaverify.equivalence.coverage import CLASSES, END, START, markdown, used_families
from kdaverify.equivalence.relations import CHECKS
from kdaverify.equivalence.strategies import DEFAULT_CAPS, EXAMPLES, examples_for

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", list(CLASSES))
def test_class_reached_by_an_explicit_example(name):
    """Each class is reached on every run of every profile (ci included): some explicit
    example of a family that a check draws from lies in it."""
    specs = [s for f in used_families() for s in examples_for(f, DEFAULT_CAPS)]
    assert any(CLASSES[name](s) for s in specs), f"no explicit example reaches {name!r}"


def test_examples_belong_to_used_families():
    """An explicit example that no check runs would count toward coverage without running."""
    assert set(EXAMPLES) <= set(used_families()), sorted(set(EXAMPLES) - set(used_families()))


def test_argument_paths_are_checked():
    """The argument paths of the contract each have their check (issue 12)."""
    for name in ("final_state_not_requested", "initial_state_zeros", "default_scale", "scale_zero", "call_forms"):
        assert name in CHECKS


def test_readme_tables_are_current():
    """README.md holds what `python -m kdaverify.equivalence.coverage` prints; regenerate
    with `python -m kdaverify.equivalence.coverage --write README.md`."""
    if not README.exists():
        pytest.skip("not applicable: README.md is not here (an installed copy, not a source checkout)")
    text = README.read_text()
    section = text[text.index(START) : text.index(END) + len(END)]
    assert section == markdown(), "README.md's generated tables are stale: run the coverage module with --write"
