"""README's two set-up commands are exactly what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup -->\s*```(?:bash|sh)\n(.*?)```", text, re.S)
    assert block, "README.md must have a ```bash block right after <!-- setup -->"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_them() -> None:
    commands = readme_setup_commands()
    assert len(commands) == 2
    assert "zsad-bench run" in commands[0] and "pytest" in commands[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    for cmd in commands:
        assert cmd in ci_lines, f".ci/run does not run the README command: {cmd}"


def readme_plugin_example() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md must have a ```python block right after <!-- plugin-example -->"
    return block.group(1)


def test_readme_plugin_example_runs_end_to_end(tmp_path: Path, monkeypatch) -> None:
    import sys

    from zsad_bench.cli.main import main
    from zsad_bench.results import RunResult

    (tmp_path / "mine.py").write_text(readme_plugin_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mine", None)
    __import__("mine")  # registers the method, as its entry point would
    out = tmp_path / "mine.json"
    args = ["run", "--method", "mine", "--image-size", "64", "--categories", "cap", "--quiet", "--out", str(out)]
    assert main(args) == 0
    result = RunResult.load(out)
    (rec,) = result.records
    assert result.method == "mine" and rec.category == "cap" and rec.n_images == 25
    assert 0.0 <= rec.metrics["image_auroc"] <= 1.0 and len(result.images) == 25
    assert main([*args[:-1], str(tmp_path / "bad.json"), "--set", "shrink=2"]) == 2
