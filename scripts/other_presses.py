"""Print, comma-separated, the presses of a config's ``press_name`` that are not in a given list (refusing names the
config does not hold): the second process's share in ``sweep_two_processes.sh`` and ``leaderboard_rest.sh``.

    python scripts/other_presses.py CONFIG PRESS,PRESS,...
"""

import sys
from pathlib import Path

import yaml


def main(config: str, first: str) -> str:
    names = yaml.safe_load(Path(config).read_text())["press_name"]
    names = [names] if isinstance(names, str) else names
    chosen = first.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        sys.exit(f"not in {config}'s press_name: {', '.join(unknown)}")
    return ",".join(name for name in names if name not in chosen)


if __name__ == "__main__":
    print(main(*sys.argv[1:3]))
