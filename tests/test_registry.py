"""The press registry and the harness CLI reject bad input before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvpress import BasePress, ComposedPress, ThinKPress
from pikvpress_eval.__main__ import main
from pikvpress_eval.config import ConfigError, load_config
from pikvpress_eval.presses import (
    ALIASES,
    BASELINES,
    CHANNEL_PRUNING,
    EXCLUDED,
    MASKS_ONLY,
    NEEDS_HUB_WEIGHTS,
    build_press,
    press_names,
    takes_ratio,
)

#: every name of kvpress 0.5.5's evaluation/evaluate_registry.py PRESS_REGISTRY
KVPRESS_REGISTRY_NAMES = frozenset(
    {
        "adakv_snapkv",
        "block_keydiff",
        "chunkkv",
        "critical_adakv_expected_attention",
        "critical_adakv_snapkv",
        "critical_expected_attention",
        "critical_snapkv",
        "cur",
        "duo_attention",
        "duo_attention_on_the_fly",
        "entropy_gated_chunkkv",
        "expected_attention",
        "fastkvzip",
        "finch",
        "keydiff",
        "kvcompose",
        "kvcompose_unstructured",
        "kvgrad",
        "kvzip",
        "kvzip_plus",
        "kvzap_linear",
        "kvzap_mlp",
        "kvzap_mlp_head",
        "kvzap_mlp_layer",
        "lagkv",
        "lukv",
        "knorm",
        "observed_attention",
        "pyramidkv",
        "qfilter",
        "random",
        "RestoreKV",
        "RestoreKV_plus",
        "snap_think",
        "snapkv",
        "streaming_llm",
        "think",
        "tova",
        "compactor",
        "adakv_compactor",
        "no_press",
        "cam_streaming_llm",
        "cam_knorm",
        "cam_adakv_snapkv",
        "cam_tova",
        "decoding_knorm",
        "decoding_streaming_llm",
        "decoding_tova",
        "decoding_qfilter",
        "decoding_adakv_expected_attention_e2",
        "decoding_adakv_snapkv",
        "decoding_keydiff",
        "merging_knorm",
        "merging_snapkv",
        "merging_expected_attention",
        "merging_kvzap_mlp",
    }
)
DOCS = Path(__file__).parents[1] / "docs" / "baselines.md"


def sweep_ratio(press: BasePress) -> list[float]:
    """The ratios the sweep set in ``press``: the token ratio, or ThinK's key-channel ratio."""
    if isinstance(press, ComposedPress):
        return [r for part in press.presses for r in sweep_ratio(part)]
    if isinstance(press, ThinKPress):
        return [press.key_channel_compression_ratio]
    return [press.compression_ratio]


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.875])
@pytest.mark.parametrize("name", sorted([*BASELINES, *ALIASES]))
def test_every_name_builds_a_fresh_press(name, ratio):
    a, b = build_press(name, ratio), build_press(name, ratio)
    assert isinstance(a, BasePress) and a is not b
    assert sweep_ratio(a) and all(r == pytest.approx(ratio) for r in sweep_ratio(a))
    assert takes_ratio(name)


def test_think_prunes_the_sweep_ratio_of_key_channels():
    press = build_press("think", 0.5)
    assert press.key_channel_compression_ratio == 0.5 and press.compression_ratio == 0.25  # kvpress's own report


def test_aliases_build_the_press_they_name():
    assert set(ALIASES) == {"criticalkv", "critical_adakv", "block"}
    for alias, name in ALIASES.items():
        assert repr(build_press(alias, 0.5)) == repr(build_press(name, 0.5))
        assert (alias in MASKS_ONLY) == (name in MASKS_ONLY)


@pytest.mark.parametrize("name", sorted(NEEDS_HUB_WEIGHTS))
def test_presses_that_need_hub_weights_are_refused_with_the_reason(name):
    with pytest.raises(ValueError, match=f"press '{name}' needs hub weights") as info:
        build_press(name, 0.5)
    assert NEEDS_HUB_WEIGHTS[name] in str(info.value)
    assert name not in press_names()


@pytest.mark.parametrize("name", sorted(EXCLUDED))
def test_excluded_presses_are_refused_with_the_reason(name):
    with pytest.raises(ValueError, match=f"press '{name}' is not an offline prefill baseline") as info:
        build_press(name, 0.5)
    assert EXCLUDED[name] in str(info.value)


def test_every_kvpress_registry_name_is_accounted_for_and_documented():
    ours = {*BASELINES, "no_press"}
    for name in KVPRESS_REGISTRY_NAMES:
        assert [name in ours, name in NEEDS_HUB_WEIGHTS, name in EXCLUDED].count(True) == 1, name
    assert not (set(NEEDS_HUB_WEIGHTS) | set(EXCLUDED)) - KVPRESS_REGISTRY_NAMES
    text = DOCS.read_text()
    for name in sorted(KVPRESS_REGISTRY_NAMES | set(BASELINES) | set(ALIASES)):
        assert f"`{name}`" in text, f"docs/baselines.md does not list {name}"


def test_memory_kinds_name_registered_baselines():
    assert MASKS_ONLY <= set(press_names()) and CHANNEL_PRUNING <= set(press_names())
    assert not MASKS_ONLY & CHANNEL_PRUNING
    assert {"kvzip", "expected_attention", "adakv_snapkv", "critical_adakv"} <= MASKS_ONLY
    assert "expected_attention_plain" not in MASKS_ONLY and CHANNEL_PRUNING == {"think"}


def test_a_config_naming_a_hub_weights_press_fails_before_any_model():
    with pytest.raises(ConfigError, match="qfilter"):
        load_config(None, ["press_name=qfilter", "compression_ratio=0.5"])


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


def cli_error(capsys, argv: list[str]) -> str:
    """The error ``main(argv)`` reports: a raised ValueError, or argparse's exit 2 with the message on stderr."""
    try:
        main(argv)
    except SystemExit as exit_:
        assert exit_.code == 2
        return capsys.readouterr().err
    except ValueError as err:
        return str(err)
    raise AssertionError(f"{argv} ran without an error")


def test_cli_fails_before_loading_a_model(monkeypatch, capsys):
    import pikvpress.models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(pikvpress.models, "load_model", no_loading)
    assert "press_name: unknown 'nonsense'" in cli_error(capsys, ["quick", "press_name=[no_press,nonsense]"])
    assert "compression_ratio" in cli_error(capsys, ["run", "compression_ratio=1.2"])
    assert "'kvzap_mlp'" in cli_error(capsys, ["run", "press_name=kvzap_mlp", "compression_ratio=0.5"])
