"""No number typed by hand: the committed results are what the records give, and a planted number is caught."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from repro.config import ConfigError
from repro.records import read_all
from repro.report import generate
from repro.report.numbers import check_readme, check_results, numbers_in, render_notes, unsupported_numbers
from repro.report.tables import records_frame
from tests.unit.test_report import setup_results

ROOT = Path(__file__).resolve().parents[2]


def test_committed_results_markdown_carries_only_numbers_the_records_give():
    """Every committed results directory regenerates byte for byte, and its hand-written notes hold no typed number."""
    problems = check_results(ROOT / "results")
    assert problems == []


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    results, _ = setup_results(tmp_path)
    (results / "NOTES.md").write_text("# Notes\n\nMiCL's kNN is {{cell micl knn 90s}}, the floor's "
                                      "{{mean random-init knn -}}; {{steps micl 90s}} steps.\n")
    generate(results)
    return results


def test_a_clean_directory_passes_and_notes_are_rendered(toy: Path):
    assert check_results(toy) == []
    readme = (toy / "README.md").read_text()
    assert "MiCL's kNN is 41.0 ± 1.4 (n=2), the floor's 20.0; 400 steps." in readme
    assert "{{" not in readme


def test_a_number_planted_in_a_generated_table_fails(toy: Path):
    md = toy / "toy.md"
    text = md.read_text()
    planted = re.sub(r"\b41\.00\b", "41.70", text, count=1)
    assert planted != text
    md.write_text(planted)
    problems = check_results(toy)
    assert any("toy.md: differs" in p for p in problems)


def test_a_number_typed_into_the_notes_fails(toy: Path):
    notes = toy / "NOTES.md"
    notes.write_text(notes.read_text() + "\nMiCL beats MAE by 98.76 points.\n")
    generate(toy)  # regenerated: the generated files are consistent; the typed number is still not in any record
    problems = check_results(toy)
    assert len(problems) == 1 and "NOTES.md: the number 98.76 is not given by the records" in problems[0]


def test_numbers_given_by_a_record_pass_and_names_are_not_numbers(toy: Path):
    recs, _ = read_all(toy / "records")
    df = records_frame(recs)
    # 400 steps and a 90 s budget are record values; CIFAR-10, ViT-B/16 and code are names, not numbers
    text = "A run of 400 steps on CIFAR-10 with ViT-B/16 (`--budget 123s`) and 90 seconds; [x](a/17.md)"
    assert numbers_in(text) == ["400", "90"]
    assert unsupported_numbers(text, df) == []
    assert unsupported_numbers("a mean of 41.3", df) == ["41.3"]


def test_an_unknown_placeholder_is_an_error_naming_the_file(toy: Path):
    recs, _ = read_all(toy / "records")
    with pytest.raises(ConfigError, match="NOTES.md: unknown placeholder"):
        render_notes("{{median micl knn 90s}}", records_frame(recs), "NOTES.md")
    with pytest.raises(ConfigError, match="no records of micl knn 5m"):
        render_notes("{{cell micl knn 5m}}", records_frame(recs), "NOTES.md")


def committed_text(path: Path) -> str:
    """``path`` as committed (a user's own demo run appends to results/ and regenerates its tables; the README quotes
    the committed ones); the working file outside a git checkout."""
    import subprocess

    rel = path.resolve().relative_to(ROOT)
    p = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{rel}"], capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else path.read_text()


def test_the_readme_results_block_quotes_only_generated_numbers(tmp_path: Path):
    assert check_readme(ROOT / "README.md", committed_text) == []
    text = (ROOT / "README.md").read_text()
    assert "<!-- numbers from:" in text
    # the same block with one number changed, against the same generated files
    planted = tmp_path / "README.md"
    (tmp_path / "results").symlink_to(ROOT / "results")
    block = text[text.index("<!-- numbers from:"):text.index("<!-- end numbers -->")]
    quoted = re.search(r"(\d+)\.(\d\d) ± \d+\.\d\d", block)  # the block's first quoted cell
    assert quoted is not None
    wrong = f"{int(quoted.group(1)) + 1}.{quoted.group(2)}"
    planted.write_text(text.replace(quoted.group(0), quoted.group(0).replace(quoted.group(1) + ".", wrong[:-2], 1), 1))
    assert [p for p in check_readme(planted, committed_text) if wrong in p]


def test_a_placeholder_never_averages_two_training_precisions(toy: Path):
    recs, _ = read_all(toy / "records")
    df = records_frame(recs)
    bf16 = df[df["method"] == "micl"].assign(precision="bf16", value=df["value"] + 1)
    both = records_frame(recs).assign(precision="fp32")
    both = pd.concat([both, bf16], ignore_index=True)
    with pytest.raises(ConfigError, match="several training precisions"):
        render_notes("{{cell micl knn 90s}}", both, "NOTES.md")
    assert render_notes("{{mean micl knn 90s fp32}} {{mean micl knn 90s bf16}}", both) == "41.0 42.0"
