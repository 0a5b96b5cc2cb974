"""The kill table's bookkeeping: every negative control names the checks it exists for, and
those checks exist (the full and the targeted kill table both rely on it)."""

from __future__ import annotations

from kdaverify.equivalence.killtable import selection
from kdaverify.equivalence.mutants import MEANT_FOR, MUTANTS
from kdaverify.equivalence.relations import CHECKS


def test_every_mutant_is_meant_for_existing_checks():
    assert set(MEANT_FOR) == set(MUTANTS), set(MEANT_FOR) ^ set(MUTANTS)
    unknown = {n: [c for c in cs if c not in CHECKS] for n, cs in MEANT_FOR.items()}
    assert not any(unknown.values()), unknown


def test_selection_picks_exactly_the_named_checks():
    expr = selection(("oracle", "state_split"))
    ids = [f"test_conformance[{c}-float32]" for c in CHECKS]
    chosen = [i for i in ids if any(part.strip() in i for part in expr.split(" or "))]
    assert chosen == ["test_conformance[oracle-float32]", "test_conformance[state_split-float32]"]


def test_command_line_passes_targeted():
    from kdaverify.cli import parser

    args = parser().parse_args(["mutants", "--targeted", "--jobs", "1"])
    assert args.targeted and args.jobs == 1
