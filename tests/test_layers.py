"""The imports form layers, bench -> higgs_accel.commands (and cli) -> the higgs_accel library -> analysis, and none
runs back up or in a circle: analysis imports neither torch nor the trainer, the library knows no command, no module
of higgs_accel imports itself back through others. Checked on every import statement, lazy ones included (parsed
with ast, never from sys.modules). Also: docs/layout.md names every module there is, and the trainer never loads
pandas."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each package must never import (top-level package names).
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


# ---------------------------------------------------------------- module graph


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT, packages=("higgs_accel", "analysis", "bench")) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def module_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` (module ``name``) imports anywhere in it, function bodies included:
    ``from . import x`` and ``from .pkg import x`` count as importing module ``x`` when it is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                where = ".".join(base + ([node.module] if node.module else []))
            else:
                where = node.module or ""
            targets = [f"{where}.{a.name}" if f"{where}.{a.name}" in known else where for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import higgs_accel.loop.x` names module higgs_accel.loop
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: Path = ROOT, packages=("higgs_accel", "analysis", "bench")) -> dict[str, set[str]]:
    mods = modules(root, packages)
    return {name: module_imports(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> int:
    """bench 3, commands 2 (with the entry points cli and __main__), the library 1, analysis 0."""
    if name.startswith("bench"):
        return 3
    if name.startswith(("higgs_accel.commands", "higgs_accel.cli", "higgs_accel.__main__")):
        return 2
    return 1 if name.startswith("higgs_accel") else 0


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in edges.items() for b in targets if layer(b) > layer(a))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def test_no_import_cycle_and_none_upward():
    edges = graph()
    assert "higgs_accel.loop" in edges and "higgs_accel.commands.train" in edges
    assert cycles(edges) == []
    assert upward(edges) == []


def test_the_graph_check_fails_on_a_lazy_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "higgs_accel"
    (pkg / "commands").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "commands" / "__init__.py").write_text("")
    (pkg / "commands" / "go.py").write_text("import argparse\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f\n    from .commands import go\n")
    edges = graph(tmp_path, ("higgs_accel",))
    assert edges["higgs_accel.b"] == {"higgs_accel.a", "higgs_accel.commands.go"}
    assert cycles(edges) == [["higgs_accel.a", "higgs_accel.b"]]
    assert upward(edges) == [("higgs_accel.b", "higgs_accel.commands.go")]


def test_the_library_knows_no_argparse():
    library = [n for n in graph() if layer(n) == 1]
    with_argparse = [n for n in library if "argparse" in imported_packages(modules()[n])]
    assert with_argparse == []


# ---------------------------------------------------------------- docs/layout.md


def test_layout_names_every_module_and_none_that_is_gone():
    text = (ROOT / "docs" / "layout.md").read_text()
    named = set(re.findall(r"`((?:higgs_accel|analysis)/[\w/]+\.py)`", text))
    named |= {f"{folder}{m}.py" for folder, group in re.findall(r"`((?:higgs_accel|analysis)/[\w/]*/)` \(([^)]*)\)",
                                                                 text)
              for m in re.findall(r"`(\w+)\.py`", group)}
    there = {str(p.relative_to(ROOT)) for pkg in ("higgs_accel", "analysis") for p in (ROOT / pkg).rglob("*.py")}
    assert sorted(there - named) == [], "modules docs/layout.md does not name"
    assert sorted(named - there) == [], "modules docs/layout.md names that are gone"


# ---------------------------------------------------------------- pandas stays out of training


@pytest.mark.parametrize("code", [
    "import higgs_accel.events",
    "import higgs_accel.loop, higgs_accel.cli; from higgs_accel.cli import build_parser; build_parser()",
])
def test_the_trainer_never_imports_pandas(code):
    r = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('pandas' in sys.modules)"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_the_analysis_api_still_imports_on_use():
    r = subprocess.run([sys.executable, "-c", "import sys, analysis\nassert 'pandas' not in sys.modules\n"
                        "from analysis import load_run, Run, load_runs\nprint('pandas' in sys.modules)"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"
