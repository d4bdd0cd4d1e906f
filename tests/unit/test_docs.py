"""Every command of the Typer app has help text, and README.md documents it with an example line
`python -m engine <command> ...` (a new command without docs fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from engine.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"
COMMANDS = typer.main.get_command(app).commands


def example_lines(text: str) -> list[str]:
    """Lines of README code blocks (and inline code) that run engine: `python -m engine <command> ...`."""
    return re.findall(r"python -m engine [a-z][a-z-]*[^\n`|]*", text)


def test_the_app_has_commands():
    assert {"run", "validate", "rules", "estimate", "eval"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_text(name):
    command = COMMANDS[name]
    assert (command.help or "").strip(), f"`{name}` has no docstring: add one, it is the command's --help text"
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert command.help.strip().split("\n")[0][:40] in " ".join(result.output.split())
    undocumented = [p.name for p in command.params if isinstance(p, typer.core.TyperOption) and not (p.help or "").strip()]
    assert undocumented == [], f"`{name}` options without help: {undocumented}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_readme_example(name):
    text = README.read_text(encoding="utf-8")
    examples = [line for line in example_lines(text) if line.split()[3] == name]
    assert examples, f"README.md has no example line `python -m engine {name} ...`; add one to the Commands section"
    assert f"| `python -m engine {name}" in text, f"`{name}` is missing from README.md's Commands table"


def layout_tree(text: str) -> set[str]:
    """Paths named by the README's layout tree: one entry per line, two spaces of indent per folder level."""
    section = text.split("## Layout", 1)[1]
    block = section.split("```", 2)[1]
    paths, parents = set(), []
    for line in block.splitlines():
        match = re.match(r"^( *)([\w.-]+/?)\s", line + " ")
        if not match or not match.group(2).strip():
            continue
        depth = len(match.group(1)) // 2
        parents = parents[:depth]
        path = "".join(parents) + match.group(2)
        paths.add(path.rstrip("/"))
        if path.endswith("/"):
            parents.append(match.group(2))
    return paths


def test_the_readme_layout_is_the_package_tree():
    root = README.parent
    listed = layout_tree(README.read_text(encoding="utf-8"))
    modules = {str(p.relative_to(root)) for p in (root / "engine").rglob("*") if p.suffix in (".py", ".yaml")
               and p.name != "__init__.py" and "__pycache__" not in p.parts and "templates" not in p.parts}
    packages = {str(p.parent.relative_to(root)) for p in (root / "engine").rglob("__init__.py")}
    missing = sorted((modules | packages) - listed - {"engine/tools/synthetic_phrases.yaml"})
    assert not missing, f"README layout lacks {missing}"
    gone = sorted(p for p in listed if p.startswith("engine") and not (root / p).exists())
    assert not gone, f"README layout names {gone}, which engine/ no longer has"
