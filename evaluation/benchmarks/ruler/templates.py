"""RULER's task table and prompt text (verbatim from NVIDIA/RULER), and the cut of a prompt into its row fields."""

from __future__ import annotations

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
