"""`geokd synthetic` end to end through the CLI, and the one-line user-error contract."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from geokd.cli import app

runner = CliRunner()
SMALL = ["--n", "40", "--d-teacher", "16", "--d-student", "8", "--steps", "20", "--quiet"]


def test_synthetic_writes_json_and_png(tmp_path):
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    result = runner.invoke(app, ["synthetic", *SMALL, "--json", str(out_json), "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    assert "counterexample" in result.output and "procrustes" in result.output
    data = json.loads(out_json.read_text())
    for name in ("procrustes", "gram", "cka", "proj"):
        entry = data["losses"][name]
        assert {"final_loss", "preserved_pairs", "total_pairs"} <= set(entry)
        assert {"to_a", "to_b"} <= set(data["counterexample"]["losses"][name])
    assert data["config"]["n"] == 40 and data["geokd_version"]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--d-student", "64"], "d_student must be between 1 and d_teacher - 1 = 63"),
        (["--epsilon", "2"], "epsilon must be in (0, 1), got 2.0"),
        (["--losses", "procrustes,ckaa"], "losses must be a non-empty subset"),
        (["--json", "/nonexistent-dir/x.json"], "--json: directory '/nonexistent-dir' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragment, tmp_path):
    result = runner.invoke(app, ["synthetic", "--steps", "1", "--quiet", *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.output


def test_bad_input_leaves_an_existing_output_untouched(tmp_path):
    out_json = tmp_path / "s.json"
    out_json.write_text("previous results")
    result = runner.invoke(app, ["synthetic", "--epsilon", "-1", "--json", str(out_json)])
    assert result.exit_code == 2
    assert out_json.read_text() == "previous results"


@pytest.mark.parametrize("args", [["synthetic", "--n", "abc"], ["synthetic", "--bogus"], ["nope"]])
def test_usage_errors_from_the_console_script_are_one_line(args):
    proc = subprocess.run([sys.executable, "-m", "geokd", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("geokd ")


def test_update_markdown_section_replaces_only_its_block(tmp_path):
    from geokd.artifacts import update_markdown_section

    path = tmp_path / "results.md"
    update_markdown_section(path, "a", "## A\n\nfirst")
    path.write_text(path.read_text() + "\nhand-written notes\n")
    update_markdown_section(path, "b", "## B")
    update_markdown_section(path, "a", "## A\n\nsecond")
    text = path.read_text()
    assert text.startswith("# Results\n") and "first" not in text and "second" in text
    assert text.index("second") < text.index("hand-written notes") < text.index("## B")
    assert text.count("<!-- geokd:a:start -->") == 1 and text.count("<!-- geokd:b:end -->") == 1


def test_error_lines_keep_square_brackets(capsys):
    """Messages quote values such as geokd[demo] or dev[:10]; rich must not read them as markup."""
    from geokd.cli import _fail

    _fail("pip install 'geokd[demo]'; splits dev, dev[:10]")
    assert "pip install 'geokd[demo]'; splits dev, dev[:10]" in capsys.readouterr().err
