"""The layers of DESIGN.md, checked on the source: data flows one way.

compiler/ is pure (it imports neither runtime/ nor topologies/ nor the command line),
runtime/ never imports topologies/, p4src/ is the pipeline spec everything else reads, and
nothing imports p4seg/, the command line that wires them. Imports inside functions count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "p4src": {"compiler", "runtime", "topologies", "p4seg"},
    "compiler": {"runtime", "topologies", "p4seg"},
    "runtime": {"topologies", "p4seg"},
    "topologies": {"p4seg"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for path in sorted((ROOT / layer).rglob("*.py"))
        for line, module in _imports(path)
        if module.split(".")[0] in FORBIDDEN[layer]
    ]
    assert not wrong, "\n".join(wrong)


def test_python_m_p4seg_is_the_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "p4seg", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert "check" in done.stdout and "compile" in done.stdout
