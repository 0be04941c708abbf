"""Dev and test splits of the generated RULER data (evaluation/benchmarks/ruler/splits.py).

The leaderboard reports the test split; everything tuned (the learned router's training contexts, press
variants, defaults) uses dev. No test context may share a 64-token span with a dev or a training context,
except spans made only of RULER's fixed text (its instructions and noise sentences), which define the tasks.
"""

from __future__ import annotations

import pytest
from pikvpress_eval.benchmarks.ruler import (
    CWE_TEMPLATE,
    FWE_TEMPLATE,
    NIAH_NEEDLE,
    NIAH_TEMPLATE,
    NOISE,
    SYNTHETIC_TASKS,
    VT_TEMPLATE,
    generate_ruler,
)
from pikvpress_eval.benchmarks.ruler.haystacks import _cwe_pool, _random_value
from pikvpress_eval.benchmarks.ruler.splits import SPLITS, split_of_value, stream_key
from pikvpress_eval.haystack import essay_paths

from pikvpress.models import tiny_tokenizer

SPAN = 64
EDGE = 2


@pytest.fixture(scope="module")
def smol():
    from pikvpress.models import load_model

    _, tokenizer = load_model()
    return tokenizer


def _contexts(tokenizer, split: str, lengths=(1024, 2048), samples: int = 3) -> list[str]:
    return [
        text
        for length in lengths
        for text in generate_ruler(tokenizer, length, tasks=list(SYNTHETIC_TASKS), num_samples=samples, split=split)[
            "context"
        ]
    ]


def _spans(tokenizer, texts: list[str]) -> set[tuple[int, ...]]:
    spans = set()
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        spans.update(tuple(ids[i : i + SPAN]) for i in range(len(ids) - SPAN + 1))
    return spans


def _fixed_vocabulary(tokenizer) -> set[int]:
    """Token ids of RULER's fixed text: the templates (without their slots) and the noise sentences."""
    texts = [NOISE + joiner + NOISE for joiner in ("\n", " ", "\n ", " \n", ".\n")]
    texts += ["VAR", "\n VAR = VAR "]  # vt's assignment lines: "VAR NAME = VAR OTHER"
    for template in (NIAH_TEMPLATE, NIAH_NEEDLE, VT_TEMPLATE, CWE_TEMPLATE, FWE_TEMPLATE):
        for kind in ("number", "numbers", "uuid", "uuids"):  # niah's needle type, singular for one needle
            filled = template.replace("{type_needle_v}", kind).replace("Some", "A").replace("are", "is")
            texts += (filled + "\n" + template.replace("{type_needle_v}", kind)).replace("{", " ").split("\n")
    return {i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]}


def shared_spans(tokenizer, test: list[str], others: list[str]) -> list[str]:
    """The 64-token spans of ``test`` contexts found in ``others`` that hold more than RULER's fixed text.

    A span's first and last ``EDGE`` tokens are not checked: a value cut by the span's edge (the first digit of
    two different vt values, "VAR" before two different names) is not a shared value.
    """
    fixed = _fixed_vocabulary(tokenizer)
    shared = _spans(tokenizer, test) & _spans(tokenizer, others)
    return [tokenizer.decode(list(span)) for span in shared if not set(span[EDGE:-EDGE]) <= fixed]


@pytest.mark.slow
def test_no_test_context_shares_a_64_token_span_with_dev_or_training(smol):
    import scripts.train_router as training

    test = _contexts(smol, "test")
    dev = _contexts(smol, "dev")
    train = training.training_contexts(smol, [1024, 2048], per_length=8, seed=1234)
    assert not shared_spans(smol, test, dev + train)


@pytest.mark.slow
def test_the_span_check_finds_a_shared_passage(smol):
    """The check above can fail: contexts of the unsplit generator (every essay, RULER's order) share the
    essay haystack's opening passage with the dev split's, and the same split shares it with itself."""
    unsplit = _contexts(smol, None, lengths=(1024,), samples=1)
    dev = _contexts(smol, "dev", lengths=(1024,), samples=1)
    assert shared_spans(smol, unsplit, dev)
    assert shared_spans(smol, dev[:5], dev[5:]) or shared_spans(smol, dev, dev)


def test_essays_are_dealt_to_one_split_each():
    dev, test = set(essay_paths("dev")), set(essay_paths("test"))
    assert dev and test and not dev & test
    assert dev | test == set(essay_paths())
    assert len(test) == len(essay_paths()) // 3


@pytest.mark.parametrize("kind", ["numbers", "uuids", "words"])
def test_needle_values_belong_to_their_split(kind):
    import random

    for split in SPLITS:
        rng = random.Random(0)
        values = [_random_value(rng, kind, split) for _ in range(200)]
        assert {split_of_value(v) for v in values} == {split}


def test_cwe_word_pools_are_disjoint_halves():
    dev, test = set(_cwe_pool("dev")), set(_cwe_pool("test"))
    assert not dev & test and dev | test == set(_cwe_pool())
    assert 0.4 < len(dev) / len(_cwe_pool()) < 0.6


def test_answers_of_the_two_splits_are_disjoint():
    tokenizer = tiny_tokenizer()
    frames = {s: generate_ruler(tokenizer, 3000, tasks=list(SYNTHETIC_TASKS), num_samples=3, split=s) for s in SPLITS}
    answers = {s: {a for answer in f["answer"] for a in answer} for s, f in frames.items()}
    assert answers["dev"] and not answers["dev"] & answers["test"]
    for split in SPLITS:
        assert all(split_of_value(a) == split for a in answers[split])


def test_the_unsplit_generator_keeps_its_random_streams():
    """split=None keeps the old seed strings (the quick sweep and earlier results reproduce); a split prefixes
    its name, so the streams of dev, test and the unsplit generator are never the same."""
    assert stream_key(None, 0, "vt", 3) == "0|vt|3"
    assert len({stream_key(s, 0, "vt", 3) for s in (None, *SPLITS)}) == 3
    tokenizer = tiny_tokenizer()
    unsplit = generate_ruler(tokenizer, 3000, tasks=["niah_single_2"], num_samples=1)
    dev = generate_ruler(tokenizer, 3000, tasks=["niah_single_2"], num_samples=1, split="dev")
    assert unsplit["answer"][0] != dev["answer"][0]


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        generate_ruler(tiny_tokenizer(), 3000, tasks=["niah_single_2"], num_samples=1, split="train")
