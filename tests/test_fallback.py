"""The fallback state machine: approximate → recompute after `patience` bad audits, and back."""

import math

import pytest

from areal_a3po.fallback import APPROXIMATE, RECOMPUTE, FallbackState


def test_off_by_default_never_switches():
    s = FallbackState()
    assert not s.enabled
    assert s.observe(1e9, step=0) is None and s.mode == APPROXIMATE


def test_switches_after_patience_consecutive_bad_audits():
    s = FallbackState(threshold=0.1, patience=2)
    assert s.observe(0.2, step=1) is None  # bad 1
    assert s.observe(0.05, step=2) is None  # clean: streak resets
    assert s.observe(0.2, step=3) is None  # bad 1
    t = s.observe(0.3, step=4)  # bad 2 -> switch
    assert t is not None and t.mode == RECOMPUTE and t.step == 4 and t.streak == 2
    assert s.recomputing
    assert "step 4" in t.message() and "abs_error=0.3" in t.message() and "threshold=0.1" in t.message()


def test_value_equal_to_threshold_is_clean_and_nan_is_bad():
    s = FallbackState(threshold=0.1)
    assert s.observe(0.1, step=0) is None and s.mode == APPROXIMATE
    assert s.observe(math.nan, step=1).mode == RECOMPUTE


def test_recover_after_clean_steps_and_zero_means_stay():
    s = FallbackState(threshold=0.1, recover_after=2)
    s.observe(1.0, step=0)
    assert s.observe(0.0, step=1) is None  # clean 1
    assert s.observe(0.5, step=2) is None  # bad: clean streak resets
    assert s.observe(0.0, step=3) is None
    t = s.observe(0.0, step=4)
    assert t.mode == APPROXIMATE and "recovered at step 4" in t.message()

    stay = FallbackState(threshold=0.1, recover_after=0)
    stay.observe(1.0, step=0)
    for step in range(1, 20):
        assert stay.observe(0.0, step=step) is None
    assert stay.recomputing


def test_state_dict_round_trip_keeps_mode_and_streaks():
    s = FallbackState(threshold=0.1, patience=3)
    s.observe(1.0, step=0)
    s.observe(1.0, step=1)  # bad streak 2 of 3
    r = FallbackState(threshold=0.1, patience=3)
    r.load_state_dict(s.state_dict())
    assert r.observe(1.0, step=2).mode == RECOMPUTE  # the third bad audit switches
    back = FallbackState(threshold=0.1)
    back.load_state_dict(r.state_dict())
    assert back.recomputing and back.transitions == [{"step": 2, "mode": RECOMPUTE, "value": 1.0}]


def test_loading_a_bad_state_names_the_problem():
    with pytest.raises(ValueError, match="fallback state has mode='sideways'"):
        FallbackState().load_state_dict({"mode": "sideways"})
