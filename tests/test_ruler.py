"""RULER, generated offline: templates, needles, haystack sizing, determinism, QA files and scoring.

Structure tests run on two frames: one made with the byte-level tiny tokenizer (fast, always run)
and one made with SmolLM2-135M-Instruct's tokenizer (``slow``: it loads the default model). QA
files are small fixtures written here in the SQuAD v2 and HotpotQA formats.
"""

from __future__ import annotations

import importlib.resources
import json
import random
import re
import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from pikvpress_eval.benchmarks import ruler as R
from pikvpress_eval.benchmarks.ruler import (
    QA_DATASETS,
    RULER_TASKS,
    SYNTHETIC_TASKS,
    TOKENS_TO_GENERATE,
    available_tasks,
    generate_ruler,
    load_hotpotqa,
    load_squad,
    ruler_prompt,
    score_ruler,
    string_match_all,
    string_match_part,
)
from pikvpress.models import tiny_tokenizer

NIAH_TASKS = [t for t in SYNTHETIC_TASKS if t.startswith("niah")]
UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
NUMBER = r"\d{7}"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (.+?) is: (\S+)\.")

# expected (singular?, value type) per niah task: RULER's settings table
NIAH_SETTINGS = {
    "niah_single_1": (True, "number", "noise"),
    "niah_single_2": (True, "number", "essay"),
    "niah_single_3": (True, "uuid", "essay"),
    "niah_multikey_1": (True, "number", "essay"),
    "niah_multikey_2": (True, "number", "needle"),
    "niah_multikey_3": (True, "uuid", "needle"),
    "niah_multivalue": (False, "number", "essay"),
    "niah_multiquery": (False, "number", "essay"),
}


def _words(kind: str) -> set[str]:
    text = (importlib.resources.files("wonderwords") / "assets" / f"{kind}list.txt").read_text(encoding="utf-8")
    return {line.rstrip() for line in text.splitlines() if line.strip()}


ADJECTIVES, NOUNS, VERBS = _words("adjective"), _words("noun"), _words("verb")


def is_word_key(key: str) -> bool:
    """An adjective-noun pair from wonderwords (either part may itself contain a hyphen)."""
    return any(key[:i] in ADJECTIVES and key[i + 1 :] in NOUNS for i, ch in enumerate(key) if ch == "-")


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def smol():
    from pikvpress.models import load_model

    _, tokenizer = load_model()
    return tokenizer


@pytest.fixture(scope="module")
def tiny_frame(tiny):
    """All synthetic tasks at 3000 tokens with the byte-level tokenizer (cwe uses its <4k settings)."""
    return generate_ruler(tiny, 3000, num_samples=3, seed=0)


@pytest.fixture(scope="module")
def smol_frame(smol):
    """All synthetic tasks at 1024 tokens with SmolLM2's tokenizer."""
    return generate_ruler(smol, 1024, num_samples=4, seed=0)


@pytest.fixture(scope="module")
def smol_frame_4k(smol):
    """The tasks whose settings change at 4096 tokens (cwe), and a uuid task, at 4096."""
    return generate_ruler(smol, 4096, tasks=["cwe", "niah_multikey_3", "vt"], num_samples=2, seed=3)


FRAMES = ["tiny_frame", pytest.param("smol_frame", marks=pytest.mark.slow)]


@pytest.fixture(params=FRAMES)
def frame(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory):
    """A tiny SQuAD v2 dev file (3 articles x 3 paragraphs) and a HotpotQA dev distractor file (4 questions)."""
    root = tmp_path_factory.mktemp("qa")
    rng = random.Random(0)
    filler = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    articles = []
    for a in range(3):
        paragraphs = []
        for p in range(3):
            i = 3 * a + p
            context = f"Paragraph {i}: " + " ".join(rng.choice(filler) for _ in range(40)) + f". Town {i} is Zorg{i}."
            qas = [
                {
                    "question": f"Which town is number {i}?",
                    "id": f"q{i}",
                    "answers": [{"text": f"Zorg{i}", "answer_start": context.index("Zorg")}] * 2,
                    "is_impossible": False,
                },
                {
                    "question": f"Unanswerable {i}?",
                    "id": f"u{i}",
                    "answers": [],
                    "plausible_answers": [{"text": "Nowhere", "answer_start": 0}],
                    "is_impossible": True,
                },
            ]
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"Article {a}", "paragraphs": paragraphs})
    squad = root / "dev-v2.0.json"
    squad.write_text(json.dumps({"version": "v2.0", "data": articles}), encoding="utf-8")
    hotpot_data = []
    for q in range(4):
        context = [[f"Title {q}-{j}", [f"First sentence of {q}-{j}. ", f"It names Kell{q}{j}."]] for j in range(10)]
        hotpot_data.append(
            {
                "_id": f"h{q}",
                "question": f"What does paragraph {q}-0 name?",
                "answer": f"Kell{q}0",
                "supporting_facts": [[f"Title {q}-0", 1]],
                "context": context,
                "type": "bridge",
                "level": "hard",
            }
        )
    hotpot = root / "hotpot_dev_distractor_v1.json"
    hotpot.write_text(json.dumps(hotpot_data), encoding="utf-8")
    return {"squad": str(squad), "hotpotqa": str(hotpot)}


# --------------------------------------------------------------------------------------------------------------------
# task table and availability
# --------------------------------------------------------------------------------------------------------------------
def test_task_table():
    assert len(RULER_TASKS) == 13 and SYNTHETIC_TASKS == RULER_TASKS[:11]
    assert set(QA_DATASETS) == {"qa_1", "qa_2"} and set(RULER_TASKS) - set(SYNTHETIC_TASKS) == set(QA_DATASETS)
    assert set(TOKENS_TO_GENERATE) == set(RULER_TASKS)
    assert {TOKENS_TO_GENERATE[t] for t in NIAH_TASKS} == {128}
    assert (TOKENS_TO_GENERATE["vt"], TOKENS_TO_GENERATE["cwe"], TOKENS_TO_GENERATE["fwe"]) == (30, 120, 50)
    assert TOKENS_TO_GENERATE["qa_1"] == TOKENS_TO_GENERATE["qa_2"] == 32


def test_available_tasks(tmp_path, qa_files):
    assert available_tasks() == SYNTHETIC_TASKS
    assert available_tasks({"squad": qa_files["squad"]}) == SYNTHETIC_TASKS + ("qa_1",)
    assert available_tasks({"qa_2": qa_files["hotpotqa"]}) == SYNTHETIC_TASKS + ("qa_2",)
    assert available_tasks(qa_files) == RULER_TASKS
    assert available_tasks({"squad": tmp_path / "missing.json"}) == SYNTHETIC_TASKS


def test_qa_unavailable_without_files(tiny):
    with pytest.raises(ValueError, match=r"qa_1 is unavailable.*SQuAD.*qa_paths=\{'squad'"):
        generate_ruler(tiny, 2000, tasks=["qa_1"], num_samples=1)
    with pytest.raises(ValueError, match=r"qa_2 is unavailable.*HotpotQA.*qa_paths=\{'hotpotqa'"):
        generate_ruler(tiny, 2000, tasks=["niah_single_1", "qa_2"], num_samples=1, qa_paths={"squad": "x.json"})
    default = generate_ruler(tiny, 2000, tasks=None, num_samples=0)
    assert default.empty and list(default.columns)[:6] == [
        "context",
        "question",
        "answer_prefix",
        "answer",
        "max_new_tokens",
        "task",
    ]


def test_unknown_task_and_bad_length(tiny):
    with pytest.raises(ValueError, match="unknown RULER task"):
        generate_ruler(tiny, 2000, tasks=["niah_single_9"], num_samples=1)
    with pytest.raises(ValueError, match="max_seq_length"):
        generate_ruler(tiny, 0, tasks=["fwe"], num_samples=1)


def test_too_small_target_is_a_clear_error(tiny):
    # vt's few-shot example alone is longer than 600 byte-level tokens
    with pytest.raises(ValueError, match=r"vt: max_seq_length=600 is too small"):
        generate_ruler(tiny, 600, tasks=["vt"], num_samples=1)


# --------------------------------------------------------------------------------------------------------------------
# rows and the context / question split
# --------------------------------------------------------------------------------------------------------------------
def test_rows(frame):
    assert list(frame["task"].unique()) == list(SYNTHETIC_TASKS)
    for column in ("context", "question", "answer_prefix", "answer", "max_new_tokens", "task", "length", "index"):
        assert column in frame.columns
    for _, row in frame.iterrows():
        assert row.max_new_tokens == TOKENS_TO_GENERATE[row.task]
        assert isinstance(row.answer, list) and row.answer and all(isinstance(a, str) and a for a in row.answer)
        assert "\n" not in row.question  # synthetic questions are one line after the haystack
        assert ruler_prompt(row.context, row.question, row.answer_prefix) == (
            row.context + "\n" + row.question + row.answer_prefix
        )
    assert frame.groupby("task")["index"].apply(list).map(lambda v: v == list(range(len(v)))).all()


def _expected_question(row) -> tuple[str, str, str]:
    """(start of context, question, answer prefix) of RULER's template for this row."""
    task = row.task
    if task.startswith("niah"):
        singular, kind, _ = NIAH_SETTINGS[task]
        query = re.fullmatch(
            r"What (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?", row.question
        )[1]
        if singular:
            return (
                (
                    f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
                    f"I will quiz you about the {kind} afterwards.\n"
                ),
                f"What is the special magic {kind} for {query} mentioned in the provided text?",
                f" The special magic {kind} for {query} mentioned in the provided text is",
            )
        return (
            (
                f"Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
                f"I will quiz you about the {kind}s afterwards.\n"
            ),
            f"What are all the special magic {kind}s for {query} mentioned in the provided text?",
            f" The special magic {kind}s for {query} mentioned in the provided text are",
        )
    if task == "vt":
        value = re.fullmatch(
            r"Question: Find all variables that are assigned the value (\d{5}) in the text above\.", row.question
        )[1]
        return (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
            f"Question: Find all variables that are assigned the value {value} in the text above.",
            (
                " Answer: According to the chain(s) of variable assignment in the text above, "
                f"5 variables are assigned the value {value}, they are: "
            ),
        )
    if task == "cwe":
        return (
            (
                "Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n"
            ),
            "Question: What are the 10 most common words in the above list?",
            " Answer: The top 10 words that appear most often in the list are:",
        )
    assert task == "fwe"
    return (
        (
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words. "
        ),
        (
            "Question: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?"
        ),
        " Answer: According to the coded text above, the three most frequently appeared words are:",
    )


def test_templates_are_rulers(frame):
    for _, row in frame.iterrows():
        head, question, prefix = _expected_question(row)
        assert row.context.startswith(head), row.task
        assert row.question == question
        assert row.answer_prefix == prefix


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_singular_plural(tiny_frame, task):
    singular, kind, _ = NIAH_SETTINGS[task]
    row = tiny_frame[tiny_frame.task == task].iloc[0]
    if singular:
        assert row.context.startswith(f"A special magic {kind} is hidden")
        assert row.question.startswith(f"What is the special magic {kind} for ")
        assert row.answer_prefix.endswith(" is") and f" {kind}s " not in row.answer_prefix
    else:
        assert row.context.startswith(f"Some special magic {kind}s are hidden")
        assert row.question.startswith(f"What are all the special magic {kind}s for ")
        assert row.answer_prefix.endswith(" are")


# --------------------------------------------------------------------------------------------------------------------
# niah: needles, keys, values, haystacks
# --------------------------------------------------------------------------------------------------------------------
def _haystack(row) -> str:
    return row.context.split("afterwards.\n", 1)[1]


def test_niah_needles_and_answers(frame):
    for task in NIAH_TASKS:
        _, kind, haystack = NIAH_SETTINGS[task]
        value_re = UUID4 if kind == "uuid" else NUMBER
        for _, row in frame[frame.task == task].iterrows():
            query = re.search(r" for (.+) mentioned in the provided text\?$", row.question)[1]
            keys = query.replace(", and ", ", ").split(", ") if task == "niah_multiquery" else [query]
            needles = [m.groups() for m in NEEDLE.finditer(row.context)]
            assert {n[0] for n in needles} == {f"{kind}s"}  # the needle keeps RULER's plural value type
            for key in keys:
                assert re.fullmatch(UUID4, key) if task == "niah_multikey_3" else is_word_key(key), key
            for value in row.answer:
                assert re.fullmatch(value_re, value)
            # exactly the needles of the queried keys carry the answer (in query order; a key's values
            # in the order they were drawn, the needles themselves are shuffled)
            found = [sorted(v for (_, key, v) in needles if key == k) for k in keys]
            expected = [sorted(row.answer)] if task == "niah_multivalue" else [[v] for v in row.answer]
            assert found == expected
            if task == "niah_multikey_1":
                assert len(needles) == 4 and len({key for _, key, _ in needles}) == 4
            elif task == "niah_multivalue":
                assert len(needles) == 4 and {key for _, key, _ in needles} == {query}
            elif task == "niah_multiquery":
                assert len(needles) == 4 and len(set(keys)) == 4
            elif haystack != "needle":
                assert len(needles) == 1
            for _, _, v in needles:
                assert re.fullmatch(value_re, v)


def test_niah_haystacks(frame):
    for task in NIAH_TASKS:
        _, _, haystack = NIAH_SETTINGS[task]
        for _, row in frame[frame.task == task].iterrows():
            text = _haystack(row)
            if haystack == "noise":
                lines = [line for line in text.split("\n") if not NEEDLE.fullmatch(line)]
                assert lines[:-1] == [NOISE] * (len(lines) - 1)
                assert NOISE.startswith(lines[-1])  # the last noise line may be cut after a sentence
            elif haystack == "needle":  # distractor needles only, with other keys
                lines = text.split("\n")
                assert all(NEEDLE.fullmatch(line) for line in lines) and len(lines) > 2
                query = re.search(r" for (.+) mentioned", row.question)[1]
                keys = [NEEDLE.fullmatch(line)[2] for line in lines]
                assert keys.count(query) == 1 and len(set(keys)) == len(keys)
                if task == "niah_multikey_2":
                    assert all(is_word_key(k) for k in keys)
                else:
                    assert all(re.fullmatch(UUID4, k) for k in keys)
            else:  # essay: Paul Graham's essays from the start, needles between sentences
                assert NEEDLE.sub("", text).lstrip().startswith("July 2010What hard liquor, cigarettes, heroin, and")
                for match in NEEDLE.finditer(text):
                    before, after = text[: match.start()], text[match.end() :]
                    assert before == "" or before.endswith(" ")
                    assert after == "" or after.startswith(" ")
                    # between two sentences, or after the last (cut) sentence at depth 100
                    at_boundary = before == "" or before.rstrip()[-1] in ".?!\")]'" or NEEDLE.search(before[-80:])
                    assert at_boundary or NEEDLE.sub("", after).strip() == ""


# --------------------------------------------------------------------------------------------------------------------
# vt, cwe, fwe
# --------------------------------------------------------------------------------------------------------------------
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
ASSIGNMENT = re.compile(r"VAR ([A-Z]+) = (?:VAR ([A-Z]+)|(\d+))")


def _follow(text: str, value: str) -> list[str]:
    """Variables that end up with ``value``, in assignment order."""
    held: dict[str, str] = {}
    order = []
    for match in ASSIGNMENT.finditer(text):
        name, source, number = match.groups()
        held[name] = number if number is not None else held[source]
        order.append(name)
    return [name for name in order if held[name] == value]


def test_vt_chain(frame):
    for _, row in frame[frame.task == "vt"].iterrows():
        value = re.search(r"value (\d{5}) in", row.question)[1]
        assert row.context.count(VT_INSTRUCTION) == 2 and row.context.startswith(VT_INSTRUCTION)
        example, main = row.context.rsplit(VT_INSTRUCTION, 1)
        # the chain in the main text: 5 variables of 5 capital letters, each assigned once
        assert _follow(main, value) == row.answer
        assert len(row.answer) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in row.answer)
        assert len(ASSIGNMENT.findall(main)) == 5
        assert f"VAR {row.answer[0]} = {value}" in main
        for a, b in zip(row.answer, row.answer[1:]):
            assert f"VAR {b} = VAR {a} " in main
        # noise between the assignments
        assert main.count(NOISE) + main.count("The grass is green.") > 5
        # the few-shot example: a solved vt prompt with 3-letter variables
        ex = re.search(
            r"\nQuestion: Find all variables that are assigned the value (\d{5}) in the text above\. "
            r"Answer: According to the chain\(s\) of variable assignment in the text above, 5 variables are "
            r"assigned the value \1, they are: ([A-Z]{3}(?: [A-Z]{3}){4})\n\n$",
            example,
        )
        assert ex is not None
        assert _follow(example, ex[1]) == ex[2].split(" ")


def _cwe_entries(text: str) -> list[str]:
    entries = re.findall(r"(?:^| )(\d+)\. (.+?)(?= \d+\. |$)", text)
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    return [w for _, w in entries]


def _check_cwe(row, common: int, uncommon: int, example_counts: tuple[int, int, int]):
    head = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.\n"
    )
    assert row.context.startswith(head) and row.context.count(head) == 2
    example, main = row.context.rsplit(head, 1)
    counts = Counter(_cwe_entries(main))
    top = [w for w, c in counts.items() if c == common]
    assert sorted(top) == sorted(row.answer) and len(top) == 10
    assert set(counts.values()) == {common, uncommon}
    # the few-shot example: its list and its solved answer
    ex_list, ex_answer = example.split(head, 1)[1].split(
        "\nQuestion: What are the 10 most common words in the above list? "
        "Answer: The top 10 words that appear most often in the list are: "
    )
    ex_counts = Counter(_cwe_entries(ex_list))
    n_words, ex_common, ex_uncommon = example_counts
    assert len(ex_counts) == n_words and set(ex_counts.values()) == {ex_common, ex_uncommon}
    assert ex_answer.endswith("\n")
    answer_words = _cwe_entries(ex_answer.rstrip("\n"))
    assert sorted(answer_words) == sorted(w for w, c in ex_counts.items() if c == ex_common)
    assert not set(ex_counts) & set(counts)
    pool = ADJECTIVES | NOUNS | VERBS
    assert set(counts) <= pool and set(ex_counts) <= pool


def test_cwe_counts_below_4k(frame):
    for _, row in frame[frame.task == "cwe"].iterrows():
        _check_cwe(row, 6, 1, (20, 3, 1))


@pytest.mark.slow
def test_cwe_counts_from_4k(smol_frame_4k):
    for _, row in smol_frame_4k[smol_frame_4k.task == "cwe"].iterrows():
        _check_cwe(row, 30, 3, (40, 10, 3))


def test_fwe_frequencies(frame):
    for _, row in frame[frame.task == "fwe"].iterrows():
        coded = row.context.split("Find the three most frequently appeared coded words. ", 1)[1]
        counts = Counter(coded.split(" "))
        ranked = counts.most_common()
        assert ranked[0][0] == "..."  # rank 1 is the noise word
        words = [(w, c) for w, c in ranked if w != "..."]
        assert [w for w, _ in words[:3]] == row.answer
        assert words[0][1] > words[1][1] > words[2][1] > words[3][1]  # no ties around the answer
        assert all(re.fullmatch(r"[a-z]{6}", w) for w, _ in words)
        assert len(counts) <= (int(row.max_length) - 50) // 50
        # Zipf's law with alpha = 2: rank-k count = floor(N * k^-2 / zeta(2))
        share = 1 / sum(1 / k**2 for k in range(1, len(counts) + 1))
        assert counts["..."] == pytest.approx(sum(counts.values()) * share, rel=0.05)
        assert counts[row.answer[0]] == pytest.approx(counts["..."] / 4, abs=1)


# --------------------------------------------------------------------------------------------------------------------
# lengths
# --------------------------------------------------------------------------------------------------------------------
def _check_lengths(tokenizer, df, target: int, line_tolerant: tuple[str, ...] = ()):
    assert not df.empty
    for _, row in df.iterrows():
        text = row.context + "\n" + row.question + row.answer_prefix
        assert count_tokens(tokenizer, text) == row.length
        total = row.length + row.max_new_tokens
        assert total <= target
        if row.task in line_tolerant:  # a distractor line can be ~80-120 tokens: at most one line short
            line = max(count_tokens(tokenizer, "\n" + m[0]) for m in NEEDLE.finditer(row.context))
            assert total > target - line
        else:
            assert total >= 0.98 * target, (row.task, total)


@pytest.mark.parametrize("target", [2048, 4096])
def test_lengths_tiny_tokenizer(tiny, target):
    tasks = [t for t in SYNTHETIC_TASKS if not (t == "cwe" and target >= 4096)]  # cwe's 4k lists exceed 4k bytes
    df = generate_ruler(tiny, target, tasks=tasks, num_samples=3, seed=target)
    _check_lengths(tiny, df, target, line_tolerant=("niah_multikey_3",))


@pytest.mark.slow
@pytest.mark.parametrize("target", [512, 1024, 2048])
def test_lengths_default_tokenizer(smol, target):
    tasks = [t for t in SYNTHETIC_TASKS if target >= 1024 or t not in ("vt", "cwe")]  # their examples need ~1k
    df = generate_ruler(smol, target, tasks=tasks, num_samples=4, seed=target)
    _check_lengths(smol, df, target, line_tolerant=("niah_multikey_3",) if target < 2048 else ())


@pytest.mark.slow
def test_lengths_4k_default_tokenizer(smol, smol_frame_4k):
    _check_lengths(smol, smol_frame_4k, 4096)


@pytest.mark.slow
def test_generation_is_fast(smol):
    generate_ruler(smol, 1024, tasks=["niah_single_2"], num_samples=1)  # warm the per-tokenizer caches
    start = time.perf_counter()
    df = generate_ruler(smol, 1024, num_samples=20, seed=11)
    elapsed = time.perf_counter() - start
    assert len(df) == 11 * 20
    assert elapsed < 30, f"11 tasks x 20 samples at 1k took {elapsed:.1f} s"


# --------------------------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------------------------
def test_deterministic_and_independent_of_global_rng(tiny):
    tasks = ["niah_single_1", "niah_multikey_2", "vt", "cwe", "fwe"]
    random.seed(1)
    np.random.seed(1)
    state, np_state = random.getstate(), np.random.get_state()
    first = generate_ruler(tiny, 2500, tasks=tasks, num_samples=2, seed=7)
    assert random.getstate() == state  # the global generators are neither used nor advanced
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    random.seed(2)
    np.random.seed(2)
    second = generate_ruler(tiny, 2500, tasks=tasks, num_samples=2, seed=7)
    pd.testing.assert_frame_equal(first, second)
    other = generate_ruler(tiny, 2500, tasks=tasks, num_samples=2, seed=8)
    for a, b in zip(first["answer"], other["answer"]):
        assert a != b
    assert (first["context"] != other["context"]).all()


def test_different_samples_differ(tiny_frame):
    for task, rows in tiny_frame.groupby("task"):
        answers = [tuple(a) for a in rows["answer"]]
        assert len(set(answers)) == len(answers), task


# --------------------------------------------------------------------------------------------------------------------
# QA
# --------------------------------------------------------------------------------------------------------------------
def test_qa_loaders(qa_files):
    squad = load_squad(qa_files["squad"])
    assert len(squad.documents) == 9 and len(squad.questions) == 9  # the unanswerable ones are dropped
    q = next(q for q in squad.questions if q["query"] == "Which town is number 4?")
    assert q["outputs"] == ["Zorg4"]  # duplicate answer texts are merged
    assert squad.documents[q["context"][0]].endswith("Town 4 is Zorg4.")
    assert len(q["more_context"]) == 2  # the other paragraphs of its article
    hotpot = load_hotpotqa(qa_files["hotpotqa"])
    assert len(hotpot.questions) == 4 and len(hotpot.documents) == 40
    assert hotpot.documents[hotpot.questions[0]["context"][0]] == "Title 0-0\nFirst sentence of 0-0. It names Kell00."
    with pytest.raises(FileNotFoundError):
        load_squad(qa_files["squad"] + ".missing")
    with pytest.raises(ValueError, match="not a HotpotQA"):
        load_hotpotqa(qa_files["squad"])


def _qa_documents(context: str) -> list[str]:
    body = context.split("The following are given documents.\n\n", 1)[1].rstrip("\n")
    docs = re.split(r"\n\n(?=Document \d+:\n)", body)
    assert [int(re.match(r"Document (\d+):\n", d)[1]) for d in docs] == list(range(1, len(docs) + 1))
    return [d.split(":\n", 1)[1] for d in docs]


def test_qa_generation(tiny, qa_files):
    target = 1500
    df = generate_ruler(tiny, target, tasks=["qa_1", "qa_2"], num_samples=3, qa_paths=qa_files, seed=0)
    assert list(df.task) == ["qa_1"] * 3 + ["qa_2"] * 3
    instruction = (
        "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    )
    squad, hotpot = load_squad(qa_files["squad"]), load_hotpotqa(qa_files["hotpotqa"])
    for _, row in df.iterrows():
        data = squad if row.task == "qa_1" else hotpot
        assert row.max_new_tokens == 32 and row.answer_prefix == " Answer:"
        query = re.fullmatch(instruction + r"\n\nQuestion: (.+)", row.question)[1]
        question = next(q for q in data.questions if q["query"] == query)
        assert row.answer == question["outputs"]
        docs = _qa_documents(row.context)
        assert all(data.documents[d] in docs for d in question["context"])  # gold documents
        assert len(set(docs)) == len(docs) and set(docs) <= set(data.documents)
        full = QA_TEMPLATE_TEXT.format(
            context="\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(docs)), query=query
        )
        assert row.context + "\n" + row.question == full
        assert row.context.endswith("\n") and not row.context.endswith("\n\n")
        assert count_tokens(tiny, full + row.answer_prefix) == row.length
        assert row.length + 32 <= target
    # the hotpot samples carry their ten paragraphs plus distractors; squad ones never an unanswerable question
    assert all(len(_qa_documents(c)) >= 10 for c in df[df.task == "qa_2"].context)
    assert not df.question.str.contains("Unanswerable").any()


QA_TEMPLATE_TEXT = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\n"
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nQuestion: {query}"
)


def test_qa_fills_with_whole_documents(tiny, qa_files):
    # 9 documents of ~320 bytes: 1000 tokens hold only some of them, never a cut one
    df = generate_ruler(tiny, 1000, tasks=["qa_1"], num_samples=2, qa_paths={"qa_1": qa_files["squad"]}, seed=1)
    squad = load_squad(qa_files["squad"])
    for _, row in df.iterrows():
        docs = _qa_documents(row.context)
        assert 1 <= len(docs) < 9 and set(docs) <= set(squad.documents)
        assert row.length + 32 <= 1000


# --------------------------------------------------------------------------------------------------------------------
# chat template
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prompts_through_the_chat_template(smol, smol_frame):
    overheads = set()
    for _, row in smol_frame.groupby("task").head(1).iterrows():
        for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
            assert special not in row.context + row.question
        user = row.context + "\n" + row.question
        text = smol.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\n")
        assert f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n" in text
        assert text.endswith("<|im_start|>assistant\n")
        ids = smol(text + row.answer_prefix, add_special_tokens=False)["input_ids"]
        overheads.add(len(ids) - row.length)
        # kvpress's pipeline: the chat template splits around the context, the question follows it
        separator = "#" * (len(row.context) + 10)
        wrapped = smol.apply_chat_template(
            [{"role": "user", "content": row.context + separator}], tokenize=False, add_generation_prompt=True
        )
        prefix_part, suffix = wrapped.split(separator)
        assert prefix_part.endswith(row.context) and suffix == "<|im_end|>\n<|im_start|>assistant\n"
        assert prefix_part + "\n" + row.question + suffix + row.answer_prefix == text + row.answer_prefix
    assert len(overheads) == 1 and 0 < overheads.pop() < 40  # the template adds the same few tokens to every prompt


# --------------------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------------------
def test_string_match_all():
    assert string_match_all(["The numbers are 1234567 and 7654321."], [["1234567", "7654321"]]) == 100.0
    assert string_match_all(["only 1234567"], [["1234567", "7654321"]]) == 50.0
    assert string_match_all(["a b"], [["a", "b", "c"]]) == 66.67  # x100, 2 decimals
    assert string_match_all(["  AbC-DeF \n"], [["abc-def"]]) == 100.0  # case-insensitive
    assert string_match_all(["12\x0034\x1f567"], [["1234567"]]) == 100.0  # \x00-\x1f removed, not replaced
    assert string_match_all(["line1\nline2"], [["line1line2"]]) == 100.0
    assert string_match_all([None, ""], [["x"], ["x"]]) == 0.0
    assert string_match_all(["x", "y"], [["x"], ["x"]]) == 50.0  # averaged over samples
    assert string_match_all(["x"], ["x"]) == 100.0  # a single reference string
    assert string_match_all([], []) == 0.0
    with pytest.raises(ValueError):
        string_match_all(["x"], [])


def test_string_match_part():
    assert string_match_part(["It was Paris."], [["London", "paris"]]) == 100.0
    assert string_match_part(["no idea"], [["London", "Paris"]]) == 0.0
    assert string_match_part(["Paris", "Rome", "x"], [["Paris"], ["rome", "Roma"], ["y"]]) == 66.67
    assert string_match_part(["\x07Paris\x00"], [["paris"]]) == 100.0
    assert string_match_part([float("nan")], [["a"]]) == 0.0


def test_score_ruler_uses_each_tasks_metric():
    df = pd.DataFrame(
        {
            "task": ["niah_multivalue", "niah_multivalue", "qa_1", "qa_1", "vt"],
            "answer": [["1111111", "2222222"], ["3333333"], ["Paris", "City of Paris"], ["Rome"], list("ABCDE")],
            "predicted_answer": ["1111111", " 3333333\n", "paris", "I do not know", "A B C"],
        }
    )
    scores = score_ruler(df)
    assert list(scores) == ["niah_multivalue", "vt", "qa_1", "average"]  # RULER's task order
    assert scores["niah_multivalue"] == 75.0  # all: (1/2 + 1) / 2
    assert scores["qa_1"] == 50.0  # part: (1 + 0) / 2
    assert scores["vt"] == 60.0
    assert scores["average"] == round((75.0 + 50.0 + 60.0) / 3, 2)
    # answers as arrays (a parquet round trip) score the same
    df["answer"] = df["answer"].map(np.array)
    assert score_ruler(df) == scores
    with pytest.raises(KeyError, match="predicted_answer"):
        score_ruler(df.drop(columns="predicted_answer"))


def test_score_ruler_on_generated_rows(tiny_frame):
    perfect = tiny_frame.assign(predicted_answer=tiny_frame["answer"].map(lambda a: " ".join(a)))
    scores = score_ruler(perfect)
    assert all(scores[t] == 100.0 for t in SYNTHETIC_TASKS) and scores["average"] == 100.0
    empty = tiny_frame.assign(predicted_answer="")
    assert score_ruler(empty)["average"] == 0.0


def test_module_does_not_print(tiny, capsys):
    generate_ruler(tiny, 2000, tasks=["fwe"], num_samples=1)
    assert capsys.readouterr().out == ""


def test_depths_are_rulers():
    assert R._DEPTHS == [round(100 * i / 39) for i in range(40)] and R._DEPTHS[0] == 0 and R._DEPTHS[-1] == 100
