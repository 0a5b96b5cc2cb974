"""Which Hypothesis profile a run gets (equivalence/profiles.py)."""

from __future__ import annotations

import pytest
from kdaverify.equivalence.profiles import PROFILE_ENV, resolve


def test_the_default_follows_the_device(monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert resolve(None, "cpu") == "dev"
    assert resolve(None, None) == "dev"
    assert resolve(None, "cuda") == resolve(None, "cuda:1") == "gpu"


def test_an_option_or_the_environment_wins_over_the_device(monkeypatch):
    monkeypatch.setenv(PROFILE_ENV, "deep")
    assert resolve(None, "cuda") == "deep"
    assert resolve("ci", "cuda") == "ci"


def test_an_unknown_profile_is_named(monkeypatch):
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    with pytest.raises(ValueError, match="--kda-profile: expected one of"):
        resolve("fast", "cuda")
