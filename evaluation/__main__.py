"""``python -m evaluation`` (or ``pikvpress-eval``): the pikvpress evaluation harness.

    python -m evaluation                              # = quick: the README's RULER sweep on the default model
    python -m evaluation quick [key=value ...]
    python -m evaluation run --config CONFIG.yaml [key=value ...]
    python -m evaluation report RESULTS_DIR [--against OTHER_RESULTS_DIR ...]
    python -m evaluation publish                      # the leaderboard's reports into docs/ and the README
    python -m evaluation timing --config CONFIG.yaml [key=value ...] [prompts=4 decode_tokens=16 repeats=1]
    python -m evaluation --dataset ruler --data_dir 4096 --press_name snapkv --compression_ratio 0.5 ...

Overrides are ``field=value`` with YAML values (``compression_ratio=[0.25,0.5]``). Unknown fields,
presses and datasets are rejected before any model is loaded. The last form is kvpress's ``evaluate.py``
command line (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import EvalConfig

CONFIGS = Path(__file__).parent / "configs"

KVPRESS_HELP = """\
kvpress's command line (its evaluation/evaluate.py flags, python-fire style: --name value or --name=value):

  python -m evaluation --dataset ruler --data_dir 4096 --model smollm2-135m-instruct \\
      --press_name snapkv --compression_ratio 0.5 --fraction 0.1 --output_dir results
  python -m evaluation --config my.yaml [--flag value ...]      (also kvpress's --config_file)

Defaults are kvpress's (its evaluate_config.yaml): --dataset ruler --data_dir 4096 --press_name knorm
--compression_ratio 0.5 --seed 42 --output_dir ./results, the device auto-detected (cuda, else cpu), EXCEPT
the model: --model defaults to smollm2-135m-instruct, this harness's offline default model, not kvpress's
meta-llama/Meta-Llama-3.1-8B-Instruct (any hub id or local path works with --model). No YAML file is read
unless --config / --config_file names one.

kvpress's flags, and what they become here:
  --dataset             ruler, longbench, longbench-e, longbench-v2; needle_in_haystack = this harness's
                        needle (a magic number hidden in essays, scored by exact match; kvpress hides its
                        data set's needle sentence and scores it with ROUGE)
  --data_dir            ruler: the context length of kvpress's simonjegou/ruler subset ("4096") ->
                        context_length; RULER is generated offline here with the model's tokenizer, 500
                        samples per task (--num_samples), the 11 synthetic tasks (qa_1/qa_2 need local
                        SQuAD / HotpotQA files: --data_dir DIR --context_length N)
                        longbench / longbench-e: the task subset of Xnhyacinth/LongBench (hotpotqa,
                        hotpotqa_e) -> --tasks [hotpotqa], read from that hub dataset; a local directory of
                        {task}.jsonl files also works; unset: every task
                        longbench-v2: unset -> simonjegou/LongBench-v2 (or a local data.json)
  --fraction            the share of the rows evaluated, sampled with --seed as kvpress samples them
                        (after every row is generated, as kvpress samples after loading)
  --needle_depth        needle_in_haystack: percent (0-100), one or a list, as in kvpress
  --max_context_length  needle_in_haystack: the haystack's length; otherwise contexts are truncated to it
  --model --press_name --compression_ratio --max_new_tokens --query_aware --seed --output_dir --device
  --model_kwargs --trust_remote_code --log_level     as in kvpress (observed_attention gets eager attention,
                        as kvpress sets it)
  --key_channel_compression_ratio   presses with ThinK's key-channel pruning (think, snap_think) only
  --fp8 --threshold --head_compression_ratio --compression_interval --target_size
  --hidden_states_buffer_size       refused (no press here takes them)
This harness's fields are flags too: --context_length --num_samples --tasks --split --batch_size
--prefill_reuse --composed_presses; --press_name and --compression_ratio also take lists (a sweep).

Each run is written to OUTPUT_DIR/<dataset>/<model>/<press>__<ratio>__<key hash>/ with kvpress's files
(config.yaml, predictions.csv, metrics.json) and predictions.jsonl; a finished run is not run again.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation",
        description=__doc__.split("\n\n")[0],
        epilog=KVPRESS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    quick = sub.add_parser("quick", help="the quick RULER sweep of the README (configs/quick.yaml)")
    quick.add_argument("overrides", nargs="*", help="field=value")
    run = sub.add_parser("run", help="run (or resume) a sweep, then write its report")
    run.add_argument("--config", help="YAML config (see evaluation/configs/)")
    run.add_argument("overrides", nargs="*", help="field=value")
    report = sub.add_parser("report", help="aggregate finished runs into tables and plots")
    report.add_argument("results_dir")
    report.add_argument(
        "--against",
        nargs="+",
        default=[],
        metavar="DIR",
        help="pick the best kvpress presses (and no press, if RESULTS_DIR has none) from these sweeps' runs "
        "instead (a second tier against the first); paired on the prompts both answered",
    )
    interim = sub.add_parser(
        "interim", help="report an unfinished sweep on the samples every run has done (OUTPUT_DIR_interim)"
    )
    interim.add_argument("--config", help="YAML config (see evaluation/configs/)")
    interim.add_argument("--output", help="where to write it (default: the config's output_dir + _interim)")
    interim.add_argument("overrides", nargs="*", help="field=value")
    publish = sub.add_parser(
        "publish",
        help="report the leaderboard's parts and rewrite the generated blocks of docs/leaderboard.md and README.md",
    )
    publish.add_argument("--root", default=".", help="the repository (default: the current directory)")
    timing = sub.add_parser(
        "timing", help="time each press's own prefill and decode against no press (OUTPUT_DIR/timing.json)"
    )
    timing.add_argument("--config", help="YAML config (see evaluation/configs/)")
    timing.add_argument("overrides", nargs="*", help="field=value, and prompts=N decode_tokens=N repeats=N")
    return parser


def _print_report(path: Path) -> None:
    text = [line for line in path.read_text().splitlines() if not line.startswith("![")]
    print("\n".join(text))
    print(f"\nreport: {path}  (tables: {path.with_suffix('.csv')}, plots: {path.parent}/*.png)")


def evaluate(config: EvalConfig) -> Path:
    """Run (or resume) a validated config's sweep; write and return its report.

    Every run directory's key is checked (:func:`~.runs.plan_runs`) before the model loads.
    """
    from .report import write_report
    from .runner import Evaluator
    from .runs import plan_runs, seed_globals

    plan_runs(config)  # a directory holding another run fails here, before any model loads
    seed_globals(config.seed)
    start = time.perf_counter()
    evaluator = Evaluator(config)
    evaluator.run()
    logging.getLogger("evaluation").info("sweep done in %.0f s", time.perf_counter() - start)
    print(
        f"\nsweep: {len(config.sweep())} press configurations, {evaluator.prefills} prefills, "
        f"{time.perf_counter() - start:.0f} s"
    )
    return write_report(config.output_dir)


def run_sweep(config_path: str | Path | None, overrides: list[str]) -> Path:
    """``run`` / ``quick``: a YAML config with ``key=value`` overrides, evaluated (see :func:`evaluate`)."""
    from .config import load_config

    return evaluate(load_config(config_path, overrides))  # the config fails before any model loads


def interim_report(config_path: str | Path | None, overrides: list[str], output: str | None = None) -> Path:
    """``interim``: every run of a sweep scored on the samples all of them have done (:mod:`.interim`), reported."""
    from pikvpress.models import load_model

    from .config import load_config
    from .datasets import load_rows
    from .interim import write_interim
    from .report import write_report

    config = load_config(config_path, overrides)
    _, tokenizer = load_model(config.model, device="cpu", **config.model_kwargs)  # the rows need the tokenizer
    return write_report(write_interim(config, load_rows(config, tokenizer), output))


def run_kvpress_flags(argv: list[str]) -> Path:
    """kvpress's ``evaluate.py`` command line (:func:`~.config.load_kvpress_flags`), evaluated."""
    from .config import load_kvpress_flags

    config, log_level = load_kvpress_flags(argv)  # fails here, before any model loads
    for name in (__package__ or "evaluation", "pikvpress"):
        logging.getLogger(name).setLevel(log_level)
    return evaluate(config)


def main(argv: list[str] | None = None) -> None:
    from .config import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0].startswith("--") and argv[0] != "--help":
            if "--help" in argv or "-h" in argv:
                print(KVPRESS_HELP)
                return
            _print_report(run_kvpress_flags(argv))
            return
        args = parser.parse_args(argv)
        command = args.command or "quick"
        if command == "report":
            from .report import write_report

            _print_report(write_report(args.results_dir, against=args.against))
            return
        if command == "publish":
            from .publish import publish

            for path in publish(args.root):
                print(f"written: {path}")
            return
        if command == "interim":
            from .interim import NothingToReport

            try:
                _print_report(interim_report(args.config, args.overrides, args.output))
            except NothingToReport as err:
                parser.exit(1, f"error: {err}\n")
            return
        if command == "timing":
            from .timing import format_timing, run_timing

            path = run_timing(args.config, args.overrides)
            print(format_timing(json.loads(path.read_text())))
            print(f"\ntiming: {path}")
            return
        if command == "quick":
            _print_report(run_sweep(CONFIGS / "quick.yaml", getattr(args, "overrides", [])))
            return
        _print_report(run_sweep(args.config, args.overrides))
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
