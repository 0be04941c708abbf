"""The press registry and the harness CLI reject bad input before any model is loaded."""

from __future__ import annotations

import pytest
from kvpress import BasePress

from pikvpress_eval.__main__ import main
from pikvpress_eval.presses import BASELINES, build_press, press_names


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_name_builds_a_fresh_press(name):
    a, b = build_press(name, 0.25), build_press(name, 0.25)
    assert isinstance(a, BasePress) and a is not b
    assert a.compression_ratio == pytest.approx(0.25)


def test_no_press_is_none():
    assert build_press("no_press") is None


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="compression_ratio must be in \\[0, 1\\)"):
        build_press("knorm", ratio)


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as info:
        build_press("snapkvv", 0.5)
    assert "snapkvv" in str(info.value) and all(name in str(info.value) for name in press_names())


def test_unknown_field():
    with pytest.raises(ValueError, match="no field 'windw_size'"):
        build_press("snapkv", 0.5, windw_size=3)
    assert build_press("snapkv", 0.5, window_size=3).window_size == 3


def test_cli_fails_before_loading_a_model(monkeypatch):
    import pikvpress.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(pikvpress.models, "load_model", no_loading)
    with pytest.raises(ValueError, match="press_name: unknown 'nonsense'"):
        main(["quick", "press_name=[no_press,nonsense]"])
    with pytest.raises(ValueError, match="compression_ratio"):
        main(["run", "compression_ratio=1.2"])
