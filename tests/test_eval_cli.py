"""kvpress's ``evaluate.py`` command line on ``python -m evaluation``: every flag mapped onto EvalConfig, unknown and
unsupported flags refused before any model loads, the subcommands unchanged, and an end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import get_tiny_model
from pikvpress_eval import __main__ as cli
from pikvpress_eval import runner
from pikvpress_eval.benchmarks.longbench import HUB_LONGBENCH, HUB_LONGBENCH_V2
from pikvpress_eval.config import (
    KVPRESS_FIELDS,
    ConfigError,
    EvalConfig,
    load_kvpress_flags,
    parse_flags,
)
from pikvpress_eval.presses import press_names

from pikvpress.models import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
KVPRESS_COMMAND = ("--dataset ruler --data_dir 4096 --model smollm2-135m-instruct --press_name snapkv "
                   "--compression_ratio 0.5 --fraction 0.1 --output_dir results")


def flags(text: str) -> EvalConfig:
    return load_kvpress_flags(text.split())[0]


# --- parsing -------------------------------------------------------------------------------------------------


def test_kvpress_command_maps_onto_the_config():
    config, log_level = load_kvpress_flags(KVPRESS_COMMAND.split())
    assert (config.dataset, config.data_dir, config.context_length) == ("ruler", None, 4096)
    assert (config.model, config.press_name, config.compression_ratio) == ("smollm2-135m-instruct", "snapkv", 0.5)
    assert (config.fraction, config.output_dir, config.seed, config.num_samples) == (0.1, "results", 42, 500)
    assert log_level == "INFO"
    assert config.sweep() == [("snapkv", 0.5)]


def test_defaults_are_kvpress_except_the_model():
    config, _ = load_kvpress_flags([])
    assert (config.dataset, config.context_length, config.press_name, config.compression_ratio) == (
        "ruler", 4096, "knorm", 0.5
    )
    assert (config.seed, config.output_dir, config.fraction, config.num_samples) == (42, "./results", 1.0, 500)
    assert config.model == "smollm2-135m-instruct"
    assert config.device in ("cpu", "cuda")


#: kvpress flag -> (argv, the EvalConfig fields it sets); every name of KVPRESS_FIELDS has at least one entry here
#: or in REFUSED / IGNORED below
MAPPED = {
    "dataset": [
        ("--dataset longbench-v2", {"dataset": "longbench-v2", "data_dir": HUB_LONGBENCH_V2}),
        ("--dataset needle_in_haystack --max_context_length 800 --needle_depth [0,25,100]",
         {"dataset": "needle", "context_length": 800, "needle_depth": [0.0, 0.25, 1.0], "max_context_length": None}),
    ],
    "data_dir": [
        ("--data_dir 8192", {"context_length": 8192, "data_dir": None}),
        ("--dataset longbench --data_dir hotpotqa", {"tasks": ["hotpotqa"], "data_dir": HUB_LONGBENCH}),
        ("--dataset longbench-e --data_dir hotpotqa_e", {"dataset": "longbench-e", "tasks": ["hotpotqa"],
                                                         "data_dir": HUB_LONGBENCH}),
        ("--dataset longbench", {"tasks": None, "data_dir": HUB_LONGBENCH}),
    ],
    "model": [("--model meta-llama/Meta-Llama-3.1-8B-Instruct", {"model": "meta-llama/Meta-Llama-3.1-8B-Instruct"})],
    "device": [("--device cuda:1", {"device": "cuda:1"})],
    "press_name": [("--press_name tova", {"press_name": "tova"})],
    "compression_ratio": [("--compression_ratio 0.25", {"compression_ratio": 0.25}),
                          ("--compression_ratio=[0.25,0.75]", {"compression_ratio": [0.25, 0.75]})],
    "fraction": [("--fraction 0.1", {"fraction": 0.1})],
    "max_new_tokens": [("--max_new_tokens 16", {"max_new_tokens": 16})],
    "max_context_length": [("--max_context_length 2048", {"max_context_length": 2048})],
    "query_aware": [("--query_aware", {"query_aware": True}), ("--query_aware False", {"query_aware": False}),
                    ("--noquery_aware", {"query_aware": False})],
    "needle_depth": [("--dataset needle_in_haystack --max_context_length 500 --needle_depth 50",
                      {"needle_depth": [0.5], "context_length": 500})],
    "output_dir": [("--output_dir out/x", {"output_dir": "out/x"})],
    "model_kwargs": [("--model_kwargs={'dtype':'bfloat16','attn_implementation':None}", {"model_kwargs": {"dtype": "bfloat16"}})],
    "trust_remote_code": [("--trust_remote_code", {"model_kwargs": {"trust_remote_code": True}})],
    "seed": [("--seed 7", {"seed": 7})],
}
#: kvpress flags refused when set, with the message's start
REFUSED = {
    "fp8": ("--fp8", "--fp8: FP8 weights"),
    "threshold": ("--press_name snapkv --threshold -3", "--threshold -3: not supported: kvpress sets it on DMSPress"),
    "head_compression_ratio": ("--head_compression_ratio 0.5", "--head_compression_ratio 0.5: not supported"),
    "compression_interval": ("--compression_interval 64", "--compression_interval 64: not supported"),
    "target_size": ("--target_size 256", "--target_size 256: not supported"),
    "hidden_states_buffer_size": ("--hidden_states_buffer_size 8", "--hidden_states_buffer_size 8: not supported"),
    "key_channel_compression_ratio": ("--press_name snapkv --key_channel_compression_ratio 0.5",
                                      "press 'snapkv' prunes no key channels"),
}
#: kvpress fields that set no EvalConfig field: log_level is returned, press_init_command is an output of kvpress
IGNORED = {"log_level", "press_init_command"}


def test_every_kvpress_flag_is_covered():
    assert set(MAPPED) | set(REFUSED) | IGNORED == set(KVPRESS_FIELDS)


@pytest.mark.parametrize("argv, expected", [case for cases in MAPPED.values() for case in cases])
def test_each_kvpress_flag_maps_to_its_field(argv, expected):
    config = flags(argv)
    assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_kvpress_flags_this_harness_cannot_honour_are_refused(name):
    argv, message = REFUSED[name]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        flags(argv)


def test_refused_flags_pass_when_unset_as_in_kvpress_config_file():
    config = flags("--fp8 False --threshold None --key_channel_compression_ratio None --head_compression_ratio None")
    assert config.press_name == "knorm"


def test_log_level_and_press_init_command():
    config, level = load_kvpress_flags(["--log_level", "debug", "--press_init_command", "KnormPress(0.5)"])
    assert level == "DEBUG" and config.press_name == "knorm"
    with pytest.raises(ConfigError, match="--log_level: unknown 'LOUD'"):
        load_kvpress_flags(["--log_level", "loud"])


@pytest.mark.skipif("think" not in press_names(), reason="the registry has no ThinK press")
def test_key_channel_ratio_is_honoured_where_the_press_prunes_key_channels():
    config = flags("--press_name think --key_channel_compression_ratio 0.3")  # kvpress ignores compression_ratio
    assert config.compression_ratio == 0.3
    assert config.build_press("think", 0.3).key_channel_compression_ratio == 0.3
    if "snap_think" in press_names():
        assert flags("--press_name snap_think --compression_ratio 0.4 --key_channel_compression_ratio 0.4")
        with pytest.raises(ConfigError, match="takes one ratio for its tokens and its key channels"):
            flags("--press_name snap_think --compression_ratio 0.5 --key_channel_compression_ratio 0.3")


def test_this_harness_fields_are_flags_too():
    config = flags("--context_length [512,1024] --num_samples 3 --tasks niah_single_1 --batch_size 2 "
                   "--press_name [no_press,knorm] --prefill_reuse false")
    assert config.context_length == [512, 1024] and config.num_samples == 3 and config.tasks == ["niah_single_1"]
    assert config.batch_size == 2 and config.prefill_reuse is False
    assert config.sweep() == [("no_press", 0.0), ("knorm", 0.5)]


def test_observed_attention_gets_eager_attention_as_in_kvpress():
    assert flags("--press_name observed_attention").model_kwargs == {"attn_implementation": "eager"}


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--press snapkv", r"unknown flag\(s\) --press; allowed: kvpress's --dataset, --data_dir, --model"),
        ("--compresion_ratio 0.5", r"unknown flag\(s\) --compresion_ratio.*this harness's --context_length"),
        ("--dataset ruler 4096", "unexpected argument '4096'"),
        ("--press_name", "--press_name needs a value"),
        ("--dataset loogle", "--dataset: unknown 'loogle'; allowed: ruler, .*needle_in_haystack"),
        ("--press_name snapkw", "press_name: unknown 'snapkw'; allowed: no_press"),
        ("--compression_ratio 1.0", r"compression_ratio: 1.0 is outside \[0, 1\)"),
        ("--data_dir no-such-dir", "--data_dir 'no-such-dir': for ruler it is the context length"),
        ("--data_dir 4096 --context_length 1024", "contradicts --context_length"),
        ("--dataset needle_in_haystack --max_context_length 500", "needle_in_haystack needs --needle_depth"),
        ("--dataset needle_in_haystack --max_context_length 500 --needle_depth 0.5,150",
         "percent"),
        ("--dataset longbench --data_dir hotpotqa_e", "use --dataset longbench-e"),
        ("--seed abc", "--seed: expected int, got 'abc'"),
        ("--config a.yaml --config_file b.yaml", "give one of --config and --config_file"),
        ("--config no-such.yaml", "config file no-such.yaml does not exist"),
    ],
)
def test_bad_flags_are_refused_with_a_message(argv, message):
    with pytest.raises(ConfigError, match=message):
        flags(argv)


def test_flag_syntax():
    assert parse_flags(["--data-dir=4096", "--query_aware", "--seed", "-3", "--model", "a/b"]) == {
        "data_dir": 4096, "query_aware": True, "seed": -3, "model": "a/b"
    }
    assert parse_flags(["--press_name", "[snapkv, knorm]", "--model_kwargs", "{attn_implementation: eager}"]) == {
        "press_name": ["snapkv", "knorm"], "model_kwargs": {"attn_implementation": "eager"}
    }


def test_config_file_in_kvpress_format_then_flags_on_top(tmp_path):
    path = tmp_path / "evaluate_config.yaml"  # kvpress's evaluation/evaluate_config.yaml, as shipped
    path.write_text(
        'output_dir: "./results"\nmodel: "smollm2-135m-instruct"\ntrust_remote_code: false\ndataset: "ruler"\n'
        'data_dir: "4096"\npress_name: "knorm"\ncompression_ratio: 0.5\nkey_channel_compression_ratio: null\n'
        "threshold: null\nfraction: 1.0\nmax_new_tokens: null\nmax_context_length: null\nquery_aware: false\n"
        "needle_depth: null\ndevice: null\nfp8: false\nmodel_kwargs:\n  attn_implementation: null\n"
        '  dtype: "auto"\n'
    )
    for flag in ("--config_file", "--config"):
        config = flags(f"{flag} {path} --press_name tova --compression_ratio 0.25")
        assert (config.press_name, config.compression_ratio, config.context_length) == ("tova", 0.25, 4096)
        assert config.model_kwargs == {"dtype": "auto"} and config.output_dir == "./results"
    path.write_text("press: knorm\n")
    with pytest.raises(ConfigError, match=r"unknown flag\(s\) --press"):
        flags(f"--config {path}")


# --- dispatch ------------------------------------------------------------------------------------------------


def test_subcommands_are_unchanged(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "run_sweep", lambda path, overrides: calls.append((path, overrides)) or Path("x"))
    monkeypatch.setattr(cli, "_print_report", lambda path: None)
    cli.main([])
    cli.main(["quick", "num_samples=1"])
    cli.main(["run", "--config", "my.yaml", "seed=3"])
    assert calls == [(cli.CONFIGS / "quick.yaml", []), (cli.CONFIGS / "quick.yaml", ["num_samples=1"]),
                     ("my.yaml", ["seed=3"])]


def test_timing_subcommand(tmp_path, monkeypatch, capsys):
    from pikvpress_eval import timing

    calls = []
    record = {"press": "knorm", "compression_ratio": 0.5, "context_length": 1024, "prefill_seconds": 0.25,
              "prefill_vs_no_press": 1.1, "decode_seconds_per_token": 0.01, "decode_vs_no_press": 1.0}

    def fake_run_timing(config_path, overrides):
        calls.append((config_path, overrides))
        path = tmp_path / "timing.json"
        path.write_text(json.dumps([record]))
        return path

    monkeypatch.setattr(timing, "run_timing", fake_run_timing)
    cli.main(["timing", "--config", "my.yaml", "prompts=2", "press_name=[knorm]"])
    assert calls == [("my.yaml", ["prompts=2", "press_name=[knorm]"])]
    out = capsys.readouterr().out
    assert "knorm" in out and "250" in out and "timing.json" in out


def test_bad_flags_exit_before_any_model_loads(monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "Evaluator", no_model)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--press_name", "snapkw"])
    assert exit_.value.code == 2
    assert "error: press_name: unknown 'snapkw'" in capsys.readouterr().err


def test_help_names_the_default_model(capsys):
    cli.main(["--dataset", "ruler", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--model defaults to smollm2-135m-instruct, this harness's offline default model, not kvpress's "
            "meta-llama/Meta-Llama-3.1-8B-Instruct") in text


# --- end to end ----------------------------------------------------------------------------------------------


def _check_run_directory(output_dir: Path, press: str) -> dict:
    (run_dir,) = sorted((output_dir / "ruler").glob(f"*/{press}__0.50__*"))
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "predictions.csv", "metrics.json",
                                                    "predictions.jsonl"}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run_key"]["hash"] in run_dir.name and config["run_key"]["fields"]["context_length"] == [600]
    samples = pd.read_csv(run_dir / "predictions.csv")
    assert {"predicted_answer", "score", "task", "kv_bytes", "seconds"} <= set(samples.columns)
    assert "context" not in samples and len(samples) == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["niah_single_1"] == {"string_match": metrics["score"]}  # kvpress's scorer format
    assert metrics["press"] == press and metrics["num_samples"] == 2
    return metrics


def test_kvpress_command_line_end_to_end_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    class TinyEvaluator(runner.Evaluator):  # the flag form's model loading, replaced by a tiny model
        def __init__(self, config, model=None, tokenizer=None):
            super().__init__(config, get_tiny_model("llama"), tiny_tokenizer())

    monkeypatch.setattr(runner, "Evaluator", TinyEvaluator)
    argv = ["--dataset", "ruler", "--data_dir", "600", "--press_name", "snapkv", "--compression_ratio", "0.5",
            "--fraction", "0.5", "--output_dir", str(tmp_path), "--tasks", "[niah_single_1]", "--num_samples", "4",
            "--max_new_tokens", "4", "--log_level", "WARNING"]
    cli.main(argv)
    metrics = _check_run_directory(tmp_path, "snapkv")
    assert "report:" in capsys.readouterr().out
    cli.main(argv)  # finished: nothing reruns, nothing is rewritten
    assert _check_run_directory(tmp_path, "snapkv") == metrics


@pytest.mark.slow
def test_kvpress_command_line_end_to_end_with_the_default_model(tmp_path):
    """``python -m evaluation`` with kvpress's flags, in a subprocess, on SmolLM2 (the flag form's default)."""
    command = [sys.executable, "-m", "evaluation", "--dataset", "ruler", "--data_dir", "600", "--press_name",
               "snapkv", "--compression_ratio", "0.5", "--fraction", "0.5", "--output_dir", str(tmp_path),
               "--tasks", "[niah_single_1]", "--num_samples", "4", "--max_new_tokens", "8", "--device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = _check_run_directory(tmp_path, "snapkv")
    assert metrics["model"] == "smollm2-135m-instruct"
