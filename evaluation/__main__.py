"""``python -m evaluation`` (or ``pikvpress-eval``): the pikvpress evaluation harness.

    python -m evaluation                              # = quick: the README's RULER sweep on the default model
    python -m evaluation quick [key=value ...]
    python -m evaluation run --config CONFIG.yaml [key=value ...]
    python -m evaluation report RESULTS_DIR

Overrides are ``field=value`` with YAML values (``compression_ratio=[0.25,0.5]``). Unknown fields,
presses and datasets are rejected before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    quick = sub.add_parser("quick", help="the quick RULER sweep of the README (configs/quick.yaml)")
    quick.add_argument("overrides", nargs="*", help="field=value")
    run = sub.add_parser("run", help="run (or resume) a sweep, then write its report")
    run.add_argument("--config", help="YAML config (see evaluation/configs/)")
    run.add_argument("overrides", nargs="*", help="field=value")
    report = sub.add_parser("report", help="aggregate finished runs into tables and plots")
    report.add_argument("results_dir")
    return parser


def _print_report(path: Path) -> None:
    text = [line for line in path.read_text().splitlines() if not line.startswith("![")]
    print("\n".join(text))
    print(f"\nreport: {path}  (tables: {path.with_suffix('.csv')}, plots: {path.parent}/*.png)")


def run_sweep(config_path: str | Path | None, overrides: list[str]) -> Path:
    from .config import load_config

    config = load_config(config_path, overrides)  # fails here, before any model loads
    from .report import write_report
    from .runner import Evaluator

    start = time.perf_counter()
    evaluator = Evaluator(config)
    evaluator.run()
    logging.getLogger("evaluation").info("sweep done in %.0f s", time.perf_counter() - start)
    print(f"\nsweep: {len(config.sweep())} press configurations, {evaluator.prefills} prefills, "
          f"{time.perf_counter() - start:.0f} s")
    return write_report(config.output_dir)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    command = args.command or "quick"
    if command == "report":
        from .report import write_report

        _print_report(write_report(args.results_dir))
        return
    if command == "quick":
        _print_report(run_sweep(CONFIGS / "quick.yaml", getattr(args, "overrides", [])))
        return
    _print_report(run_sweep(args.config, args.overrides))


if __name__ == "__main__":
    main()
