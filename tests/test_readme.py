"""The README's commands work as written.

In:  README.md (its `<!-- tested -->` blocks, every `python -m X` and `make TARGET` it names), the Makefile, and the
     relative links of README.md and docs/*.md.
Out: the quick-start block run line by line in a temporary directory (`python` = this venv's interpreter), each line
     exiting 0; every named module runnable with `python -m` (a package with a __main__, or a module with a
     `__name__ == "__main__"` block); every named make target defined; every relative link pointing at a file and
     heading that exist. The checkers are tested on made-up names (negative controls).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARK = "<!-- tested -->"


def marked_blocks(text: str) -> list[list[str]]:
    """The commands of every ```bash fence right after a `<!-- tested -->` line: one entry per command, backslash
    continuations joined, blank and comment-only lines dropped."""
    blocks = []
    for m in re.finditer(re.escape(MARK) + r"\s*\n```bash\n(.*?)\n```", text, re.S):
        joined = re.sub(r"\s*\\\n\s*", " ", m.group(1))
        blocks.append([line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")])
    return blocks


def code_spans(text: str) -> list[str]:
    """Fenced blocks and inline code spans: where the README writes commands."""
    fences = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    return fences + re.findall(r"`([^`\n]+)`", prose)


def named_modules(text: str) -> list[str]:
    return sorted(set(re.findall(r"\bpython3? -m ([A-Za-z_][\w.]*)", text)))


def runnable(module: str) -> bool:
    """`python -m module` would run something: a package with __main__, or a module with a main block."""
    try:
        spec = importlib.util.find_spec(module)
        if spec is None:
            return False
        if spec.submodule_search_locations is not None:
            return importlib.util.find_spec(module + ".__main__") is not None
    except (ImportError, ValueError):
        return False
    source = Path(spec.origin).read_text(encoding="utf-8") if spec.origin and spec.origin.endswith(".py") else ""
    return re.search(r"""__name__\s*==\s*['"]__main__['"]""", source) is not None


def missing_modules(text: str) -> list[str]:
    return [m for m in named_modules(text) if not runnable(m)]


def make_targets(makefile: str) -> set[str]:
    targets = set()
    for line in makefile.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*:(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return targets


def named_targets(text: str) -> list[str]:
    """Every target after `make` in the README's code, up to the first VAR=value, option or comment."""
    names = set()
    for span in code_spans(text):
        for m in re.finditer(r"(?<![\w/.-])make[ \t]+([^\n#`|;&]*)", span):
            for word in m.group(1).split():
                if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                    break
                names.add(word)
    return sorted(names)


def missing_targets(text: str, makefile: str) -> list[str]:
    defined = make_targets(makefile)
    return [t for t in named_targets(text) if t not in defined]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(path: Path) -> list[str]:
    """Relative links of a markdown file whose file or #heading does not exist."""
    broken = []
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", dest.read_text(encoding="utf-8"), re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    return broken


# -- the checkers can fail -----------------------------------------------------------------------------------------
def test_checkers_report_made_up_names():
    assert missing_modules("run `python -m runtime.no_such_module` or python -m runtime.generate") == ["runtime.no_such_module"]
    assert missing_modules("python -m runtime.core") == ["runtime.core"]  # a package without __main__
    makefile = (REPO / "Makefile").read_text()
    assert missing_targets("```bash\nmake no-such-target OUT=x\nmake install\n```", makefile) == ["no-such-target"]
    assert named_targets("`make export MODEL=m OUT=o PROFILE=cpu` and `make demo  # comment`") == ["demo", "export"]
    assert marked_blocks(f"{MARK}\n```bash\npython -m a \\\n   --flag\n# note\n\npython -m b\n```\n") == [
        ["python -m a --flag", "python -m b"]]


def test_link_checker_reports_a_missing_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n## Some (`x.y`) heading\n")
    (tmp_path / "b.md").write_text("[ok](a.md#some-xy-heading) [bad](a.md#nope) [gone](c.md) [web](https://x.y)\n")
    assert broken_links(tmp_path / "b.md") == ["a.md#nope", "c.md"]


# -- the README ----------------------------------------------------------------------------------------------------
def test_every_python_module_named_runs_with_dash_m():
    text = README.read_text(encoding="utf-8")
    assert "runtime.generate" in named_modules(text)
    assert missing_modules(text) == []


def test_every_make_target_named_exists():
    text = README.read_text(encoding="utf-8")
    assert {"install", "demo", "test-all"} <= set(named_targets(text))
    assert missing_targets(text, (REPO / "Makefile").read_text()) == []


@pytest.mark.parametrize("doc", ["README.md", "docs/contract.md", "docs/design.md", "docs/performance.md"])
def test_relative_links_resolve(doc):
    assert broken_links(REPO / doc) == []


@pytest.mark.slow  # whole exports: CI runs it (make test-all), make test does not
def test_quick_start_runs_as_written(tmp_path):
    """The marked block, line by line, in an empty directory: `python` is this interpreter's venv."""
    blocks = marked_blocks(README.read_text(encoding="utf-8"))
    assert blocks and all(blocks), "README.md has no `<!-- tested -->` bash block"
    commands = [c for block in blocks for c in block]
    assert "--size tiny" in " ".join(commands), "the tested block must stay on the tiny checkpoint"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    for command in commands:
        run = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, f"`{command}` exited {run.returncode}:\n{run.stderr[-2000:]}"
