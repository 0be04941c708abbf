"""Press timing (``pikvpress_eval.timing``): every sweep point timed against no press, interleaved, merged on disk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pandas as pd
import pytest
import torch
from conftest import get_tiny_model
from kvpress import DecodingPress, KnormPress, PrefillDecodingPress
from kvpress.presses.base_press import is_prefilling
from pikvpress_eval import presses as registry
from pikvpress_eval import timing
from pikvpress_eval.config import ConfigError, load_config
from pikvpress_eval.timing import (
    TIMING,
    interleaved_order,
    measure_press_timing,
    prompt_groups,
    timing_points,
    write_timing,
)

import pikvpress.models
from pikvpress.models import tiny_tokenizer

SLEEP = 0.005  # seconds per attention layer of the tiny model (4 layers): far above a tiny prefill's noise


def tiny_rows(n: int = 2, lengths: tuple[int, ...] = (160,)) -> pd.DataFrame:
    """``n`` rows per context length: a byte-tokenized context of about that many tokens and a question."""
    rows = []
    for length in lengths:
        for i in range(n):
            context = "".join(chr(97 + (7 * j + 3 * i) % 26) for j in range(length - 40)) + "\n"
            rows.append({
                "context": context, "question": f"What is letter {i}?", "answer_prefix": "Answer:",
                "answer": ["a"], "max_new_tokens": 4, "task": "toy", "context_length": length,
            })
    return pd.DataFrame(rows)


def config_for(tmp_path, *extra: str):
    return load_config(None, ["dataset=needle", f"output_dir={tmp_path}", *extra])


@dataclass
class SleepyPress(KnormPress):
    """Knorm that sleeps in every forward hook call and counts the calls made while prefilling / decoding."""

    calls: dict | None = None

    def forward_hook(self, module, input, kwargs, output):
        phase = "prefill" if is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]) else "decode"
        self.calls[phase] += 1
        time.sleep(SLEEP)
        return super().forward_hook(module, input, kwargs, output)


@dataclass
class SleepyDecodingPress(DecodingPress):
    """A decoding press that sleeps in every hook call made while decoding (it never compresses here)."""

    def forward_hook(self, module, input, kwargs, output):
        if not is_prefilling(kwargs["cache_position"], kwargs["hidden_states"].shape[1]):
            time.sleep(SLEEP)
        return super().forward_hook(module, input, kwargs, output)


@pytest.fixture
def sleepy(monkeypatch):
    """Registers ``sleepy`` (sleeps while prefilling only) and ``sleepy_decoding`` (while decoding only)."""
    calls = {"prefill": 0, "decode": 0}
    monkeypatch.setitem(registry.BASELINES, "sleepy", lambda r: SleepyPress(compression_ratio=r, calls=calls))
    monkeypatch.setitem(
        registry.BASELINES, "sleepy_decoding",
        lambda r: PrefillDecodingPress(
            decoding_press=SleepyDecodingPress(KnormPress(), compression_interval=10_000, target_size=10_000)
        ),
    )
    return calls


# --- ordering ---------------------------------------------------------------------------------------------


def test_interleaved_order_rotates_every_round():
    points = [("no_press", 0.0), ("knorm", 0.5), ("snapkv", 0.5)]
    rounds = [interleaved_order(points, r) for r in range(4)]
    assert all(sorted(order) == sorted(points) for order in rounds)  # each round runs every point once
    assert [order[0] for order in rounds] == [points[0], points[1], points[2], points[0]]
    # over len(points) rounds, every point runs once in every position
    for position in range(len(points)):
        assert sorted(rounds[r][position] for r in range(3)) == sorted(points)
    assert interleaved_order([], 3) == []


def test_timing_points_put_no_press_first_once(tmp_path):
    config = config_for(tmp_path, "press_name=[snapkv, no_press, knorm]", "compression_ratio=[0.25, 0.5]")
    assert timing_points(config) == [
        ("no_press", 0.0), ("snapkv", 0.25), ("snapkv", 0.5), ("knorm", 0.25), ("knorm", 0.5)
    ]


def test_prompt_groups_take_the_first_rows_of_each_length():
    rows = tiny_rows(3, lengths=(160, 200))
    groups = prompt_groups(rows, 2)
    assert [(length, list(group.index)) for length, group in groups] == [(160, [0, 1]), (200, [3, 4])]
    assert [length for length, _ in prompt_groups(rows.drop(columns="context_length"), 2)] == [None]


# --- measurement ------------------------------------------------------------------------------------------


def test_every_point_is_timed_against_no_press(tmp_path):
    model = get_tiny_model("llama")
    config = config_for(tmp_path, "press_name=[knorm, snapkv]", "compression_ratio=[0.25, 0.5]")
    records = measure_press_timing(config, model, tiny_tokenizer(), tiny_rows(), prompts=2, decode_tokens=3)
    keys = [(r["press"], r["compression_ratio"], r["context_length"]) for r in records]
    assert sorted(keys) == sorted((name, ratio, 160) for name, ratio in timing_points(config))
    by_press = {(r["press"], r["compression_ratio"]): r for r in records}
    assert by_press[("no_press", 0.0)]["prefill_vs_no_press"] == 1.0
    assert by_press[("no_press", 0.0)]["decode_vs_no_press"] == 1.0
    for record in records:
        assert record["prefill_seconds"] > 0 and record["decode_seconds_per_token"] > 0
        assert record["prefill_vs_no_press"] > 0 and record["decode_vs_no_press"] > 0
        assert (record["prompts"], record["repeats"], record["decode_tokens"]) == (2, 1, 3)
        assert record["threads"] >= 1 and 120 < record["context_tokens"] < 160
    json.dumps(records)  # plain JSON types


def test_presses_run_interleaved_and_rotated(tmp_path, monkeypatch):
    """The presses actually built (and timed) follow the rotated round-robin, after one warm-up of each."""
    model = get_tiny_model("llama")
    config = config_for(tmp_path, "press_name=[knorm, snapkv]", "compression_ratio=[0.5]")
    built: list[str] = []
    build = config.build_press
    monkeypatch.setattr(config, "build_press", lambda name, ratio: built.append(name) or build(name, ratio))
    measure_press_timing(config, model, tiny_tokenizer(), tiny_rows(3), prompts=3, decode_tokens=1, repeats=2)
    names = ["no_press", "knorm", "snapkv"]
    warmup, rounds = built[:3], [built[3 + 3 * r: 6 + 3 * r] for r in range(6)]
    assert len(built) == 3 + 6 * 3 and warmup == names
    assert rounds == [names[r % 3:] + names[:r % 3] for r in range(6)]


def test_records_per_context_length(tmp_path):
    model = get_tiny_model("llama")
    config = config_for(tmp_path, "press_name=[knorm]", "compression_ratio=[0.5]")
    records = measure_press_timing(
        config, model, tiny_tokenizer(), tiny_rows(2, lengths=(120, 200)), prompts=1, decode_tokens=2
    )
    assert sorted((r["context_length"], r["press"]) for r in records) == [
        (120, "knorm"), (120, "no_press"), (200, "knorm"), (200, "no_press")
    ]
    assert all(r["prompts"] == 1 for r in records)


def test_a_press_slow_in_its_prefill_hook_measures_slower_prefill(tmp_path, sleepy):
    model = get_tiny_model("llama")
    config = config_for(tmp_path, "press_name=[sleepy]", "compression_ratio=[0.5]")
    records = measure_press_timing(config, model, tiny_tokenizer(), tiny_rows(), prompts=2, decode_tokens=4)
    by_press = {r["press"]: r for r in records}
    layers = model.config.num_hidden_layers
    assert by_press["sleepy"]["prefill_seconds"] >= layers * SLEEP
    assert by_press["sleepy"]["prefill_vs_no_press"] > 1.0
    # the press's own prefill ran (warm-up + 2 prompts, every layer), and it was not active while decoding
    assert sleepy == {"prefill": 3 * layers, "decode": 0}


def test_a_decoding_press_stays_active_while_decoding(tmp_path, sleepy):
    model = get_tiny_model("llama")
    config = config_for(tmp_path, "press_name=[sleepy_decoding]", "compression_ratio=[0.5]")
    records = measure_press_timing(config, model, tiny_tokenizer(), tiny_rows(), prompts=2, decode_tokens=4)
    by_press = {r["press"]: r for r in records}
    assert by_press["sleepy_decoding"]["decode_seconds_per_token"] >= model.config.num_hidden_layers * SLEEP
    assert by_press["sleepy_decoding"]["decode_vs_no_press"] > 1.0


def test_decode_positions_continue_from_the_context(monkeypatch):
    """The question starts at the context length and every step one position further (kvpress's pipeline)."""
    model = get_tiny_model("llama")
    seen: list[list[int]] = []

    def record(module, args, kwargs):
        if kwargs.get("position_ids") is not None:
            seen.append(kwargs["position_ids"][0].tolist())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        context_ids, question_ids = tiny_ids(50), tiny_ids(5)
        result = timing.time_press(model, KnormPress(0.5), context_ids, question_ids, decode_tokens=3)
    finally:
        handle.remove()
    assert seen == [[50, 51, 52, 53, 54], [55], [56], [57]]
    assert len(result.decode_seconds) == 3 and result.prefill_seconds > 0


def tiny_ids(n: int) -> torch.Tensor:
    return torch.arange(3, 3 + n).unsqueeze(0)


def test_bad_counts_are_rejected(tmp_path):
    config = config_for(tmp_path)
    with pytest.raises(ValueError, match="prompts must be at least 1"):
        measure_press_timing(config, None, None, tiny_rows(), prompts=0)


# --- timing.json ------------------------------------------------------------------------------------------


def record(press: str, ratio: float, length: int, seconds: float) -> dict:
    return {"press": press, "compression_ratio": ratio, "context_length": length, "prefill_seconds": seconds}


def test_write_timing_merges_by_press_ratio_and_length(tmp_path):
    config = config_for(tmp_path / "out")
    path = write_timing(config, [record("no_press", 0.0, 1024, 1.0), record("knorm", 0.5, 1024, 2.0)])
    assert path == tmp_path / "out" / TIMING
    write_timing(config, [record("no_press", 0.0, 2048, 3.0), record("knorm", 0.5, 1024, 4.0),
                          record("knorm", 0.25, 1024, 5.0)])
    stored = {(r["press"], r["compression_ratio"], r["context_length"]): r["prefill_seconds"]
              for r in json.loads(path.read_text())}
    assert stored == {
        ("no_press", 0.0, 1024): 1.0,   # kept: another length's rerun does not touch it
        ("knorm", 0.5, 1024): 4.0,      # replaced by the rerun
        ("no_press", 0.0, 2048): 3.0,
        ("knorm", 0.25, 1024): 5.0,
    }
    assert len(json.loads(path.read_text())) == 4


# --- command line -----------------------------------------------------------------------------------------


def test_timing_options_are_split_from_config_overrides():
    options, fields = timing.split_timing_options(["prompts=2", "press_name=[knorm]", "--decode-tokens=8"])
    assert options == {"prompts": 2, "decode_tokens": 8, "repeats": 1} and fields == ["press_name=[knorm]"]
    for bad in ("prompts=0", "repeats=two"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            timing.split_timing_options([bad])


def test_run_timing_writes_timing_json(tmp_path, monkeypatch):
    loads = []

    def load_model(name, **kwargs):
        loads.append(name)
        return get_tiny_model("llama"), tiny_tokenizer()

    monkeypatch.setattr(pikvpress.models, "load_model", load_model)
    base = ["dataset=needle", "context_length=160", "needle_depth=[0.5]", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="snapkw"):
        timing.run_timing(None, [*base, "press_name=[snapkw]"])
    assert loads == []  # a bad config fails before any model loads
    path = timing.run_timing(None, [*base, "press_name=[knorm]", "compression_ratio=[0.5]", "prompts=1",
                                    "decode_tokens=2"])
    records = json.loads(path.read_text())
    assert path == tmp_path / TIMING and loads == ["smollm2-135m-instruct"]
    assert sorted((r["press"], r["context_length"], r["prompts"], r["decode_tokens"]) for r in records) == [
        ("knorm", 160, 1, 2), ("no_press", 160, 1, 2)
    ]
    table = timing.format_timing(records)
    assert "knorm" in table and "no_press" in table and "1.00x" in table
