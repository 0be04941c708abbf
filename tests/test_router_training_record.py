"""The shipped learned router records how it was trained, and was trained on the dev split only.

The leaderboard reports the test split (docs/leaderboard.md); the router's training contexts must not overlap
it. The weights file's metadata holds the training command, the commit, the split and a SHA-256 of the training
contexts; regenerating the contexts from the recorded command must give the same hash.
"""

from __future__ import annotations

import re
import shlex

import pytest

from pikvpress.routing.learned import SHIPPED_DIR, TRAINING_METADATA, LearnedRouter

SHIPPED = SHIPPED_DIR / "smollm2-135m-instruct.safetensors"


def test_shipped_weights_load_with_their_training_record():
    router = LearnedRouter.load(SHIPPED)
    record = router.training_record
    assert record["split"] == "dev"
    assert record["command"].startswith("python scripts/train_router.py")
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]) and record["dirty"] is False
    assert re.fullmatch(r"[0-9a-f]{64}", record["data_sha256"])
    assert record["fitted"] + record["held_out"] == record["contexts"] > 0


def test_the_training_record_round_trips(tmp_path):
    router = LearnedRouter.load(SHIPPED)
    router.training_record = {"split": "dev", "note": "x"}
    path = router.save(tmp_path / "r.safetensors")
    assert LearnedRouter.load(path).training_record == {"split": "dev", "note": "x"}
    router.training_record = {}
    from safetensors import safe_open

    with safe_open(str(router.save(tmp_path / "bare.safetensors")), framework="pt") as handle:
        assert TRAINING_METADATA not in (handle.metadata() or {})


@pytest.mark.slow
def test_the_recorded_data_hash_is_the_dev_training_data():
    """Rebuild the training contexts from the recorded command: same hash (the weights match the code's data)."""
    import scripts.train_router as training
    from pikvpress.models import load_model

    record = LearnedRouter.load(SHIPPED).training_record
    args = training.build_parser().parse_args(shlex.split(record["command"])[2:])
    _, tokenizer = load_model(args.model)
    contexts = training.shuffled_training_contexts(tokenizer, args)
    recomputed = training.training_record(None, contexts, tokenizer, 0, 0)
    assert recomputed["data_sha256"] == record["data_sha256"]
    assert recomputed["split"] == "dev"
