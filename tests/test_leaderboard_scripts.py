"""The scripts that run the leaderboard on two processes: the press split, and the 4k part's fields, which three
files spell out (leaderboard.yaml's header, scripts/leaderboard_rest.sh and evaluation/publish.py's PARTS)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evaluation.publish import PARTS

ROOT = Path(__file__).resolve().parents[1]
TIER1 = ROOT / "evaluation" / "configs" / "leaderboard.yaml"
REST = ROOT / "scripts" / "leaderboard_rest.sh"


def other_presses(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "other_presses.py"), *args], capture_output=True, text=True, check=False
    )


def test_other_presses_is_the_rest_of_the_config_in_its_order():
    names = yaml.safe_load(TIER1.read_text())["press_name"]
    first = [names[3], names[0]]
    done = other_presses(str(TIER1), ",".join(first))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(",") == [n for n in names if n not in first]


def test_other_presses_refuses_a_press_the_config_lacks():
    done = other_presses(str(TIER1), "snapkv,no_such_press")
    assert done.returncode != 0
    assert "no_such_press" in done.stderr


@pytest.mark.parametrize("script", ["leaderboard_rest.sh", "sweep_two_processes.sh"])
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=False).returncode == 0


def test_rest_script_slow_presses_are_tier_1_presses():
    slow = re.search(r"slow=\$\{SLOW:-([^}]*)\}", REST.read_text()).group(1)
    assert other_presses(str(TIER1), slow).returncode == 0


def _fields(text: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(text) if re.match(r"^\w+=", token))


def test_the_4k_part_is_spelled_the_same_in_the_three_files():
    script = re.search(r"at_4k=\((.*?)\)\s*#", REST.read_text(), flags=re.DOTALL).group(1)
    header = re.search(r"leaderboard\.yaml (context_length=4096.*?)# 4k", TIER1.read_text(), flags=re.DOTALL)
    header_text = header.group(1).replace("#", " ").replace("\\\n", " ")
    (part,) = [p for p in PARTS if p.results_dir == "results/leaderboard_4k"]
    published = part.command.replace("\\\n", " ")
    in_script = _fields(script)
    assert in_script.pop("batch_size") == "8"  # output-neutral: not in a run's key
    assert in_script == _fields(header_text) == _fields(published)
    assert in_script["context_length"] == "4096" and in_script["output_dir"] == "results/leaderboard_4k"
