"""Ragged runs against their masked twins, answer for answer: the agreement the ragged layer promises.

Reads the finished or unfinished runs of a ragged sweep (``evaluation/configs/leaderboard_ragged.yaml``) and of the
sweep holding their masked versions (``leaderboard.yaml``), pairs every ``ragged_<name>`` record with the ``<name>``
record of the same ratio and sample (``ragged_routing_heads`` with ``routing_heads``), and prints, per press and
ratio, how many answers are the same and the bytes held by each (over a bf16 cache of the same tokens). The two
runs keep the same tokens (a ragged press draws its masked twin's random numbers), so a different answer can only
come from rounding (attention over the kept tokens sums in another order); the float64 check is
``benchmarks/verify_records.py``'s.

    python benchmarks/ragged_agreement.py results/leaderboard_ragged results/leaderboard
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from tabulate import tabulate

#: ragged presses whose twin is not ``name.removeprefix("ragged_")``: ``routing_heads`` is the filled version of
#: the adaptive head budgets (every head as long as the largest share), not a masked one
TWINS = {"ragged_routing_heads": "routing_heads"}
RUN = re.compile(r"^(?P<press>.+)__(?P<ratio>\d\.\d\d)__[0-9a-f]{8}$")


def _records(results: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """``(press, ratio) -> {index: record}`` of every run directory under ``results``."""
    runs: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for predictions in results.rglob("predictions.jsonl"):
        match = RUN.match(predictions.parent.name)
        if match is None:
            continue
        for line in predictions.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a run still being written
                continue
            runs[match["press"], match["ratio"]][record["index"]] = record
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ragged", type=Path, help="results directory of the ragged sweep")
    parser.add_argument("masked", type=Path, help="results directory holding the masked twins")
    args = parser.parse_args(argv)
    ragged, masked = _records(args.ragged), _records(args.masked)
    rows, differences = [], []
    total = same_total = 0
    for (press, ratio), records in sorted(ragged.items()):
        if not press.startswith("ragged_"):
            continue
        twin = TWINS.get(press, press.removeprefix("ragged_"))
        theirs = masked.get((twin, ratio), {})
        both = sorted(set(records) & set(theirs))
        if not both:
            continue
        same = sum(records[i]["predicted_answer"] == theirs[i]["predicted_answer"] for i in both)
        differences += [
            (press, ratio, i, records[i]["predicted_answer"], theirs[i]["predicted_answer"])
            for i in both
            if records[i]["predicted_answer"] != theirs[i]["predicted_answer"]
        ]
        held = lambda rs: sum(r["kv_bytes_bf16"] / r["bf16_kv_bytes"] for r in rs) / len(rs)
        rows.append(
            [
                press,
                ratio,
                len(both),
                f"{same}/{len(both)}",
                f"{held([records[i] for i in both]):.3f}",
                f"{held([theirs[i] for i in both]):.3f}",
            ]
        )
        total += len(both)
        same_total += same
    headers = ["ragged press", "ratio", "samples", "same answer", "held / bf16 (ragged)", "held / bf16 (twin)"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    if total:
        print(f"\nall: {same_total}/{total} answers the same ({100 * same_total / total:.2f}%)")
    for press, ratio, index, mine, theirs in differences:
        print(f"- {press} @ {ratio} #{index}: ragged {mine!r} / masked {theirs!r}")


if __name__ == "__main__":
    main()
