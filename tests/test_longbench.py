"""LongBench v1 / LongBench-E / v2: prompts, loaders, truncation and LongBench's metrics on hand-made cases.

Every file the tests read is a small fixture written here in LongBench's raw formats; the numbers
below are worked out by hand from those fixtures and are not LongBench scores of any model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from pikvpress_eval.benchmarks import longbench as lb
from pikvpress_eval.benchmarks.longbench import (
    DATASET2MAXLEN,
    DATASET2METRIC,
    DATASET2PROMPT,
    LONGBENCH_E_TASKS,
    LONGBENCH_TASKS,
    LONGBENCH_V2_TEMPLATE,
    build_prompt,
    classification_score,
    code_sim_score,
    count_score,
    extract_answer_v2,
    load_longbench,
    load_longbench_v2,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
    score_longbench,
    score_longbench_v2,
    score_sample,
    truncate_middle,
    truncate_prompt,
)

pytest.importorskip("rouge")
pytest.importorskip("jieba")
pytest.importorskip("fuzzywuzzy")


# --------------------------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------------------------
def test_qa_f1_articles_and_punctuation():
    # "the eiffel tower in paris" -> articles gone -> 4 tokens vs 2: P = 1/2, R = 1, F1 = 2/3
    assert qa_f1_score("The Eiffel Tower, in Paris!", "Eiffel Tower") == pytest.approx(2 / 3)
    assert qa_f1_score("An apple.", "apple") == 1.0
    assert qa_f1_score("the", "a") == 0.0  # both normalise to nothing
    assert qa_f1_score("bananas", "an banana") == 0.0  # "an" is dropped only as a whole word
    # multiplicity counts: pred "b b c" vs "b c c": common {b:1, c:1} = 2 -> P = R = 2/3
    assert qa_f1_score("b b c", "b c c") == pytest.approx(2 / 3)


def test_qa_f1_zh():
    # jieba: 我 / 爱 / 北京 vs 北京 -> P = 1/3, R = 1, F1 = 1/2
    assert qa_f1_zh_score("我爱北京", "北京") == pytest.approx(0.5)
    assert qa_f1_zh_score("北京。", "北京") == 1.0  # the full stop normalises to an empty word, dropped
    assert qa_f1_zh_score("上海", "北京") == 0.0


def test_rouge_l_f():
    # distinct words 5 and 5, union LCS "the cat on mat" = 4: P = R = 0.8
    assert rouge_score("the cat sat on mat", "the cat lay on mat") == pytest.approx(0.8, abs=1e-6)
    assert rouge_score("the cat", "the cat") == pytest.approx(1.0, abs=1e-6)
    assert rouge_score("", "anything") == 0.0  # rouge raises on an empty hypothesis: scored 0
    assert rouge_score("...", "anything") == 0.0


def test_rouge_zh():
    # 我 爱 北京 vs 北京: n = 3, m = 1, LCS 1 -> P = 1/3, R = 1, F = 1/2
    assert rouge_zh_score("我爱北京", "北京") == pytest.approx(0.5, abs=1e-6)
    assert rouge_zh_score("我爱北京", "我爱北京") == pytest.approx(1.0, abs=1e-6)


def test_classification_two_classes_named():
    classes = ["Location", "Person", "Number"]
    assert classification_score("Location or Person", "Location", all_classes=classes) == 0.5
    assert classification_score("It is a Location", "Location", all_classes=classes) == 1.0
    assert classification_score("Person", "Location", all_classes=classes) == 0.0
    assert classification_score("no idea", "Location", all_classes=classes) == 0.0


def test_classification_substring_removal_as_longbench():
    # found [a, ab, abc]; "a" (a strict substring of the truth) is removed while iterating, so "ab"
    # is skipped and stays: 1/2, not 1
    assert classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5
    # found [ab, abc]: "ab" removed, "abc" kept -> 1
    assert classification_score("abc", "abc", all_classes=["ab", "abc"]) == 1.0
    with pytest.raises(ValueError):
        classification_score("abc", "abc")


def test_retrieval_and_count_fractions():
    assert retrieval_score("Paragraph 3, maybe Paragraph 5", "Paragraph 3") == 0.5
    assert retrieval_score("Paragraph 13", "Paragraph 3") == 0.0  # whole numbers, not digits
    assert retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert retrieval_zh_score("段落2和段落12，段落2", "段落2") == pytest.approx(2 / 3)
    assert retrieval_zh_score("段落2", "段落2") == 1.0
    assert count_score("There are 7 unique paragraphs out of 10", "7") == 0.5
    assert count_score("7", "7") == 1.0
    assert count_score("seven", "7") == 0.0
    with pytest.raises(ValueError):
        retrieval_score("Paragraph 1", "no paragraph")


def test_code_sim_skips_comment_lines():
    # first line without ` # // is "x = 1"
    assert code_sim_score("\n# comment\n```python\nx = 1\ny = 2", "x = 1") == 1.0
    # "abcd" vs "abce": 3 matching characters of 8 -> ratio 75
    assert code_sim_score("// note\nabcd", "abce") == 0.75
    assert code_sim_score("# only\n`comments`", "abc") == 0.0  # compared as ""


def test_dataset2metric_table():
    assert set(DATASET2METRIC) == set(LONGBENCH_TASKS)
    expected = {
        qa_f1_score: {"narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"},
        qa_f1_zh_score: {"multifieldqa_zh"},
        rouge_score: {"gov_report", "qmsum", "multi_news", "samsum"},
        rouge_zh_score: {"dureader", "vcsum"},
        classification_score: {"trec", "lsht"},
        retrieval_score: {"passage_retrieval_en"},
        retrieval_zh_score: {"passage_retrieval_zh"},
        count_score: {"passage_count"},
        code_sim_score: {"lcc", "repobench-p"},
    }
    for metric, tasks in expected.items():
        assert {t for t, m in DATASET2METRIC.items() if m is metric} == tasks


def test_first_line_rule():
    classes = ["Location", "Person"]
    # trec: only "Location" is read -> 1; the whole text names two classes -> would be 1/2
    assert score_sample("trec", "\nLocation\nPerson", ["Location"], classes) == 1.0
    assert classification_score("\nLocation\nPerson", "Location", all_classes=classes) == 0.5
    assert score_sample("triviaqa", "Paris\nQuestion: next one", ["City of Paris", "Paris"]) == 1.0
    # passage_count is not a first-line task: numbers 7 and 8 -> 1/2
    assert score_sample("passage_count", "7\n8", ["7"]) == 0.5
    assert score_sample("hotpotqa", None, ["x"]) == 0.0
    # best reference wins
    assert score_sample("hotpotqa", "Eiffel Tower", ["Paris", "the Eiffel Tower"]) == 1.0


# --------------------------------------------------------------------------------------------------------------------
# prompts and loaders
# --------------------------------------------------------------------------------------------------------------------
def _record(task: str, i: int, **extra) -> dict:
    record = {
        "input": f"What is item {i}? {{input}} stays literal",
        "context": f"Document {i} of {task} with braces {{context}} and\nnewlines.",
        "answers": [f"answer {i}"],
        "length": 1000 * (i + 1),
        "dataset": task,
        "language": "en",
        "all_classes": None,
        "_id": f"{task}-{i}",
    }
    record.update(extra)
    return record


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.mark.parametrize("task", LONGBENCH_TASKS)
def test_build_prompt_is_longbench_prompt(task):
    record = _record(task, 0)
    context, question = build_prompt(task, record["context"], record["input"])
    assert context + question == DATASET2PROMPT[task].format(**record)
    assert context.endswith(record["context"])
    assert record["context"] not in question


def test_prompt_strings_spot_checks():
    # a few characters that are easy to get wrong, straight from LongBench's dataset2prompt.json
    assert "Answer the question asconcisely as you can" in DATASET2PROMPT["narrativeqa"]
    assert "\n\n Answer the question based on the above article" in DATASET2PROMPT["qasper"]
    assert DATASET2PROMPT["multi_news"].startswith(
        "You are given several news passages. Write a one-page summary of all news. \n\n"
    )
    assert DATASET2PROMPT["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert DATASET2PROMPT["passage_count"].endswith("The final answer is: ")
    assert DATASET2PROMPT["passage_retrieval_zh"].endswith('答案格式必须是"段落1"，"段落2"等格式\n\n答案是：')
    assert LONGBENCH_V2_TEMPLATE.endswith(
        'Format your response as follows: "The correct answer is (insert answer here)".'
    )


def test_max_new_tokens_per_task():
    expected = {
        128: {"narrativeqa", "qasper", "dureader", "samsum"},
        64: {"multifieldqa_en", "multifieldqa_zh", "trec", "lsht", "lcc", "repobench-p"},
        32: {
            "hotpotqa",
            "2wikimqa",
            "musique",
            "triviaqa",
            "passage_count",
            "passage_retrieval_en",
            "passage_retrieval_zh",
        },
        512: {"gov_report", "qmsum", "multi_news", "vcsum"},
    }
    for tokens, tasks in expected.items():
        assert {t for t, n in DATASET2MAXLEN.items() if n == tokens} == tasks
    assert set(DATASET2MAXLEN) == set(LONGBENCH_TASKS) and len(LONGBENCH_TASKS) == 21
    assert len(LONGBENCH_E_TASKS) == 13 and set(LONGBENCH_E_TASKS) <= set(LONGBENCH_TASKS)


def test_load_local_directory(tmp_path):
    tasks = ["hotpotqa", "trec", "lcc", "multifieldqa_zh"]
    records = {}
    for task in tasks:
        extra = {"all_classes": ["Location", "Person"]} if task == "trec" else {}
        if task == "lcc":
            extra["input"] = ""
        records[task] = [_record(task, i, **extra) for i in range(2)]
        _write_jsonl(tmp_path / f"{task}.jsonl", records[task])
    df = load_longbench(tmp_path, tasks)
    assert list(df.columns[:6]) == ["context", "question", "answer_prefix", "answer", "max_new_tokens", "task"]
    assert len(df) == 8 and list(df["task"].unique()) == tasks
    for row in df.to_dict("records"):
        record = next(r for r in records[row["task"]] if r["_id"] == row["_id"])
        assert row["context"] + row["question"] == DATASET2PROMPT[row["task"]].format(**record)
        assert row["answer_prefix"] == ""
        assert row["answer"] == record["answers"]
        assert row["max_new_tokens"] == DATASET2MAXLEN[row["task"]]
        assert row["use_chat_template"] == (row["task"] not in {"trec", "lcc"})
        assert row["length"] == record["length"] and row["language"] == "en"
        assert not row["longbench_e"]
    trec = df[df["task"] == "trec"].iloc[0]
    assert trec["all_classes"] == ["Location", "Person"]
    assert df[df["task"] == "hotpotqa"].iloc[0]["all_classes"] is None


def test_load_longbench_e(tmp_path):
    _write_jsonl(tmp_path / "qasper_e.jsonl", [_record("qasper_e", i) for i in range(3)])
    df = load_longbench(str(tmp_path), ["qasper"], e=True)
    assert len(df) == 3 and df["longbench_e"].all() and (df["task"] == "qasper").all()
    assert list(df["length"]) == [1000, 2000, 3000]
    assert (df["max_new_tokens"] == 128).all()
    # tasks given with the suffix are accepted too
    assert len(load_longbench(tmp_path, "qasper_e", e=True)) == 3


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown LongBench task"):
        load_longbench(tmp_path, ["not_a_task"])
    with pytest.raises(ValueError, match="not a LongBench-E task"):
        load_longbench(tmp_path, ["narrativeqa"], e=True)
    with pytest.raises(FileNotFoundError, match="hotpotqa"):
        load_longbench(tmp_path, ["hotpotqa"])
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        load_longbench(tmp_path / "missing", ["hotpotqa"])
    (tmp_path / "musique.jsonl").write_text('{"input": "q", "context": "c"}\n')
    with pytest.raises(ValueError, match="lacks answers"):
        load_longbench(tmp_path, ["musique"])
    (tmp_path / "qasper.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="qasper.jsonl:1"):
        load_longbench(tmp_path, ["qasper"])
    with pytest.raises(FileNotFoundError):
        load_longbench_v2(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="data.json"):
        load_longbench_v2(tmp_path)
    with pytest.raises(ValueError, match="unknown LongBench task"):
        score_sample("nope", "x", ["x"])


def test_kvpress_hub_rows_are_resplit():
    """kvpress's hub rows (prompt cut in three, last words in answer_prefix) become LongBench's prompt."""
    record = _record("narrativeqa", 0)
    rows = []
    for task in ("narrativeqa", "trec", "gov_report", "lcc"):
        head, after = DATASET2PROMPT[task].split("{context}")
        inp = record["input"] + ("\nType:" if task == "trec" else "")
        if task == "lcc":
            inp = ""
        if task == "narrativeqa":  # kvpress: context ends before "Question:", answer_prefix "Answer:"
            cut = after.index("Question: ")
            hub = (head + record["context"] + after[:cut], f"Question: {inp}\n\n", "Answer:")
        elif task == "trec":  # question = input without "Type:", which becomes the answer prefix
            hub = (head + record["context"] + "\n", inp.removesuffix("Type:"), "Type:")
        elif task == "gov_report":
            hub = (head + record["context"] + "\n\n", "Now, write a one-page summary of the report.\n\n", "Summary:")
        else:
            hub = (head + record["context"], "", "Next line of code:\n")
        frame = pd.DataFrame(
            [
                {
                    "context": hub[0],
                    "question": hub[1],
                    "answer_prefix": hub[2],
                    "answers": np.array(["a"]),
                    "length": 5,
                    "dataset": task,
                    "language": "en",
                    "all_classes": None,
                    "_id": "x",
                    "task": task,
                    "max_new_tokens": 999,
                }
            ]
        )
        (row,) = lb._rows_from_frame(task, frame, False, "fixture")
        assert row["context"] + row["question"] == DATASET2PROMPT[task].format(context=record["context"], input=inp)
        assert row["context"] == head + record["context"]
        assert row["answer_prefix"] == "" and row["max_new_tokens"] == DATASET2MAXLEN[task]
        assert row["answer"] == ["a"]
        rows.append(row)
    # rows that are not LongBench's prompt are kept whole (context + question + answer_prefix)
    odd = pd.DataFrame(
        [{"context": "free text", "question": "Q?", "answer_prefix": "A:", "answers": ["a"], "length": 1}]
    )
    (row,) = lb._rows_from_frame("hotpotqa", odd, False, "fixture")
    assert (row["context"], row["question"]) == ("free text", "Q?A:")


# --------------------------------------------------------------------------------------------------------------------
# LongBench v2
# --------------------------------------------------------------------------------------------------------------------
def _v2_item(i: int, difficulty: str, length: str, answer: str) -> dict:
    return {
        "_id": f"v2-{i}",
        "domain": "Single-Document QA",
        "sub_domain": "Academic",
        "difficulty": difficulty,
        "length": length,
        "question": f"  Which option is right for item {i}?  ",
        "choice_A": " first ",
        "choice_B": "second",
        "choice_C": "third",
        "choice_D": "fourth",
        "answer": answer,
        "context": f"\n  A long document {i}; it mentions $Q$ literally.  \n",
    }


def _v2_reference_prompt(item: dict) -> str:
    """LongBench v2 pred.py's fill: placeholders replaced in turn over the whole prompt."""
    return (
        LONGBENCH_V2_TEMPLATE.replace("$DOC$", item["context"].strip())
        .replace("$Q$", item["question"].strip())
        .replace("$C_A$", item["choice_A"].strip())
        .replace("$C_B$", item["choice_B"].strip())
        .replace("$C_C$", item["choice_C"].strip())
        .replace("$C_D$", item["choice_D"].strip())
    )


def test_load_longbench_v2_json_and_jsonl(tmp_path):
    items = [_v2_item(0, "easy", "short", "A"), _v2_item(1, "hard", "long", "C")]
    (tmp_path / "data.json").write_text(json.dumps(items), encoding="utf-8")
    _write_jsonl(tmp_path / "v2.jsonl", items)
    for source in (tmp_path, tmp_path / "data.json", str(tmp_path / "v2.jsonl")):
        df = load_longbench_v2(source)
        assert len(df) == 2
        for row, item in zip(df.itertuples(), items):
            assert row.context + row.question == _v2_reference_prompt(item)
            assert row.context.endswith("it mentions " + item["question"].strip() + " literally.")
            assert row.question.startswith("\n</text>\n\nWhat is the correct answer to this question:")
            assert row.answer_prefix == "" and row.max_new_tokens == 128 and row.task == "longbench-v2"
            assert row.use_chat_template
        assert list(df["difficulty"]) == ["easy", "hard"] and list(df["length"]) == ["short", "long"]
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="lacks"):
        load_longbench_v2(tmp_path / "bad.json")


def test_kvpress_v2_hub_rows_are_rebuilt():
    item = _v2_item(0, "easy", "short", "B")
    # simonjegou/LongBench-v2 style: one newline after "below.", raw (unstripped) fields
    hub = dict(
        item,
        context=(
            f"Please read the following text and answer the question below.\n<text>\n{item['context']}\n</text>\n\n"
        ),
        question=(
            f"What is the correct answer to this question: {item['question']}\nChoices:\n(A) {item['choice_A']}\n"
            f"(B) {item['choice_B']}\n(C) {item['choice_C']}\n(D) {item['choice_D']}\n\n"
            'Format your response as follows: "The correct answer is (insert answer here)."'
        ),
    )
    document, question = lb._split_kvpress_v2(hub)
    row = lb._row_v2(dict(hub, context=document, question=question))
    assert row["context"] + row["question"] == _v2_reference_prompt(item)
    assert lb._split_kvpress_v2(item) is None  # raw items are not mistaken for templated rows


def test_v2_answer_extraction():
    assert extract_answer_v2("The correct answer is (B)") == "B"
    assert extract_answer_v2("  **The correct answer is C**") == "C"
    assert extract_answer_v2("The correct answer is (D). Because ...") == "D"
    assert extract_answer_v2("The correct answer is A, or rather The correct answer is (B)") == "B"  # first regex first
    assert extract_answer_v2("I think (A)") is None
    assert extract_answer_v2("the correct answer is (A)") is None  # case-sensitive, as LongBench
    assert extract_answer_v2(None) is None


def test_score_longbench_v2_breakdowns():
    rows = [
        ("easy", "short", "A", "The correct answer is (A)"),  # right
        ("easy", "medium", "B", "The correct answer is C"),  # wrong
        ("hard", "long", "C", "**The correct answer is (C)**"),  # right
        ("hard", "short", "D", "no idea"),  # unparsed
        ("hard", "medium", "A", "The correct answer is A"),  # right
    ]
    df = pd.DataFrame(rows, columns=["difficulty", "length", "answer", "predicted_answer"])
    scores = score_longbench_v2(df)
    assert scores == {"overall": 60.0, "easy": 50.0, "hard": 66.7, "short": 50.0, "medium": 50.0, "long": 100.0}
    compensated = score_longbench_v2(df, compensated=True)
    assert compensated["overall"] == 65.0 and compensated["hard"] == 75.0 and compensated["short"] == 62.5


# --------------------------------------------------------------------------------------------------------------------
# scoring frames
# --------------------------------------------------------------------------------------------------------------------
def test_score_longbench_per_task():
    df = pd.DataFrame(
        [
            {
                "task": "hotpotqa",
                "predicted_answer": "The Eiffel Tower, in Paris!",
                "answer": ["Eiffel Tower"],
                "all_classes": None,
            },
            {"task": "hotpotqa", "predicted_answer": "Paris", "answer": ["Lyon", "paris"], "all_classes": None},
            {
                "task": "trec",
                "predicted_answer": "Location\nPerson",
                "answer": ["Location"],
                "all_classes": ["Location", "Person"],
            },
            {
                "task": "trec",
                "predicted_answer": "Person or Location",
                "answer": ["Location"],
                "all_classes": ["Location", "Person"],
            },
            {"task": "passage_count", "predicted_answer": "3 or 4", "answer": ["4"], "all_classes": None},
        ]
    )
    scores = score_longbench(df)
    # hotpotqa (2/3 + 1) / 2 = 83.33; trec (1 + 1/2) / 2 = 75; passage_count 1/2 = 50
    assert scores == {"hotpotqa": 83.33, "trec": 75.0, "passage_count": 50.0, "average": 69.44}
    per_row = lb.sample_scores(df)
    assert per_row.tolist() == pytest.approx([2 / 3, 1.0, 1.0, 0.5, 0.5])
    with pytest.raises(KeyError):
        score_longbench(df.drop(columns="predicted_answer"))


def test_score_longbench_e_buckets():
    lengths = [100, 3999, 4000, 7999, 8000, 20000]
    predictions = ["7", "8", "7", "7", "8", "3 and 7"]  # scores 1, 0, 1, 1, 0, 1/2
    df = pd.DataFrame(
        {
            "task": "passage_count",
            "predicted_answer": predictions,
            "answer": [["7"]] * 6,
            "length": lengths,
            "longbench_e": True,
        }
    )
    scores = score_longbench(df)
    assert scores["passage_count"] == {"0-4k": 50.0, "4-8k": 100.0, "8k+": 25.0, "all": 58.33}
    assert scores["average"] == 58.33 and scores["0-4k"] == 50.0
    # an empty bucket is NaN, as LongBench's np.mean of nothing
    short = score_longbench(df.iloc[:2], e=True)
    assert short["passage_count"]["0-4k"] == 50.0 and math.isnan(short["passage_count"]["8k+"])
    # without the flag (or e=False) the same rows are scored as LongBench v1
    assert score_longbench(df, e=False) == {"passage_count": 58.33, "average": 58.33}


# --------------------------------------------------------------------------------------------------------------------
# truncation
# --------------------------------------------------------------------------------------------------------------------
def test_truncate_middle_ids():
    ids = list(range(10))
    assert truncate_middle(ids, None, 4) == [0, 1, 8, 9]
    assert truncate_middle(ids, None, 5) == [0, 1, 8, 9]  # v1: int(5 / 2) = 2 each side
    assert truncate_middle(ids, None, 5, rule="v2") == [0, 1, 7, 8, 9]  # v2: 5 // 2 first, the rest last
    assert truncate_middle(ids, None, 10) == ids
    assert truncate_middle(torch.arange(10)[None], None, 4).tolist() == [[0, 1, 8, 9]]
    assert truncate_middle(np.arange(10), None, 6).tolist() == [0, 1, 2, 7, 8, 9]
    with pytest.raises(ValueError):
        truncate_middle(ids, None, 1)
    with pytest.raises(ValueError):
        truncate_middle("text", None, 4)


def test_truncate_middle_text(tokenizer):
    # the test tokenizer has one token per byte and adds no special tokens
    assert tokenizer("abcdefghij").input_ids.__len__() == 10
    assert truncate_middle("abcdefghij", tokenizer, 4) == "abij"
    assert truncate_middle("abcdefghij", tokenizer, 5, rule="v2") == "abhij"
    text = "short"
    assert truncate_middle(text, tokenizer, 10) is text
    assert truncate_prompt("x" * 20, "Q?", tokenizer, 10) == ("x" * 8, "Q?")
    assert truncate_prompt("ctx", "Q?", tokenizer, 10) == ("ctx", "Q?")
    # the cut reaches into the question: the whole truncated prompt becomes the context
    assert truncate_prompt("abc", "defghijkl", tokenizer, 4) == ("abkl", "")


# --------------------------------------------------------------------------------------------------------------------
# hub sources (datasets.load_dataset replaced: no network)
# --------------------------------------------------------------------------------------------------------------------
class _FakeSplit:
    def __init__(self, frame: pd.DataFrame):
        self.frame = frame

    def to_pandas(self) -> pd.DataFrame:
        return self.frame


def test_hub_sources_use_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []
    record = _record("trec", 0, all_classes=np.array(["Location", "Person"]))
    head, _ = DATASET2PROMPT["trec"].split("{context}")
    hub_row = {
        "context": head + record["context"] + "\n",
        "question": record["input"],  # kvpress: the input without its trailing "Type:"
        "answer_prefix": "Type:",
        "answers": np.array(["Location"]),
        "all_classes": record["all_classes"],
        "length": 123,
        "_id": "t0",
    }
    item = _v2_item(0, "hard", "medium", "D")
    v2_row = dict(
        item,
        context=(
            f"Please read the following text and answer the question below.\n<text>\n{item['context']}\n</text>\n\n"
        ),
        question=(
            f"What is the correct answer to this question: {item['question']}\nChoices:\n(A) {item['choice_A']}\n"
            f"(B) {item['choice_B']}\n(C) {item['choice_C']}\n(D) {item['choice_D']}\n\nFormat ..."
        ),
    )

    def fake_load_dataset(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return _FakeSplit(pd.DataFrame([v2_row if "v2" in name.lower() else hub_row]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    df = load_longbench("Xnhyacinth/LongBench", ["trec"])
    assert calls == [("Xnhyacinth/LongBench", "trec", "test")]
    row = df.iloc[0]
    assert row["context"] + row["question"] == DATASET2PROMPT["trec"].format(
        context=record["context"], input=record["input"] + "Type:"
    )
    assert row["all_classes"] == ["Location", "Person"] and row["answer"] == ["Location"]
    assert not row["use_chat_template"] and row["max_new_tokens"] == 64
    load_longbench("hf:someone/LongBench", "trec", e=True)
    assert calls[-1] == ("someone/LongBench", "trec_e", "test")
    v2 = load_longbench_v2("simonjegou/LongBench-v2")
    assert calls[-1] == ("simonjegou/LongBench-v2", None, "test")
    assert v2.iloc[0]["context"] + v2.iloc[0]["question"] == _v2_reference_prompt(item)
    # a path that does not exist is a missing file, never a hub lookup
    n = len(calls)
    with pytest.raises(FileNotFoundError):
        load_longbench("some/missing_dir", ["trec"])
    with pytest.raises(FileNotFoundError):
        load_longbench_v2("some/missing.json")
    assert len(calls) == n
