"""The harness: config validation, prefill reuse (identical outputs, one prefill per sample), resume, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import get_tiny_model
from pikvpress_eval.config import ConfigError, load_config
from pikvpress_eval.report import write_report
from pikvpress_eval.runner import PREDICTIONS, Evaluator, plan_runs

from pikvpress.models import tiny_tokenizer

SWEEP = [
    "dataset=needle",
    "context_length=[160, 240]",
    "needle_depth=[0.5, 1.0]",
    "press_name=[no_press, knorm, snapkv, expected_attention, streaming_llm, tova, pyramidkv, "
    "adakv_expected_attention, snapkv_then_knorm]",
    "compression_ratio=[0.25, 0.5]",
    "composed_presses={snapkv_then_knorm: [{press: snapkv, window_size: 8}, {press: knorm, compression_ratio: 0.2}]}",
]


# --- configuration ---------------------------------------------------------------------------------


def test_unknown_field_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="unknown field\\(s\\) press.*allowed: dataset, data_dir"):
        load_config(None, ["press=snapkv"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset=rulerr", "dataset: unknown 'rulerr'; allowed: ruler, longbench"),
        ("press_name=[snapkv, snapkw]", "press_name: unknown 'snapkw'; allowed: no_press, "),
        ("press_name=[qfilter]", "press_name: 'qfilter' needs hub weights, which this offline harness cannot fetch: QFilter"),
        ("press_name=[decoding_knorm]", "press_name: 'decoding_knorm' is not an offline prefill baseline here: compresses"),
        ("compression_ratio=[0.5, 1.0]", "compression_ratio: 1.0 is outside"),
        ("fraction=0", "fraction"),
        ("split=train", "split: unknown 'train'; allowed: dev, test"),
        ("batch_size=0", "batch_size: must be a positive integer"),
        ("needle_depth=[0.5, 2]", "needle_depth"),
        ("max_new_tokens=-3", "max_new_tokens"),
        ("tasks=[niah_single_1, niah_single_9]", "tasks: unknown ruler task 'niah_single_9'; allowed: niah_single_1"),
    ],
)
def test_bad_values_fail_before_any_model(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_composed_press():
    with pytest.raises(ConfigError, match="needs a 'press' key"):
        load_config(None, ["press_name=c", "composed_presses={c: [{name: knorm}]}"])
    with pytest.raises(ConfigError, match="no field 'windw'"):
        load_config(
            None, ["press_name=c", "compression_ratio=0.5", "composed_presses={c: [{press: snapkv, windw: 3}]}"]
        )


def test_yaml_config_with_composed_press(tmp_path):
    from kvpress import ComposedPress, KnormPress, SnapKVPress

    path = Path(__file__).parents[1] / "evaluation" / "configs" / "composed.yaml"
    config = load_config(path, [f"output_dir={tmp_path}"])
    assert config.sweep() == [
        ("no_press", 0.0),
        ("snapkv", 0.25),
        ("snapkv", 0.5),
        ("snapkv_then_knorm", 0.25),
        ("snapkv_then_knorm", 0.5),
    ]
    press = config.build_press("snapkv_then_knorm", 0.5)
    assert isinstance(press, ComposedPress)
    assert isinstance(press.presses[0], SnapKVPress) and press.presses[0].compression_ratio == 0.5
    assert isinstance(press.presses[1], KnormPress) and press.presses[1].compression_ratio == 0.2
    assert press is not config.build_press("snapkv_then_knorm", 0.5)  # fresh per run


@pytest.mark.parametrize(
    "name", ["quick.yaml", "needle.yaml", "composed.yaml", "adaptive_scheduling.yaml", "pikv.yaml", "pikv_top_k.yaml"]
)
def test_shipped_configs_validate(name):
    load_config(Path(__file__).parents[1] / "evaluation" / "configs" / name)


def test_presses_that_evict_while_decoding_run_inside_prefill_decoding_press(tmp_path):
    from kvpress import ComposedPress, KnormPress, PrefillDecodingPress
    from pikvpress_eval.prefill import can_reuse_prefill

    from pikvpress import AdaptiveSchedulingPress, ExpertRoutingPress

    path = Path(__file__).parents[1] / "evaluation" / "configs" / "adaptive_scheduling.yaml"
    config = load_config(path, [f"output_dir={tmp_path}"])
    alone = config.build_press("adaptive_scheduling", 0.5)
    assert isinstance(alone, PrefillDecodingPress) and alone.prefilling_press is None
    assert isinstance(alone.decoding_press, AdaptiveSchedulingPress) and alone.decoding_press.compression_ratio == 0.5
    assert config.build_press("scheduling_h2o", 0.25).decoding_press.policy == "h2o"
    chained = config.build_press("routing_then_scheduling", 0.5)
    assert isinstance(chained.prefilling_press, ExpertRoutingPress)
    assert chained.prefilling_press.compression_ratio == 0.5 and chained.decoding_press.compression_ratio == 0.0
    model = get_tiny_model("llama")
    assert not can_reuse_prefill(alone, model) and not can_reuse_prefill(AdaptiveSchedulingPress(budget=8), model)
    composed = ComposedPress([KnormPress(0.5), AdaptiveSchedulingPress(compression_ratio=0.5)])
    assert not can_reuse_prefill(composed, model)
    twice = "composed_presses={twice: [{press: adaptive_scheduling}, {press: adaptive_scheduling, policy: h2o}]}"
    with pytest.raises(ValueError, match="at most one"):  # caught when the config loads
        load_config(None, ["dataset=needle", "press_name=[twice]", twice])


def test_adaptive_scheduling_sweep_evicts_while_answering(tmp_path):
    model = get_tiny_model("llama")
    _, results, prefills = run_sweep(
        model,
        tmp_path,
        reuse=True,
        extra=["press_name=[no_press, knorm, adaptive_scheduling]", "compression_ratio=[0.5]"],
    )
    kv = {r["press"]: r["kv_bytes"] for r in results}
    assert kv["adaptive_scheduling"] < kv["no_press"]  # the answer's cache was cut while it was generated
    assert prefills == 4 + 4  # no_press and knorm share one prefill per sample; the scheduler runs its own
    assert all(0 <= r["score"] <= 100 for r in results)
    # every record (shared and own prefill) says what the cache holds in a bf16 run: half of the float32 bytes
    for path in tmp_path.rglob(PREDICTIONS):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert record["kv_bytes_bf16"] * 2 == record["kv_bytes"] > 0
            assert record["bf16_kv_bytes"] > 0


PIKV = (
    "composed_presses={"
    "read_all: [{press: pikv, sharding: {num_shards: 4, tail_length: 4}}], "
    "read_one: [{press: pikv, sharding: {num_shards: 4, tail_length: 4, top_k_shards: 1}}], "
    "sched: [{press: pikv, sharding: {num_shards: 4, tail_length: 4}, scheduling: {compression_ratio: 0.5, interval: 2}}]}"
)


def test_pikv_press_from_yaml_builds_and_records_bytes_read(tmp_path):
    from kvpress import PrefillDecodingPress

    from pikvpress import ExpertRoutingPress, PiKVPress

    config = load_config(None, ["dataset=needle", "press_name=[read_all, read_one, sched]", PIKV])
    read_all = config.build_press("read_all", 0.5)
    assert isinstance(read_all, PiKVPress) and isinstance(read_all.routing, ExpertRoutingPress)
    assert read_all.routing.compression_ratio == 0.5 and read_all.compression_ratio == 0.5
    sched = config.build_press("sched", 0.25)  # the same press prefills (routing, sharding) and evicts
    assert isinstance(sched, PrefillDecodingPress) and sched.prefilling_press is sched.decoding_press
    model = get_tiny_model("qwen3_moe")
    presses = "press_name=[no_press, read_all, read_one, sched]"
    _, results, _ = run_sweep(model, tmp_path, reuse=True, extra=[presses, "compression_ratio=[0.5]", PIKV])
    by_press = {r["press"]: r for r in results}
    assert by_press["read_all"]["kv_bytes"] < by_press["no_press"]["kv_bytes"]
    # reading one shard of four: fewer bytes read per decode step than reading all, from the same cache
    assert by_press["read_one"]["kv_bytes"] == by_press["read_all"]["kv_bytes"]
    assert by_press["read_one"]["kv_bytes_read"] < 0.8 * by_press["read_all"]["kv_bytes_read"]
    # the last decode step read the context, the question and the answer so far
    assert by_press["no_press"]["kv_bytes_read"] > by_press["no_press"]["kv_bytes"]
    assert "KV bytes read by a decode step" in write_report(tmp_path).read_text()


# --- prefill reuse ------------------------------------------------------------------------------------


def count_prefills(model):
    """Count forward passes of the decoder that start from an empty cache (prefills)."""
    counter = {"n": 0}

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if cache is None or cache.get_seq_length() == 0:
            counter["n"] += 1

    return counter, model.model.register_forward_pre_hook(hook, with_kwargs=True)


def run_sweep(model, output_dir, reuse: bool, extra=()):
    config = load_config(None, [*SWEEP, f"output_dir={output_dir}", f"prefill_reuse={reuse}", *extra])
    counter, handle = count_prefills(model)
    try:
        results = Evaluator(config, model, tiny_tokenizer()).run()
    finally:
        handle.remove()
    return config, results, counter["n"]


def predictions(config):
    return {
        run.directory.name: [json.loads(line) for line in (run.directory / PREDICTIONS).read_text().splitlines()]
        for run in plan_runs(config)
    }


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3"])
def test_prefill_reuse_is_identical_and_prefills_once_per_sample(family, tmp_path):
    model = get_tiny_model(family)
    shared_cfg, shared, shared_prefills = run_sweep(model, tmp_path / "shared", reuse=True)
    alone_cfg, alone, alone_prefills = run_sweep(model, tmp_path / "alone", reuse=False)
    n_samples, n_runs = 4, len(shared_cfg.sweep())
    assert alone_prefills == n_samples * n_runs
    assert shared_prefills == n_samples
    a, b = predictions(shared_cfg), predictions(alone_cfg)
    assert a.keys() == b.keys() and len(a) == n_runs
    for run in a:
        assert [r["predicted_answer"] for r in a[run]] == [r["predicted_answer"] for r in b[run]], run
        assert [r["kv_bytes"] for r in a[run]] == [r["kv_bytes"] for r in b[run]], run
    assert [r["score"] for r in shared] == [r["score"] for r in alone]
    kv = {(r["press"], r["compression_ratio"]): r["kv_bytes"] for r in shared}
    assert kv[("knorm", 0.5)] < kv[("knorm", 0.25)] < kv[("no_press", 0.0)]


def test_a_packed_cache_holds_the_same_bytes_alone_as_shared(tmp_path):
    """Bytes held are measured after the prefill in both paths: alone, kvpress's pipeline appends the question, which
    pushes context tokens out of an int4 layer's 8-token residual into packed groups that stay packed when the
    pipeline crops the question and the answer off again (fewer bytes than after the prefill)."""
    model = get_tiny_model("llama")
    extra = [
        "press_name=[no_press, int4]",
        "composed_presses={int4: [{press: quantization, bits: 4, key_group_size: 8, residual_length: 8}]}",
    ]
    shared_cfg, _, _ = run_sweep(model, tmp_path / "shared", reuse=True, extra=extra)
    alone_cfg, _, _ = run_sweep(model, tmp_path / "alone", reuse=False, extra=extra)
    a, b = predictions(shared_cfg), predictions(alone_cfg)
    (int4,) = [name for name in a if name.startswith("int4")]
    assert [r["predicted_answer"] for r in a[int4]] == [r["predicted_answer"] for r in b[int4]]
    for field in ("kv_bytes", "kv_bytes_bf16"):
        assert [r[field] for r in a[int4]] == [r[field] for r in b[int4]], field
    (none,) = [name for name in a if name.startswith("no_press")]
    assert all(q[field] < n[field] for q, n in zip(a[int4], a[none]) for field in ("kv_bytes", "kv_bytes_bf16"))


def test_prefill_runs_once_per_sample_when_every_press_can_share(tmp_path):
    model = get_tiny_model("llama")
    config, _, prefills = run_sweep(
        model, tmp_path, reuse=True, extra=["press_name=[no_press, knorm, snapkv, tova, pyramidkv]"]
    )
    assert prefills == 4  # 2 lengths x 2 depths, whatever the number of presses


def test_eager_presses_need_eager_attention_and_run_on_their_own(tmp_path):
    with pytest.raises(ConfigError, match="observed_attention.*attn_implementation: eager"):
        load_config(None, ["press_name=observed_attention", "compression_ratio=0.5"])
    model = get_tiny_model("llama", "eager")
    extra = ["press_name=[no_press, observed_attention, knorm]", "model_kwargs={attn_implementation: eager}"]
    config, results, prefills = run_sweep(model, tmp_path, reuse=True, extra=extra)
    assert prefills == 4 * len(config.sweep())  # eager: every run has its own prefill
    kv = {(r["press"], r["compression_ratio"]): r["kv_bytes"] for r in results}
    assert kv[("observed_attention", 0.5)] < kv[("no_press", 0.0)]


# --- resume -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "redone"),
    [("half_a_line", 3), ("before_the_newline", 2)],  # the second record cut in half, or whole but unterminated
)
def test_interrupted_sweep_resumes_without_redoing_finished_work(tmp_path, cut, redone):
    model = get_tiny_model("llama")
    extra = ["press_name=[no_press, knorm, snapkv]"]
    config, first, _ = run_sweep(model, tmp_path, reuse=True, extra=extra)
    runs = plan_runs(config)
    finished, interrupted = runs[0], runs[2]
    finished_mtime = (finished.directory / "metrics.json").stat().st_mtime_ns
    path = interrupted.directory / PREDICTIONS
    complete = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(complete) == 4
    # interrupt one run while it writes its second prediction: no metrics, one complete line, then the cut one
    (interrupted.directory / "metrics.json").unlink()
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + (lines[1][: len(lines[1]) // 2] if cut == "half_a_line" else lines[1]))
    _, second, prefills = run_sweep(model, tmp_path, reuse=True, extra=extra)
    assert prefills == redone  # only the missing samples of the interrupted run
    assert (finished.directory / "metrics.json").stat().st_mtime_ns == finished_mtime
    assert [r["score"] for r in second] == [r["score"] for r in first]
    # the resumed file is whole: every line parses, and each sample is there exactly once, as before the cut
    resumed = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["index"] for r in resumed) == sorted(r["index"] for r in complete)
    by_index = {r["index"]: r["predicted_answer"] for r in complete}
    assert {r["index"]: r["predicted_answer"] for r in resumed} == by_index
    assert path.read_text().endswith("\n")


# --- report -------------------------------------------------------------------------------------------


def test_report_tables_and_plots(tmp_path):
    model = get_tiny_model("llama")
    run_sweep(model, tmp_path, reuse=True, extra=["press_name=[no_press, knorm, snapkv]"])
    report = write_report(tmp_path)
    text = report.read_text()
    assert "| no_press" in text and "| knorm" in text and "0.25" in text and "0.50" in text
    assert "MiB (1.00x)" in text and "MiB (0.50x)" in text  # KV bytes against the baseline
    csv = (tmp_path / "report.csv").read_text()
    assert "no_press" in csv and "snapkv" in csv
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert any(p.startswith("scores_needle") for p in pngs)
    assert any(p.startswith("needle_knorm_0.50") for p in pngs)
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished run"):
        write_report(tmp_path)


# --- datasets end to end --------------------------------------------------------------------------------


def test_longbench_from_a_local_directory_end_to_end(tmp_path):
    """Fixture records in LongBench's raw format (made up here; not LongBench data or scores)."""
    data = tmp_path / "data"
    data.mkdir()
    record = dict(
        context="Paris is the capital of France. " * 6,
        input="What is the capital of France?",
        answers=["Paris"],
        length=40,
        dataset="hotpotqa",
        language="en",
        all_classes=None,
        _id="a",
    )
    (data / "hotpotqa.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(dict(record, _id="b")) + "\n")
    count = dict(record, dataset="passage_count", input="", answers=["3"], _id="c")
    (data / "passage_count.jsonl").write_text(json.dumps(count) + "\n")
    config = load_config(
        None,
        [
            "dataset=longbench",
            f"data_dir={data}",
            "tasks=[hotpotqa, passage_count]",
            "press_name=[no_press, knorm]",
            "compression_ratio=0.5",
            f"output_dir={tmp_path / 'out'}",
            "max_new_tokens=4",
            "max_context_length=120",
        ],
    )
    results = Evaluator(config, get_tiny_model("llama"), tiny_tokenizer()).run()
    assert [(r["press"], r["num_samples"]) for r in results] == [("no_press", 3), ("knorm", 3)]
    for result in results:
        assert {"hotpotqa", "passage_count", "average"} <= set(result)
        assert 0 <= result["score"] <= 100
    report = write_report(tmp_path / "out").read_text()
    assert "longbench" in report and "hotpotqa" in report


def test_query_aware_compresses_the_question_with_the_context(tmp_path):
    """Both paths (shared prefill and the plain pipeline) see the question inside the compressed context."""
    model = get_tiny_model("llama")
    extra = ["press_name=[no_press, snapkv]", "compression_ratio=0.5", "query_aware=true"]
    shared_cfg, shared, _ = run_sweep(model, tmp_path / "shared", reuse=True, extra=extra)
    alone_cfg, _, _ = run_sweep(model, tmp_path / "alone", reuse=False, extra=extra)
    a, b = predictions(shared_cfg), predictions(alone_cfg)
    for run in a:
        assert [(r["predicted_answer"], r["kv_bytes"]) for r in a[run]] == [
            (r["predicted_answer"], r["kv_bytes"]) for r in b[run]
        ]
    _, plain, _ = run_sweep(model, tmp_path / "plain", reuse=True, extra=extra[:2])
    with_question = {r["press"]: r["kv_bytes"] for r in shared}
    without = {r["press"]: r["kv_bytes"] for r in plain}
    assert with_question["no_press"] > without["no_press"]  # the question's tokens are in the cache


# --- processing order ----------------------------------------------------------------------------


def test_a_sweep_runs_its_tasks_round_robin(tmp_path):
    """A sweep stopped part way holds as many samples of every task: rows go round robin over the tasks (the records
    keep each row's own index)."""
    import pandas as pd
    from pikvpress_eval.runner import processing_order

    tasks = ["niah_single_1"] * 3 + ["niah_single_2"] * 2 + ["fwe"]
    rows = pd.DataFrame(
        {
            "context": [f"The number {i} is special. " * 6 for i in range(len(tasks))],
            "question": ["Which number is special?"] * len(tasks),
            "answer_prefix": [""] * len(tasks),
            "answer": [[str(i)] for i in range(len(tasks))],
            "max_new_tokens": [2] * len(tasks),
            "task": tasks,
        }
    )
    assert processing_order(rows) == [0, 3, 5, 1, 4, 2]
    assert processing_order(rows[rows["task"] == "fwe"]) == [5]
    for batch in (1, 2):
        config = load_config(
            None,
            [
                "dataset=ruler",
                "press_name=[no_press, knorm]",
                "compression_ratio=[0.5]",
                f"batch_size={batch}",
                f"output_dir={tmp_path / str(batch)}",
            ],
        )
        Evaluator(config, get_tiny_model("llama"), tiny_tokenizer()).run(rows)
        for run in plan_runs(config):
            lines = [json.loads(line)["index"] for line in (run.directory / PREDICTIONS).read_text().splitlines()]
            assert lines == [0, 3, 5, 1, 4, 2], (batch, run.directory.name)


# --- random presses: the same draws whatever ran before -----------------------------------------------


@pytest.mark.parametrize("reuse", [True, False])
def test_a_random_press_draws_the_same_numbers_whichever_runs_came_before(tmp_path, monkeypatch, reuse):
    """LeverageScore's projection and an unseeded RandomPress draw from torch's global generator: each sample's
    compression is seeded from its run's key and index, so a sweep split over processes, or resumed, draws what a
    whole sweep draws (a probe press records its draw per sample)."""
    from kvpress.presses.scorer_press import ScorerPress
    from pikvpress_eval import presses

    draws: list[float] = []

    class ProbePress(ScorerPress):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            if module.layer_idx == 0:
                draws.append(float(torch.rand(())))
            return keys.norm(dim=-1)

    monkeypatch.setitem(presses.BASELINES, "probe", lambda r: ProbePress(compression_ratio=r))
    model = get_tiny_model("llama")
    base = ["context_length=160", "needle_depth=[0.5, 1.0]", "compression_ratio=0.5", f"prefill_reuse={reuse}"]

    def sweep(names: str, where: str) -> list[float]:
        draws.clear()
        config = load_config(None, ["dataset=needle", *base, f"press_name=[{names}]", f"output_dir={tmp_path / where}"])
        Evaluator(config, model, tiny_tokenizer()).run()
        return list(draws)

    whole = sweep("leverage, random, probe", "whole")
    alone = sweep("probe", "alone")
    assert len(alone) == 2 and alone[0] != alone[1]  # one draw per sample, and not the same seed for both
    assert whole == alone


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_block_holds_one_captured_prefill_at_a_time(tmp_path, monkeypatch, batch_size):
    """A block's rows are prefilled when their first job is due and drop the captured layer inputs once all their
    runs have compressed: compressing holds one row's prefill, whatever the block size (a 2k prefill of the default
    model holds about 0.3 GB, and a block is batch_size rows): at most two at a time, as a chunk of batch_size jobs may
    reach the next row's first job."""
    from pikvpress_eval import runner as runner_module

    created, alive = [], []
    prefilled, replay = Evaluator._prefilled, Evaluator._replay

    def tracked(self, runs, block):
        for p in prefilled(self, runs, block):
            created.append(p)
            yield p

    def counting(self, run, p):
        alive.append(sum(q.prefill is not None for q in created))
        return replay(self, run, p)

    monkeypatch.setattr(runner_module.Evaluator, "_prefilled", tracked)
    monkeypatch.setattr(runner_module.Evaluator, "_replay", counting)
    config = load_config(
        None,
        [*SWEEP[:3], "press_name=[no_press, knorm, snapkv]", f"batch_size={batch_size}", f"output_dir={tmp_path}"],
    )
    Evaluator(config, get_tiny_model("llama"), tiny_tokenizer()).run()
    assert len(created) == 4 and len(alive) == 4 * 3  # 4 rows x 3 runs
    assert max(alive) <= 2
    assert all(p.prefill is None and p.memo is None and p.bf16_kv_bytes > 0 for p in created)
