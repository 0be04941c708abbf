"""RULER's QA files (SQuAD, HotpotQA): reading them, and which QA tasks are available."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import Any

from .templates import QA_DATASETS, SYNTHETIC_TASKS


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
