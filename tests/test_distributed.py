"""Shards over torch.distributed ranks: gloo processes on CPU decoding a tiny MoE model (tests/distributed_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from pikvpress import tiny_model
from pikvpress.cache import ExpertShardedCache
from pikvpress.presses import PiKVPress

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
NEW_TOKENS = 32


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(WORKER)), env.get("PYTHONPATH", "")])
    return env


def _torchrun(world: int, out, *args: str) -> list[dict]:
    """Run the worker on ``world`` gloo ranks with torchrun; every rank's report."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", WORKER]
    proc = subprocess.run(
        [*cmd, "--out", str(out), *args], env=_env(), capture_output=True, text=True, timeout=600, check=False
    )
    reports = [
        json.loads((out / f"rank{r}.json").read_text()) for r in range(world) if (out / f"rank{r}.json").exists()
    ]
    assert proc.returncode == 0 and len(reports) == world, proc.stderr[-3000:]
    return reports


def _spawn(world: int, out, *args: str, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start the ranks directly (RANK / WORLD_SIZE / MASTER_*), so that one rank can die without torchrun
    tearing the others down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = _env() | {"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}
        env |= {"MASTER_PORT": str(port), "LOCAL_RANK": str(rank)}
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, "--out", str(out), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=timeout), *p.communicate()) for p in procs]


@pytest.mark.parametrize(
    ("world", "extra"),
    [(2, ()), (4, ("--routing",)), (2, ("--batch", "2"))],
    ids=["2-ranks", "4-ranks-routing", "2-ranks-batch2"],
)
def test_sharded_decoding_over_gloo_equals_dense(tmp_path, world, extra):
    reports = _torchrun(world, tmp_path, "--shards", "4", "--new-tokens", str(NEW_TOKENS), *extra)
    for report in reports:
        assert "error" not in report, report.get("traceback")
        # fp32: every one of the 32 steps' logits within 1e-4 of single-process dense decoding
        assert report["max_logit_diff"] <= 1e-4
        assert report["tokens"] == report["dense_tokens"]
        assert report["decode_steps"] == NEW_TOKENS - 1
        # each rank holds its own 4 / world shards of every layer
        assert report["local_shards"] == [4 // world] * report["sharded_layers"]
        # one collective per layer per decode step, carrying (output, lse) only: B x Hq x (Dv + 1) float32
        assert report["collectives_per_step"] == report["sharded_layers"]
        batch = 2 if "--batch" in extra else 1
        per_layer = batch * report["heads"] * (report["value_dim"] + 1) * 4
        assert report["payload_bytes_per_step"] == report["sharded_layers"] * per_layer
    assert all(r["tokens"] == reports[0]["tokens"] for r in reports)
    # sharding splits the bytes: no rank holds the whole cache
    assert max(r["cache_nbytes"] for r in reports) < sum(r["cache_nbytes"] for r in reports)


@pytest.mark.parametrize(
    ("world", "extra"), [(2, ()), (4, ("--routing", "--packed"))], ids=["2-ranks", "4-ranks-routing-int8"]
)
def test_scheduled_decoding_over_gloo_equals_one_process(tmp_path, world, extra):
    # every rank scores and evicts the tokens of its own shards: the same tokens as one process holding them all
    reports = _torchrun(world, tmp_path, "--shards", "4", "--new-tokens", str(NEW_TOKENS), "--scheduling", *extra)
    for report in reports:
        assert "error" not in report, report.get("traceback")
        assert report["max_logit_diff"] <= 1e-4
        assert report["tokens"] == report["dense_tokens"]
        # the scheduler evicted (budget 64, interval 8) exactly as in one process
        assert report["cache_lengths"] == report["reference_cache_lengths"]
        assert max(report["cache_lengths"]) <= 64 + 8
        # its traffic (the steps' lse every interval, the kept indices at each eviction) stays of the order of
        # the attention's own (output, lse): B x Hq x (Dv + 1) float32 per layer and step
        per_layer = report["heads"] * (report["value_dim"] + 1) * 4
        assert report["sharded_layers"] * per_layer < report["payload_bytes_per_step"]
        assert report["payload_bytes_per_step"] < 3 * report["sharded_layers"] * per_layer
    assert all(r["tokens"] == reports[0]["tokens"] for r in reports)


def test_kvpress_pipeline_over_gloo_answers_as_dense(tmp_path):
    reports = _torchrun(2, tmp_path, "--pipeline", "--shards", "2", "--new-tokens", "12")
    for report in reports:
        assert "error" not in report, report.get("traceback")
        assert report["answers"] == report["dense_answers"]
        # after the last answer was cropped off, every layer holds the context again, part of it sharded
        assert report["cache_lengths"] == [report["context_len"]] * len(report["cache_lengths"])
        assert all(0 < n < report["context_len"] for n in report["sharded_lengths"])
    assert reports[0]["answers"] == reports[1]["answers"]


def test_kvpress_pipeline_with_a_scheduler_over_gloo_answers_as_one_process(tmp_path):
    # the question is a multi-token step the scheduler scores over the shards of both ranks
    reports = _torchrun(2, tmp_path, "--pipeline", "--scheduling", "--shards", "2", "--new-tokens", "12")
    for report in reports:
        assert "error" not in report, report.get("traceback")
        assert report["answers"] == report["dense_answers"]
        assert max(report["cache_lengths"]) < report["context_len"]  # the scheduler evicted
    assert reports[0]["answers"] == reports[1]["answers"]


def test_a_rank_dying_mid_decode_makes_the_others_raise(tmp_path):
    done = _spawn(2, tmp_path, "--die-at-step", "5", "--timeout", "20", timeout=300)
    assert done[1].returncode == 3  # rank 1 died at its fifth decode step
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert "did not complete within 20 s" in report["error"]
    assert "A rank has probably died" in report["error"]


def test_ranks_disagreeing_on_settings_are_rejected(tmp_path):
    done = _spawn(2, tmp_path, "--mismatch", timeout=300)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "disagree" in report["error"] and "num_shards" in report["error"], report
        assert done[rank].returncode == 1


def test_an_uninitialised_process_group_is_rejected():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ExpertShardedCache(num_shards=2, process_group="default")
    press = PiKVPress(process_group="default", sharding={"num_shards": 2})
    with pytest.raises(RuntimeError, match="torchrun"), press(tiny_model("llama")):
        pass


def test_a_process_group_of_the_wrong_type_is_rejected(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    from pikvpress.distributed import ShardGroup

    with pytest.raises(ValueError, match="process_group must be"):
        ShardGroup(process_group=42)
