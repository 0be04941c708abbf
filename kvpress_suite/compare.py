"""Check that every kvpress test that passes without pikvpress also passes with it imported.

Usage: ``python kvpress_suite/compare.py WITHOUT.json WITH.json``, the ``KVPRESS_SUITE_RESULTS`` files
(node id -> outcome) that :mod:`conftest_plugin` wrote for the two runs. Prints the counts of each run
and every test that passes only without pikvpress; exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def passed(outcomes: dict[str, str]) -> set[str]:
    return {node for node, outcome in outcomes.items() if outcome == "passed"}


def compare(without: dict[str, str], with_: dict[str, str]) -> list[str]:
    """Node ids that pass without pikvpress and do not pass with it, sorted."""
    return sorted(passed(without) - passed(with_))


def _counts(outcomes: dict[str, str]) -> str:
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(Counter(outcomes.values()).items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("without", type=Path, help="results of the run without pikvpress imported")
    parser.add_argument("with_", metavar="with", type=Path, help="results of the run with pikvpress imported")
    args = parser.parse_args(argv)
    without = json.loads(args.without.read_text())
    with_ = json.loads(args.with_.read_text())
    print(f"without pikvpress: {_counts(without)}")
    print(f"with pikvpress:    {_counts(with_)}")
    gained = sorted(passed(with_) - passed(without))
    if gained:
        print(f"{len(gained)} pass only with pikvpress: " + ", ".join(gained))
    lost = compare(without, with_)
    if lost:
        print(f"FAIL: {len(lost)} pass without pikvpress but not with it:")
        for node in lost:
            print(f"  {node}: {with_.get(node, 'not run')}")
        return 1
    print(f"OK: all {len(passed(without))} tests that pass without pikvpress pass with it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
