"""LongBench (v1 and LongBench-E) and LongBench v2 as kvpress rows, with LongBench's own scoring.

Rows have the columns ``context, question, answer_prefix, answer, max_new_tokens, task`` plus what
scoring and the runner need. Each LongBench prompt (``config/dataset2prompt.json`` of
THUDM/LongBench, v1; ``prompts/0shot.txt``, v2) is split where the inserted document ends, so that
a press compresses the document and the question comes after it::

    context  = the prompt up to the end of the inserted {context}
    question = the rest of the prompt, with {input} filled
    answer_prefix = ""

and ``context + question`` is exactly LongBench's prompt. (kvpress's hub copies move the last
words of the prompt, e.g. ``Answer:``, into ``answer_prefix``, which kvpress's pipeline puts after
the chat template's assistant header; here they stay in the user turn, as in LongBench.)

Sources: a local directory of LongBench's raw ``{task}.jsonl`` files (``{task}_e.jsonl`` for
LongBench-E), a local LongBench v2 ``data.json`` / JSONL file, or, only when named, the hub
datasets kvpress uses (``Xnhyacinth/LongBench``, ``simonjegou/LongBench-v2``; any other hub name
with the prefix ``hf:``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .longbench_metrics import (
    DATASET2METRIC,
    classification_score,
    code_sim_score,
    count_score,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET2MAXLEN",
    "DATASET2METRIC",
    "DATASET2PROMPT",
    "FIRST_LINE_TASKS",
    "HUB_LONGBENCH",
    "HUB_LONGBENCH_V2",
    "LONGBENCH_E_BUCKETS",
    "LONGBENCH_E_TASKS",
    "LONGBENCH_TASKS",
    "LONGBENCH_V2_MAX_NEW_TOKENS",
    "LONGBENCH_V2_TEMPLATE",
    "NO_CHAT_TEMPLATE_TASKS",
    "build_prompt",
    "build_prompt_v2",
    "classification_score",
    "code_sim_score",
    "count_score",
    "extract_answer_v2",
    "load_longbench",
    "load_longbench_v2",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_score",
    "rouge_zh_score",
    "sample_scores",
    "score_longbench",
    "score_longbench_v2",
    "score_sample",
    "truncate_middle",
    "truncate_prompt",
]

#: The 21 LongBench v1 tasks (LongBench's ``pred.py`` order).
LONGBENCH_TASKS: tuple[str, ...] = (
    "narrativeqa",
    "qasper",
    "multifieldqa_en",
    "multifieldqa_zh",
    "hotpotqa",
    "2wikimqa",
    "musique",
    "dureader",
    "gov_report",
    "qmsum",
    "multi_news",
    "vcsum",
    "trec",
    "triviaqa",
    "samsum",
    "lsht",
    "passage_count",
    "passage_retrieval_en",
    "passage_retrieval_zh",
    "lcc",
    "repobench-p",
)

#: The 13 tasks of LongBench-E (files ``{task}_e.jsonl``).
LONGBENCH_E_TASKS: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)

# Prompt strings are data: LongBench v1's config/dataset2prompt.json, character for character
# (including "asconcisely" in narrativeqa, as in the file LongBench v1 was scored with).
#: LongBench's prompt template of each task (``{context}`` and ``{input}`` are filled from the record).
DATASET2PROMPT: dict[str, str] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"
    ),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", or "unanswerable". '
        "Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as "
        "concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
        'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
        '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:'
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答："
    ),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "2wikimqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "musique": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. "
        "Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"
    ),
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"
    ),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"
    ),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: "
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: "
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}"
        '\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：'
    ),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

#: Tokens to generate per task (LongBench's ``config/dataset2maxlen.json``).
DATASET2MAXLEN: dict[str, int] = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}

#: Few-shot and code tasks LongBench prompts without the chat template.
NO_CHAT_TEMPLATE_TASKS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

#: Tasks whose prediction is scored on its first line only (after leading newlines).
FIRST_LINE_TASKS: frozenset[str] = frozenset({"trec", "triviaqa", "samsum", "lsht"})

#: LongBench-E's length buckets (on the record's ``length`` field): [0, 4000), [4000, 8000), [8000, inf).
LONGBENCH_E_BUCKETS: tuple[str, ...] = ("0-4k", "4-8k", "8k+")

#: LongBench v2's zero-shot prompt (``prompts/0shot.txt`` of THUDM/LongBench).
LONGBENCH_V2_TEMPLATE: str = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\n"
    "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)

#: Tokens LongBench v2 generates without chain of thought.
LONGBENCH_V2_MAX_NEW_TOKENS: int = 128

#: The hub datasets kvpress uses (loaded only when named).
HUB_LONGBENCH: str = "Xnhyacinth/LongBench"
HUB_LONGBENCH_V2: str = "simonjegou/LongBench-v2"
_KNOWN_HUB_V1 = frozenset({HUB_LONGBENCH, "THUDM/LongBench"})
_KNOWN_HUB_V2 = frozenset({HUB_LONGBENCH_V2, "Xnhyacinth/LongBench-v2", "THUDM/LongBench-v2"})
_V2_PLACEHOLDERS = ("$Q$", "$C_A$", "$C_B$", "$C_C$", "$C_D$")
_V2_ANSWER = (re.compile(r"The correct answer is \(([A-D])\)"), re.compile(r"The correct answer is ([A-D])"))


# --------------------------------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------------------------------
def _base_task(task: str) -> str:
    """``hotpotqa_e`` / ``hotpotqa-e`` -> ``hotpotqa``; unknown names raise."""
    for suffix in ("_e", "-e"):
        if task.endswith(suffix) and task[: -len(suffix)] in DATASET2PROMPT:
            return task[: -len(suffix)]
    if task not in DATASET2PROMPT:
        raise ValueError(f"unknown LongBench task {task!r}; the tasks are: {', '.join(LONGBENCH_TASKS)}")
    return task


def build_prompt(task: str, context: str, input: str = "") -> tuple[str, str]:
    """LongBench's prompt of one record, split after the inserted context.

    Parameters
    ----------
    task : str
        A LongBench task (``hotpotqa``; ``hotpotqa_e`` is read as ``hotpotqa``).
    context : str
        The record's ``context`` field.
    input : str, optional
        The record's ``input`` field (the question; empty for tasks without one).

    Returns
    -------
    tuple of str
        ``(context_part, question_part)`` with ``context_part + question_part ==
        DATASET2PROMPT[task].format(context=context, input=input)``.

    Raises
    ------
    ValueError
        For an unknown task.
    """
    head, tail = DATASET2PROMPT[_base_task(task)].split("{context}", 1)
    return head + context, tail.format(input=input)


def build_prompt_v2(record: dict[str, Any]) -> tuple[str, str]:
    """LongBench v2's zero-shot prompt of one item, split after the document.

    Fills the template as LongBench's ``pred.py`` does (document, question and choices stripped,
    placeholders replaced in turn over the whole prompt), then splits it after the document.

    Parameters
    ----------
    record : dict
        An item with ``context``, ``question`` and ``choice_A`` .. ``choice_D``.

    Returns
    -------
    tuple of str
        ``(context_part, question_part)``; their concatenation is LongBench v2's prompt.
    """
    values = [str(record[key]).strip() for key in ("question", "choice_A", "choice_B", "choice_C", "choice_D")]
    head, tail = LONGBENCH_V2_TEMPLATE.split("$DOC$", 1)
    # the template's "$DOC$" sits between newlines, which no placeholder contains, so replacing
    # each piece separately is replacing over the whole prompt
    document, question = str(record["context"]).strip(), tail
    for placeholder, value in zip(_V2_PLACEHOLDERS, values):
        document = document.replace(placeholder, value)
        question = question.replace(placeholder, value)
    return head + document, question


# --------------------------------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------------------------------
def _as_list(value: Any) -> list | None:
    """A list from a list / tuple / numpy array (parquet), None for None / NaN."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return [value]


def _row(task: str, context: str, question: str, record: dict[str, Any], e: bool) -> dict[str, Any]:
    answers = _as_list(record.get("answers", record.get("answer")))
    if answers is None:
        raise ValueError(f"a {task} record has no answers")
    length = record.get("length")
    return {
        "context": context,
        "question": question,
        "answer_prefix": "",
        "answer": [str(a) for a in answers],
        "max_new_tokens": DATASET2MAXLEN[task],
        "task": task,
        "use_chat_template": task not in NO_CHAT_TEMPLATE_TASKS,
        "all_classes": _as_list(record.get("all_classes")),
        "length": None if length is None or pd.isna(length) else int(length),
        "language": record.get("language"),
        "_id": record.get("_id"),
        "dataset": record.get("dataset") or (f"{task}_e" if e else task),
        "longbench_e": e,
    }


def _row_from_raw(task: str, record: dict[str, Any], e: bool) -> dict[str, Any]:
    context, question = build_prompt(task, str(record["context"]), str(record.get("input") or ""))
    return _row(task, context, question, record, e)


def _split_kvpress_row(task: str, context: str, question: str, answer_prefix: str) -> tuple[str, str] | None:
    """The record's ``(context, input)`` behind one of kvpress's hub rows, or None if it is not LongBench's prompt.

    kvpress cut LongBench's prompt in three (``context`` ends a little after the document,
    ``answer_prefix`` holds the last words); the document ends where ``context`` ends minus the
    longest start of the template's text after ``{context}`` that it ends with.
    """
    head, after = DATASET2PROMPT[task].split("{context}", 1)
    pre, post = after.split("{input}", 1) if "{input}" in after else (after, None)
    full = context + question + answer_prefix
    if not context.startswith(head):
        return None
    for k in range(len(pre), -1, -1):
        end = len(context) - k
        if end < len(head) or not context.endswith(pre[:k]):
            continue
        rest = full[end:]
        if post is None:
            if rest == after:
                return context[len(head) : end], ""
        elif rest.startswith(pre) and rest.endswith(post) and len(rest) >= len(pre) + len(post):
            return context[len(head) : end], rest[len(pre) : len(rest) - len(post)]
    return None


def _rows_from_frame(task: str, frame: pd.DataFrame, e: bool, origin: str) -> list[dict[str, Any]]:
    """Rows of a hub split: raw LongBench records (``input`` column) or kvpress's split rows."""
    rows = []
    warned = False
    for record in frame.to_dict("records"):
        if "input" in record:
            rows.append(_row_from_raw(task, record, e))
            continue
        hub_context, hub_question = str(record["context"]), str(record["question"])
        hub_prefix = str(record.get("answer_prefix") or "")
        parsed = _split_kvpress_row(task, hub_context, hub_question, hub_prefix)
        if parsed is None:
            if not warned:
                logger.warning("%s (%s): rows are not LongBench's prompt; kept as they are", origin, task)
                warned = True
            rows.append(_row(task, hub_context, hub_question + hub_prefix, record, e))
        else:
            context, question = build_prompt(task, *parsed)
            rows.append(_row(task, context, question, record, e))
    return rows


def _read_json_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON list or a JSON-lines file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON record ({error.msg})") from error
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected JSON objects")
    return records


def _hub_name(source: str, known: frozenset[str]) -> str | None:
    """The hub dataset a source names, or None for a local path (which must exist)."""
    if source.startswith("hf:"):
        return source[3:].lstrip("/")
    if Path(source).expanduser().exists():
        return None
    if source in known:
        return source
    return None


def _tasks(tasks: str | Iterable[str] | None, e: bool) -> list[str]:
    allowed = LONGBENCH_E_TASKS if e else LONGBENCH_TASKS
    if tasks is None:
        return list(allowed)
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    selected = []
    for name in names:
        task = _base_task(name)
        if task not in allowed:
            raise ValueError(f"{task!r} is not a LongBench-E task; LongBench-E has: {', '.join(allowed)}")
        if task not in selected:
            selected.append(task)
    if not selected:
        raise ValueError("no LongBench task selected")
    return selected


def load_longbench(source: str | Path, tasks: str | Iterable[str] | None = None, *, e: bool = False) -> pd.DataFrame:
    """LongBench (or LongBench-E) rows in kvpress's format.

    Parameters
    ----------
    source : str or Path
        A local directory of LongBench's raw files (``{task}.jsonl``; ``{task}_e.jsonl`` with
        ``e=True``; fields ``input, context, answers, length, dataset, language, all_classes,
        _id``), or a hub dataset: ``Xnhyacinth/LongBench`` (kvpress's copy, one ``data_dir`` per
        task) or any name prefixed ``hf:``. The hub is contacted only for such names.
    tasks : str or iterable of str, optional
        Tasks to load (default: all 21, or the 13 of LongBench-E).
    e : bool, default False
        Load LongBench-E (``{task}_e`` files; scored per length bucket).

    Returns
    -------
    pandas.DataFrame
        One row per record: ``context, question, answer_prefix ("")``, ``answer`` (the list of
        references), ``max_new_tokens`` (``DATASET2MAXLEN``), ``task``, ``use_chat_template``
        (False for ``NO_CHAT_TEMPLATE_TASKS``), ``all_classes``, ``length``, ``language``, ``_id``,
        ``dataset`` and ``longbench_e``.

    Raises
    ------
    ValueError
        For an unknown task, a task outside LongBench-E with ``e=True``, or a malformed record.
    FileNotFoundError
        For a missing directory or task file.
    """
    source = str(source)
    selected = _tasks(tasks, e)
    hub = _hub_name(source, _KNOWN_HUB_V1)
    rows: list[dict[str, Any]] = []
    if hub is not None:
        from datasets import load_dataset

        for task in selected:
            name = f"{task}_e" if e else task
            logger.info("loading %s (%s) from the hub", hub, name)
            frame = load_dataset(hub, data_dir=name, split="test").to_pandas()
            rows.extend(_rows_from_frame(task, frame, e, hub))
    else:
        directory = Path(source).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"LongBench source {source!r} is neither a directory nor a known hub dataset "
                f"({', '.join(sorted(_KNOWN_HUB_V1))}; other hub names need the prefix 'hf:')"
            )
        for task in selected:
            path = directory / (f"{task}_e.jsonl" if e else f"{task}.jsonl")
            if not path.is_file():
                raise FileNotFoundError(f"no LongBench file for {task!r}: {path} does not exist")
            for number, record in enumerate(_read_json_records(path), 1):
                missing = [key for key in ("context", "input", "answers") if key not in record]
                if missing:
                    raise ValueError(f"{path}: record {number} lacks {', '.join(missing)}")
                rows.append(_row_from_raw(task, record, e))
            logger.info("loaded %s", path)
    frame = pd.DataFrame(rows)
    logger.info("LongBench%s: %d rows over %d tasks", "-E" if e else "", len(frame), len(selected))
    return frame


def _split_kvpress_v2(record: dict[str, Any]) -> tuple[str, str] | None:
    """The raw document and question behind kvpress's LongBench v2 hub rows, or None."""
    document = re.fullmatch(
        r"Please read the following text and answer the question below\.\n\n?<text>\n(.*)\n</text>\n\n",
        str(record["context"]),
        re.DOTALL,
    )
    if document is None:
        return None
    choices = []
    for letter in "ABCD":
        value = str(record[f"choice_{letter}"])
        choices.append(rf"\({letter}\) (?:{re.escape(value)}|{re.escape(value.strip())})")
    question = re.match(
        r"What is the correct answer to this question: (.*)\nChoices:\n" + r"\n".join(choices) + r"\n\n",
        str(record["question"]),
        re.DOTALL,
    )
    if question is None:
        return None
    return document.group(1), question.group(1)


def _row_v2(record: dict[str, Any]) -> dict[str, Any]:
    context, question = build_prompt_v2(record)
    return dict(
        context=context,
        question=question,
        answer_prefix="",
        answer=str(record["answer"]).strip(),
        max_new_tokens=LONGBENCH_V2_MAX_NEW_TOKENS,
        task="longbench-v2",
        use_chat_template=True,
        _id=record.get("_id"),
        domain=record.get("domain"),
        sub_domain=record.get("sub_domain"),
        difficulty=record.get("difficulty"),
        length=record.get("length"),
        **{f"choice_{letter}": record[f"choice_{letter}"] for letter in "ABCD"},
    )


_V2_FIELDS = ("question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")


def load_longbench_v2(source: str | Path, *, split: str | None = None) -> pd.DataFrame:
    """LongBench v2 rows (zero-shot prompt) in kvpress's format.

    Parameters
    ----------
    source : str or Path
        A local ``data.json`` (JSON list) or JSON-lines file of LongBench v2 items (fields ``_id,
        domain, sub_domain, difficulty, length, question, choice_A .. choice_D, answer, context``),
        a directory holding ``data.json``, or a hub dataset: ``simonjegou/LongBench-v2`` (kvpress's
        copy, whose prompt is rebuilt into LongBench's), ``THUDM/LongBench-v2`` or any name
        prefixed ``hf:``.
    split : str, optional
        Hub split (default ``train`` for THUDM/LongBench-v2, else ``test``).

    Returns
    -------
    pandas.DataFrame
        One row per item: ``context, question, answer_prefix ("")``, ``answer`` (the letter),
        ``max_new_tokens`` (128), ``task`` (``longbench-v2``), ``use_chat_template``, ``_id``,
        ``domain``, ``sub_domain``, ``difficulty`` (easy/hard), ``length`` (short/medium/long) and
        ``choice_A`` .. ``choice_D``.

    Raises
    ------
    FileNotFoundError
        For a missing file or directory.
    ValueError
        For items lacking a field.
    """
    source = str(source)
    hub = _hub_name(source, _KNOWN_HUB_V2)
    rows = []
    if hub is not None:
        from datasets import load_dataset

        split = split or ("train" if hub == "THUDM/LongBench-v2" else "test")
        logger.info("loading %s (%s) from the hub", hub, split)
        warned = False
        for record in load_dataset(hub, split=split).to_pandas().to_dict("records"):
            parsed = _split_kvpress_v2(record)
            if parsed is not None:  # kvpress's copy: LongBench's prompt rebuilt from the document and question
                rows.append(_row_v2(dict(record, context=parsed[0], question=parsed[1])))
            elif str(record["context"]).startswith("Please read the following"):  # templated another way
                if not warned:
                    logger.warning("%s: rows are not LongBench v2's prompt; kept as they are", hub)
                    warned = True
                row = _row_v2(record)
                prefix = str(record.get("answer_prefix") or "")
                rows.append(dict(row, context=str(record["context"]), question=str(record["question"]) + prefix))
            else:  # raw items (THUDM/LongBench-v2)
                rows.append(_row_v2(record))
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / "data.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"LongBench v2 source {source!r}: {path} does not exist and it is not a known hub dataset "
                f"({', '.join(sorted(_KNOWN_HUB_V2))}; other hub names need the prefix 'hf:')"
            )
        for number, record in enumerate(_read_json_records(path), 1):
            missing = [key for key in _V2_FIELDS if key not in record]
            if missing:
                raise ValueError(f"{path}: item {number} lacks {', '.join(missing)}")
            rows.append(_row_v2(record))
        logger.info("loaded %s", path)
    frame = pd.DataFrame(rows)
    logger.info("LongBench v2: %d rows", len(frame))
    return frame


# --------------------------------------------------------------------------------------------------------------------
# truncation
# --------------------------------------------------------------------------------------------------------------------
def truncate_middle(
    text_or_ids: Any,
    tokenizer: Any = None,
    max_length: int = 0,
    *,
    rule: Literal["v1", "v2"] = "v1",
    add_special_tokens: bool = True,
) -> Any:
    """Cut the middle out of a prompt longer than ``max_length`` tokens, as LongBench does.

    ``v1`` (LongBench ``pred.py``): tokenize the prompt (with the tokenizer's special tokens),
    keep the first and the last ``int(max_length / 2)`` tokens and decode each half with
    ``skip_special_tokens=True``, the two texts concatenated. ``v2`` (LongBench v2): keep the first
    ``max_length // 2`` and the last ``max_length - max_length // 2`` tokens and decode them together.

    Parameters
    ----------
    text_or_ids : str, list of int, torch.Tensor or numpy.ndarray
        The prompt text, or its token ids (1-D, or cut along the last axis).
    tokenizer : PreTrainedTokenizerBase, optional
        Needed for text.
    max_length : int
        The most tokens to keep (at least 2).
    rule : {"v1", "v2"}, default "v1"
        LongBench v1's or v2's variant.
    add_special_tokens : bool, default True
        Count the tokenizer's special tokens (BOS), as LongBench's tokenization does.

    Returns
    -------
    str or same type as ``text_or_ids``
        The text (unchanged when it fits) or the kept ids.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if rule not in ("v1", "v2"):
        raise ValueError(f"rule must be 'v1' or 'v2', got {rule!r}")
    head = int(max_length / 2) if rule == "v1" else max_length // 2
    tail = head if rule == "v1" else max_length - head
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError("truncate_middle needs a tokenizer for text")
        ids = tokenizer(text_or_ids, add_special_tokens=add_special_tokens).input_ids
        if len(ids) <= max_length:
            return text_or_ids
        if rule == "v1":
            return tokenizer.decode(ids[:head], skip_special_tokens=True) + tokenizer.decode(
                ids[-tail:], skip_special_tokens=True
            )
        return tokenizer.decode(list(ids[:head]) + list(ids[-tail:]), skip_special_tokens=True)
    ids = text_or_ids
    if isinstance(ids, (list, tuple)):
        return list(ids) if len(ids) <= max_length else list(ids[:head]) + list(ids[-tail:])
    if ids.shape[-1] <= max_length:
        return ids
    if isinstance(ids, np.ndarray):
        return np.concatenate([ids[..., :head], ids[..., -tail:]], axis=-1)
    import torch

    return torch.cat([ids[..., :head], ids[..., -tail:]], dim=-1)


def truncate_prompt(
    context: str, question: str, tokenizer: Any, max_length: int, *, rule: Literal["v1", "v2"] = "v1"
) -> tuple[str, str]:
    """:func:`truncate_middle` of ``context + question``, split again before the question.

    Parameters
    ----------
    context, question : str
        A row's two parts.
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.
    max_length : int
        The most prompt tokens.
    rule : {"v1", "v2"}, default "v1"
        See :func:`truncate_middle`.

    Returns
    -------
    tuple of str
        ``(context, question)`` whose concatenation is LongBench's truncated prompt. When the cut
        reaches into the question (or decoding changed its text), the whole truncated prompt is
        returned as the context and the question is empty (logged).
    """
    prompt = context + question
    cut = truncate_middle(prompt, tokenizer, max_length, rule=rule)
    if cut is prompt or cut == prompt:
        return context, question
    if question and cut.endswith(question):
        return cut[: len(cut) - len(question)], question
    logger.warning("truncation to %d tokens reached the question: the prompt is kept whole as context", max_length)
    return cut, ""


# --------------------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------------------
def score_sample(
    task: str, prediction: str | None, references: Sequence[str], all_classes: Sequence[str] | None = None
) -> float:
    """One prediction's LongBench score: the best metric value over its references, in [0, 1].

    Parameters
    ----------
    task : str
        The LongBench task (``_e`` suffix accepted).
    prediction : str or None
        The model's output (None counts as empty); only its first line for ``FIRST_LINE_TASKS``.
    references : sequence of str
        The reference answers.
    all_classes : sequence of str, optional
        The class names (trec, lsht).

    Returns
    -------
    float
        ``max(metric(prediction, reference))``, 0 without references.
    """
    task = _base_task(task)
    prediction = (
        "" if prediction is None or (isinstance(prediction, float) and math.isnan(prediction)) else str(prediction)
    )
    if task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET2METRIC[task]
    best = 0.0
    for reference in references:
        best = max(best, metric(prediction, str(reference), all_classes=all_classes))
    return float(best)


def _references(df: pd.DataFrame) -> pd.Series:
    for column in ("answer", "answers"):
        if column in df.columns:
            return df[column].map(lambda v: [str(x) for x in (_as_list(v) or [])])
    raise KeyError("the frame has neither 'answer' nor 'answers'")


def sample_scores(df: pd.DataFrame) -> pd.Series:
    """Per-row LongBench scores in [0, 1] (columns ``task``, ``predicted_answer``, ``answer``, ``all_classes``).

    Parameters
    ----------
    df : pandas.DataFrame
        LongBench rows with a ``predicted_answer`` column.

    Returns
    -------
    pandas.Series
        The score of each row, indexed like ``df``.
    """
    if "predicted_answer" not in df.columns:
        raise KeyError("the frame has no 'predicted_answer' column")
    references = _references(df)
    classes = df["all_classes"].map(_as_list) if "all_classes" in df.columns else pd.Series(None, index=df.index)
    values = [
        score_sample(task, prediction, refs, cls)
        for task, prediction, refs, cls in zip(df["task"], df["predicted_answer"], references, classes)
    ]
    return pd.Series(values, index=df.index, dtype=float, name="score")


def _bucket(length: float) -> str:
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def _pct(values: pd.Series | list[float], digits: int = 2) -> float:
    values = list(values)
    return round(100 * float(np.mean(values)), digits) if values else float("nan")


def _task_order(tasks: Iterable[str]) -> list[str]:
    present = {_base_task(t) for t in tasks}
    return [t for t in LONGBENCH_TASKS if t in present]


def score_longbench(df: pd.DataFrame, *, e: bool | None = None) -> dict[str, Any]:
    """LongBench's scores of a frame of predictions (``eval.py``: mean x100, rounded to 2 decimals).

    Parameters
    ----------
    df : pandas.DataFrame
        Rows of :func:`load_longbench` with a ``predicted_answer`` column (kvpress frames with
        ``answers`` also work).
    e : bool, optional
        Score as LongBench-E (per length bucket); default: the rows' ``longbench_e`` flag.

    Returns
    -------
    dict
        LongBench: ``{task: score}`` plus ``average`` (mean of the task scores).
        LongBench-E: ``{task: {"0-4k", "4-8k", "8k+", "all"}}`` (NaN for an empty bucket) plus
        ``average`` (mean of the tasks' ``all``) and the bucket means over tasks.
    """
    if e is None:
        e = bool("longbench_e" in df.columns and len(df) and df["longbench_e"].astype(bool).all())
    scores = sample_scores(df)
    base = df["task"].map(_base_task)
    result: dict[str, Any] = {}
    if not e:
        for task in _task_order(base):
            result[task] = _pct(scores[base == task])
        result["average"] = round(float(np.mean(list(result.values()))), 2) if result else float("nan")
        return result
    if "length" not in df.columns:
        raise KeyError("LongBench-E scoring needs the 'length' column")
    buckets = df["length"].map(lambda n: _bucket(float(n)))
    per_task: dict[str, dict[str, float]] = {}
    for task in _task_order(base):
        mask = base == task
        per_task[task] = {b: _pct(scores[mask & (buckets == b)]) for b in LONGBENCH_E_BUCKETS}
        per_task[task]["all"] = _pct(scores[mask])
    result["average"] = round(float(np.mean([s["all"] for s in per_task.values()])), 2) if per_task else float("nan")
    for b in LONGBENCH_E_BUCKETS:
        values = [s[b] for s in per_task.values() if not math.isnan(s[b])]
        result[b] = round(float(np.mean(values)), 2) if values else float("nan")
    result.update(per_task)
    return result


def extract_answer_v2(response: str | None) -> str | None:
    """The letter of a LongBench v2 response: ``The correct answer is (X)``, else ``The correct answer is X``.

    Parameters
    ----------
    response : str or None
        The model's output (stripped and cleared of ``*`` first).

    Returns
    -------
    str or None
        ``A``-``D``, or None when neither pattern matches.
    """
    if response is None or (isinstance(response, float) and math.isnan(response)):
        return None
    text = str(response).strip().replace("*", "")
    for pattern in _V2_ANSWER:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def score_longbench_v2(df: pd.DataFrame, *, compensated: bool = False) -> dict[str, float]:
    """LongBench v2 accuracies (x100, 1 decimal): overall, easy, hard, short, medium, long.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows of :func:`load_longbench_v2` with a ``predicted_answer`` column.
    compensated : bool, default False
        Count an answer that cannot be extracted as 0.25 (LongBench ``result.py``'s option).

    Returns
    -------
    dict
        ``overall, easy, hard, short, medium, long`` (NaN for an empty group).
    """
    if "predicted_answer" not in df.columns:
        raise KeyError("the frame has no 'predicted_answer' column")
    predicted = df["predicted_answer"].map(extract_answer_v2)
    judged = [
        0.25 if compensated and p is None else float(p is not None and p == str(a).strip())
        for p, a in zip(predicted, df["answer"])
    ]
    acc = pd.Series(judged, index=df.index, dtype=float)
    result = {"overall": _pct(acc, 1)}
    for column, groups in (("difficulty", ("easy", "hard")), ("length", ("short", "medium", "long"))):
        labels = df[column] if column in df.columns else pd.Series(None, index=df.index)
        for group in groups:
            result[group] = _pct(acc[labels == group], 1)
    return result
