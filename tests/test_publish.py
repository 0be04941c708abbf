"""``python -m evaluation publish`` on fabricated leaderboard parts (made up here, not measured): the reports are
written, the generated blocks of docs/leaderboard.md and README.md are replaced and nothing else, plots are copied,
a part without finished runs says so, and the README's headline pairs the best PiKV configuration with the best
kvpress press at each ratio."""

from __future__ import annotations

import pandas as pd
import pytest
from pikvpress_eval import presses
from pikvpress_eval.publish import DOCS_MARKERS, README_MARKERS, Part, headline, publish
from test_leaderboard_report import write_run

PARTS = (
    Part("tier 1", "results/one", "python -m evaluation run --config one.yaml"),
    Part("tier 2", "results/two", "python -m evaluation run --config two.yaml", ("results/one",)),
    Part("4k", "results/four", "python -m evaluation run --config four.yaml"),
)


@pytest.fixture(autouse=True)
def press_sets(monkeypatch):
    monkeypatch.setattr(presses, "MASKS_ONLY", frozenset({"adakv_expected_attention"}), raising=False)
    monkeypatch.setattr(presses, "CHANNEL_PRUNING", frozenset({"think"}), raising=False)


@pytest.fixture
def root(tmp_path):
    one, two = tmp_path / "results" / "one", tmp_path / "results" / "two"
    write_run(one, "no_press", 0.0, 15, 1.0)
    write_run(one, "snapkv", 0.5, 12, 0.5)
    write_run(one, "adakv_expected_attention", 0.5, 13, 1.0)  # the best kvpress press at 0.5: masks only
    write_run(one, "think", 0.5, 20, 0.9)  # channel pruning: never the best kvpress press
    write_run(one, "pikv_int4", 0.5, 14, 0.2)
    write_run(one, "expert_routing", 0.5, 10, 0.5)
    write_run(one, "snapkv", 0.9, 4, 0.1)
    write_run(one, "pikv_int4", 0.9, 6, 0.05)
    write_run(one, "knorm", 0.75, 9, 0.25)  # no PiKV row at 0.75: no headline row
    write_run(two, "no_press", 0.0, 15, 1.0)
    write_run(two, "merging_knorm", 0.5, 11, 0.5)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "leaderboard.md").write_text(
        f"# Leaderboard\n\nbefore\n\n{DOCS_MARKERS[0]}\nold tables\n{DOCS_MARKERS[1]}\n\nafter\n"
    )
    (tmp_path / "README.md").write_text(f"# readme\n\n{README_MARKERS[0]}\nold headline\n{README_MARKERS[1]}\nrest\n")
    return tmp_path


def test_publish_rewrites_only_the_generated_blocks(root):
    written = publish(root, PARTS)
    docs = (root / "docs" / "leaderboard.md").read_text()
    readme = (root / "README.md").read_text()
    assert docs.startswith("# Leaderboard\n\nbefore\n\n") and docs.endswith(f"{DOCS_MARKERS[1]}\n\nafter\n")
    assert "old tables" not in docs and "old headline" not in readme
    assert readme.startswith("# readme\n\n") and readme.endswith(f"{README_MARKERS[1]}\nrest\n")
    assert (root / "results" / "one" / "report.md") in written and (root / "results" / "two" / "report.md") in written
    generated = docs.split(DOCS_MARKERS[0])[1]
    assert "### 1. tier 1" in generated and "python -m evaluation run --config one.yaml" in generated
    assert "### 3. 4k" in generated and "Not run yet: no finished run in `results/four`" in generated
    assert "Raw measurements" not in generated and "##### Leaderboard" in generated
    # tier 2 against tier 1: merging_knorm's best kvpress press at 0.5 is tier 1's, not itself
    assert "merging_knorm" in generated.split("### 2. tier 2")[1]
    assert "vs adakv_expected_attention" in generated.split("### 2. tier 2")[1]
    for link in [part for part in generated.split("](") if part.startswith("images/leaderboard/")]:
        assert (root / "docs" / link.split(")")[0]).is_file()
    assert any((root / "docs" / "images" / "leaderboard").glob("one_pareto_*.png"))
    # publishing again gives the same pages (the blocks are replaced, not appended)
    publish(root, PARTS)
    assert (root / "docs" / "leaderboard.md").read_text() == docs and (root / "README.md").read_text() == readme


def test_headline_pairs_the_best_pikv_with_the_best_kvpress_press(root):
    publish(root, PARTS)
    table = pd.read_csv(root / "results" / "one" / "report.csv")
    text, _, rows = headline(table).partition("\n\n")
    assert "Context 1024 tokens, test split, N = 40 prompts per point." in text
    lines = rows.splitlines()
    assert len(lines) == 2 + 2  # header, rule, ratios 0.5 and 0.9 (0.75 has no PiKV row)
    half = [c.strip() for c in lines[2].strip("|").split("|")]
    assert half[0] == "50%"
    assert half[1].startswith("75.0 [")  # no press
    assert half[2].startswith("adakv_expected_attention (masks only) 65.0 [") and half[3] == "1.00"
    assert half[4].startswith("pikv_int4 70.0 [") and half[5] == "0.20"
    assert half[6].startswith("+5.0 [")
    assert half[7] == "snapkv@0.90" and half[8].startswith("+50.0 [")  # at most 0.2 of bf16: snapkv@0.9 (20)
    tenth = [c.strip() for c in lines[3].strip("|").split("|")]
    assert tenth[2].startswith("snapkv 20.0 [") and tenth[4].startswith("pikv_int4 30.0 [")
    assert tenth[6].startswith("+10.0 [") and tenth[7] == ""  # nothing kvpress holds 0.05


def test_publish_refuses_a_page_without_its_markers(root):
    (root / "README.md").write_text("# readme without markers\n")
    with pytest.raises(ValueError, match="no generated block"):
        publish(root, PARTS)


def test_publish_command(root, monkeypatch, capsys):
    from pikvpress_eval import publish as module
    from pikvpress_eval.__main__ import main

    monkeypatch.setattr(module, "PARTS", PARTS)
    main(["publish", "--root", str(root)])
    assert f"written: {root / 'README.md'}" in capsys.readouterr().out
    assert "pikv_int4" in (root / "README.md").read_text()
