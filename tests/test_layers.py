"""The imports form three layers, bench -> higgs_accel -> analysis, and none runs back up: analysis imports neither
torch nor the trainer, the trainer never imports bench. Checked on every import statement, lazy ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each layer must never import (top-level package names).
FORBIDDEN = {"analysis": {"torch", "torchaudio", "higgs_accel", "bench", "transformers", "accelerate", "peft"},
             "higgs_accel": {"bench"}}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages named by every import in ``path``; a relative import counts as its own package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_runs_back_up(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files
    wrong = {str(f.relative_to(ROOT)): sorted(imported_packages(f) & FORBIDDEN[layer]) for f in files}
    assert {f: names for f, names in wrong.items() if names} == {}


def test_the_check_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import torch.nn\n    from higgs_accel.loop import train\n    from . import x\n")
    assert imported_packages(module) == {"torch", "higgs_accel"}
