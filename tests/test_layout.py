"""The tree's plan holds: sub-packages by stage, imports only toward earlier stages (no circles), the package
docstrings name exactly the sub-packages there are, and modules stay readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ernie_export", "runtime")
# What each stage may import from the project (itself always): the pipeline's order.
ALLOWED = {
    "runtime.core": {"runtime.core"},
    "runtime.generate": {"runtime.core"},
    "runtime.serve": {"runtime.core", "runtime.generate"},
    "runtime.eval": {"runtime.core", "runtime.generate"},
    "ernie_export.checkpoint": {"runtime.core", "runtime.generate"},
    "ernie_export.model": {"ernie_export.checkpoint"},
    "ernie_export.graph": {"runtime.core", "ernie_export.model"},
    "ernie_export.artifact": {"runtime.core", "runtime.generate", "ernie_export.checkpoint", "ernie_export.model",
                              "ernie_export.graph"},
}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def project_imports(path: Path) -> set[str]:
    """The project modules `path` imports at module level (function-level imports are deliberate late binding)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found


def stage_of(module: str) -> str | None:
    return next((s for s in ALLOWED if module == s or module.startswith(s + ".")), None)


def test_stages_import_only_earlier_stages():
    """Guards the knots of issue 27: runtime core importing the generation layer (an import circle), serving
    borrowing from evaluation, the export side's graph building reaching into artifacts."""
    wrong = []
    for name, path in modules().items():
        stage = stage_of(name)
        for imported in project_imports(path):
            target = stage_of(imported)
            if stage and target and target != stage and target not in ALLOWED[stage]:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


def test_no_import_circles():
    graph = {name: {i for i in project_imports(path) if i in modules()} for name, path in modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_stage_check_catches_a_wrong_import(tmp_path):
    """Negative control: the rule reports a core module importing the generation layer."""
    bad = tmp_path / "bad.py"
    bad.write_text("from runtime.generate.sampling import SamplingParams\n")
    assert stage_of(next(iter(project_imports(bad)))) not in ALLOWED["runtime.core"]


@pytest.mark.parametrize("package", PACKAGES)
def test_package_docstring_names_its_subpackages(package):
    """The package docstring's list of sub-packages is the tree's (a hand-kept list would drift)."""
    import importlib

    doc = importlib.import_module(package).__doc__
    named = {line.split()[0] for line in doc.splitlines() if line.startswith("    ") and line.split()}
    actual = {p.name for p in (ROOT / package).iterdir() if (p / "__init__.py").is_file()}
    assert named == actual, (named, actual)


def test_modules_are_readable_in_one_sitting():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
