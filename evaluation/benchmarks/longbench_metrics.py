"""LongBench's metrics (THUDM/LongBench ``metrics.py``), reimplemented with the same numbers.

Every metric takes one prediction and one reference string and returns a score in [0, 1]; the
scorers in :mod:`evaluation.benchmarks.longbench` keep the best score over a sample's references
and report the mean x100.

The scoring packages are the ones LongBench uses, imported when a metric first needs them:
``rouge`` (1.0.1) for ROUGE-L, ``jieba`` for Chinese word segmentation and ``fuzzywuzzy`` for
the code similarity. ``fuzzywuzzy`` computes its ratio with python-Levenshtein when that is
installed and with :class:`difflib.SequenceMatcher` otherwise; LongBench pins only
``fuzzywuzzy``, so the difflib backend is the reference one.
"""

from __future__ import annotations

import logging
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET2METRIC",
    "classification_score",
    "code_sim_score",
    "count_score",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_score",
    "rouge_zh_score",
    "token_f1",
]

# The Chinese punctuation LongBench strips in ``normalize_zh_answer`` (string data, kept verbatim).
_CN_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_EN_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + _CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")


def _jieba_words(text: str) -> list[str]:
    try:
        import jieba
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("LongBench's Chinese metrics need jieba: pip install jieba") from error
    return list(jieba.cut(text, cut_all=False))


def _fuzz_ratio(a: str, b: str) -> int:
    try:
        with warnings.catch_warnings():  # "Using slow pure-python SequenceMatcher": the reference backend
            warnings.simplefilter("ignore", UserWarning)
            from fuzzywuzzy import fuzz
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("LongBench's code_sim metric needs fuzzywuzzy: pip install fuzzywuzzy") from error
    return fuzz.ratio(a, b)


_ROUGE = None


def _rouge():
    global _ROUGE
    if _ROUGE is None:
        try:
            from rouge import Rouge
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("LongBench's rouge metrics need rouge 1.0.1: pip install rouge==1.0.1") from error
        _ROUGE = Rouge()
    return _ROUGE


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, then the articles a/an/the, and collapse whitespace.

    Parameters
    ----------
    text : str
        An English answer.

    Returns
    -------
    str
        The normalised answer (words joined by single spaces).
    """
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lowercase, drop ASCII and Chinese punctuation and remove all whitespace.

    Parameters
    ----------
    text : str
        A Chinese answer (or one jieba word of it).

    Returns
    -------
    str
        The normalised text.
    """
    text = "".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION)
    return "".join(text.split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists (0 when they share no token).

    Parameters
    ----------
    prediction, reference : sequence of str
        Tokens of the prediction and of the reference.

    Returns
    -------
    float
        ``2 P R / (P + R)`` with P and R the shares of common tokens (counted with multiplicity).
    """
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 of the normalised answers (:func:`normalize_answer`, whitespace tokens).

    Parameters
    ----------
    prediction : str
        The model's answer.
    ground_truth : str
        One reference answer.
    **kwargs
        Ignored (every metric takes ``all_classes``).

    Returns
    -------
    float
        The F1 in [0, 1].
    """
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 over jieba words, each normalised by :func:`normalize_zh_answer`, empty words dropped.

    Parameters
    ----------
    prediction : str
        The model's answer.
    ground_truth : str
        One reference answer.
    **kwargs
        Ignored.

    Returns
    -------
    float
        The F1 in [0, 1].
    """

    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in _jieba_words(text)) if w]

    return token_f1(words(prediction), words(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F of the ``rouge`` package (1.0.1), 0 when it cannot score the pair.

    The package splits both texts into sentences at ``.`` and counts the distinct words of each
    side (summary-level union LCS); it raises on an empty hypothesis, which LongBench scores 0.

    Parameters
    ----------
    prediction : str
        The model's summary or answer.
    ground_truth : str
        One reference.
    **kwargs
        Ignored.

    Returns
    -------
    float
        ``scores["rouge-l"]["f"]`` in [0, 1].
    """
    try:
        scores = _rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception as error:  # noqa: BLE001 - LongBench scores any failure (empty text, ...) as 0
        logger.debug("rouge could not score the pair (%s): scored 0", error)
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """:func:`rouge_score` of the texts segmented by jieba (words joined by spaces).

    Parameters
    ----------
    prediction : str
        The model's summary or answer.
    ground_truth : str
        One reference.
    **kwargs
        Ignored.

    Returns
    -------
    float
        ROUGE-L F in [0, 1].
    """
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """LongBench's classification score: 1 / (number of class names found) if the true class is among them.

    The class names found in the prediction are collected in ``all_classes`` order; names that
    are a strict substring of the true class are then dropped *while iterating over the same
    list*, as LongBench does, so the name right after each dropped one is not examined. (LongBench's
    difflib fallback for predictions naming no class is unreachable there and left out here.)

    Parameters
    ----------
    prediction : str
        The model's answer.
    ground_truth : str
        The true class.
    **kwargs
        ``all_classes``: the class names of the task (required).

    Returns
    -------
    float
        ``1 / len(found)`` if the true class is found, else 0.
    """
    all_classes = kwargs.get("all_classes")
    if all_classes is None:
        raise ValueError("classification_score needs all_classes")
    found = [name for name in all_classes if name in prediction]
    index = 0
    while index < len(found):  # list.remove inside a for loop over the list, step for step
        name = found[index]
        if name in ground_truth and name != ground_truth:
            found.remove(name)
        index += 1
    return 1.0 / len(found) if ground_truth in found else 0.0


def _number_share(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(number == target for number in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction that equal the reference count.

    Parameters
    ----------
    prediction : str
        The model's answer.
    ground_truth : str
        The count, as text.
    **kwargs
        Ignored.

    Returns
    -------
    float
        Correct numbers / all numbers (0 without numbers).
    """
    return _number_share(prediction, str(ground_truth))


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    match = re.search(pattern, ground_truth)
    if match is None:
        raise ValueError(f"reference {ground_truth!r} does not match {pattern!r}")
    return _number_share(prediction, match.group(1))


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction that equal the paragraph number of ``Paragraph N``.

    Parameters
    ----------
    prediction : str
        The model's answer.
    ground_truth : str
        The reference, ``Paragraph N``.
    **kwargs
        Ignored.

    Returns
    -------
    float
        Correct numbers / all numbers (0 without numbers).
    """
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """:func:`retrieval_score` for the Chinese reference ``段落N``.

    Parameters
    ----------
    prediction : str
        The model's answer.
    ground_truth : str
        The reference, ``段落N``.
    **kwargs
        Ignored.

    Returns
    -------
    float
        Correct numbers / all numbers (0 without numbers).
    """
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """``fuzz.ratio / 100`` between the reference line and the first prediction line without `` ` ``, ``#``, ``//``.

    Leading newlines are dropped first; a prediction whose every line holds one of those marks
    is compared as the empty string.

    Parameters
    ----------
    prediction : str
        The model's completion.
    ground_truth : str
        The reference next line of code.
    **kwargs
        Ignored.

    Returns
    -------
    float
        The fuzzywuzzy ratio (an integer percentage) / 100.
    """
    line = next(
        (ln for ln in prediction.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln and "//" not in ln),
        "",
    )
    return _fuzz_ratio(line, ground_truth) / 100


Metric = Callable[..., float]

#: The metric of each LongBench task (LongBench's ``dataset2metric``).
DATASET2METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
