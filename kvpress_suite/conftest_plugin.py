"""pytest plugin that runs kvpress 0.5.5's own test suite offline, with or without pikvpress imported.

Loaded with ``-p conftest_plugin`` (this folder on ``PYTHONPATH``) by ``scripts/kvpress_suite.sh``, from
the root of kvpress's unpacked sdist. It

* points ``huggingface_hub`` at a hub cache of local stand-ins (:mod:`standins`) and turns the hub off
  (``HF_HUB_OFFLINE=1``), so kvpress's fixtures and tests load ``MaxJeblick/llama2-0b-unit-test`` etc.
  by their hub ids, unchanged;
* imports pikvpress before any test module (so its kvpress fixes are applied) unless
  ``KVPRESS_SUITE_PIKVPRESS=0``, and in that mode fails the run if anything imported pikvpress;
* writes every test's outcome to ``$KVPRESS_SUITE_RESULTS`` (JSON, node id -> outcome) when set, for
  :mod:`compare`.

Environment: ``KVPRESS_SUITE_HF_CACHE`` (the stand-in hub cache, built here if missing),
``KVPRESS_SUITE_PIKVPRESS`` (``1``: import pikvpress, the default; ``0``: do not),
``KVPRESS_SUITE_RESULTS`` (optional output file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_HF_MODULES = ("huggingface_hub", "transformers", "datasets", "kvpress")


def _enabled(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


WITH_PIKVPRESS = _enabled("KVPRESS_SUITE_PIKVPRESS", "1")
HF_CACHE = Path(os.environ.get("KVPRESS_SUITE_HF_CACHE") or Path(tempfile.gettempdir()) / "kvpress-suite-hub")

# huggingface_hub reads these once, when it is imported: set them before anything imports it
_already = [name for name in _HF_MODULES if name in sys.modules]
if _already:
    raise RuntimeError(f"conftest_plugin must be loaded before {', '.join(_already)} is imported (use -p)")
os.environ["HF_HUB_CACHE"] = str(HF_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(_HERE))
import standins

if not standins.is_built(HF_CACHE):
    # in a separate process: building imports pikvpress, which the comparison run must not have imported
    subprocess.run([sys.executable, str(_HERE / "standins.py"), str(HF_CACHE)], check=True)

if WITH_PIKVPRESS:
    import pikvpress  # applies pikvpress.compat's kvpress fixes

    if not pikvpress.kvpress_fixes_applied():
        raise RuntimeError("pikvpress is imported but its kvpress fixes are not applied (PIKVPRESS_KVPRESS_FIXES=0?)")

_outcomes: dict[str, str] = {}


def pytest_report_header(config):
    mode = "imported, kvpress fixes applied" if WITH_PIKVPRESS else "NOT imported"
    return [f"pikvpress: {mode}", f"hub stand-ins: {HF_CACHE} (HF_HUB_OFFLINE=1)"]


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
        elif report.when != "call" and report.failed:
            outcome = "error"
        if _outcomes.get(report.nodeid) in ("failed", "error"):
            return  # keep the first failure (a teardown after a failed call)
        _outcomes[report.nodeid] = outcome


def _pikvpress_leaked() -> bool:
    return not WITH_PIKVPRESS and "pikvpress" in sys.modules


def pytest_sessionfinish(session, exitstatus):
    if _pikvpress_leaked():
        session.exitstatus = 1
    path = os.environ.get("KVPRESS_SUITE_RESULTS")
    if path:
        Path(path).write_text(json.dumps(dict(sorted(_outcomes.items())), indent=1))


def pytest_terminal_summary(terminalreporter):
    if _pikvpress_leaked():
        terminalreporter.write_line("pikvpress was imported during a run that must not import it", red=True)
