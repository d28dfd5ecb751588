"""The package's layout (issue 27): every import resolves, imports only go down the parts' order, no module
imports itself back through others (no circle), and docs/design.md's picture is the one the code gives.

`python tests/test_layout.py` prints the picture (paste it into docs/design.md when the parts change)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "captioner"
# Top to bottom: a part may import itself and the parts after it, never one before it. cli and app are both on
# top and do not import each other; the shared leaves (errors, options, cpu) are the bottom, and just above them lite,
# the torch-free inference core (issue 26) that any part may use.
ORDER = ["cli", "app", "training", "pipeline", "runtime", "media", "model", "lite", "shared"]
SIDEWAYS = {("cli", "app"), ("app", "cli")}
FRONT = {"captioner", "captioner.__main__"}  # the package's front door: its lazy public API and `python -m`


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def part(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 2 or (len(bits) == 2 and (PKG / bits[1]).is_dir()) else "shared"


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every captioner module `module` imports, anywhere in the file (function-local and type-only imports
    too: a lazy import is still a dependency), as (module, line)."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("captioner"):
                continue
            for alias in node.names:  # `from . import x` / `from .pkg import mod` name modules
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules() else target, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("captioner")]
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {t for t, _ in imports(m, p) if t != m} for m, p in mods.items()}


def test_every_import_resolves():
    mods = modules()
    bad = [f"{mods[m].relative_to(ROOT)}:{line} imports {t}" for m, p in mods.items() for t, line in imports(m, p)
           if t not in mods and t != "captioner"]
    assert not bad, bad


def test_imports_only_go_down():
    mods = modules()
    up = []
    for m, p in mods.items():
        if m in FRONT:
            continue
        for t, line in imports(m, p):
            if t in FRONT and t == "captioner":
                continue  # `from captioner import __version__`: the package's one constant
            a, b = part(m), part(t)
            if a != b and (ORDER.index(b) < ORDER.index(a) or (a, b) in SIDEWAYS):
                up.append(f"{p.relative_to(ROOT)}:{line}: {a} imports {b} ({t})")
    assert not up, up


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    g = {m: {t for t in ts if t not in FRONT} for m, ts in graph().items() if m not in FRONT}
    assert cycles(g) == []


def test_the_checks_catch_an_upward_import_and_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert ORDER.index(part("captioner.cli.main")) < ORDER.index(part("captioner.model.search"))
    assert part("captioner.errors") == "shared" and part("captioner.model") == "model"


def picture() -> str:
    """The parts, top to bottom, each with its modules and the parts it imports (from the code)."""
    g, mods = graph(), modules()
    lines = []
    for name in ORDER:
        members = sorted(m for m in mods if part(m) == name and m not in FRONT and not mods[m].name == "__init__.py")
        uses = sorted({part(t) for m in members for t in g[m] if part(t) != name and t not in FRONT},
                      key=ORDER.index)
        files = ", ".join(mods[m].name for m in members)
        folder = "captioner/" if name == "shared" else f"captioner/{name}/"
        lines.append(f"{folder:<20} {files}")
        lines.append(f"{'':<20} -> {', '.join(uses) if uses else '(nothing of ours)'}")
    return "\n".join(lines)


def test_design_doc_shows_the_layout_of_the_code():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = text.split("```text\n", 1)[1].split("```", 1)[0].rstrip("\n")
    assert block == picture(), "docs/design.md's picture is stale: paste `python tests/test_layout.py`'s output"
    assert text.index("```text") < text.index("\n## How it works"), "the picture opens docs/design.md"


def test_public_api_as_the_readme_shows(tmp_path):
    """`from captioner import Captioner, Caption`: the README's Python lines, run as a user would (a fresh
    interpreter, HOME and cache), on a photo shipped with the app; `import captioner` alone stays light."""
    import os
    import subprocess

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = readme.split("From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    photo = ROOT / "captioner" / "assets" / "examples" / "chelsea.jpg"
    assert '"photo.jpg"' in code
    code = code.replace('"photo.jpg"', repr(str(photo)))
    env = {**os.environ, "HOME": str(tmp_path), "CAPTIONER_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}  # this checkout's package, wherever pip installed one
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.split()) >= 3 and "cat" in run.stdout  # the shipped model's caption of a cat
    light = subprocess.run([sys.executable, "-c", "import sys, captioner; from captioner import Caption, Captioner; "
                            "print('torch' in sys.modules, Captioner.__module__, Caption.__name__)"],
                           capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert light.stdout.split() == ["False", "captioner.pipeline.load", "Caption"], light.stderr
    bare = subprocess.run([sys.executable, "-c", "import sys, captioner; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert bare.stdout.strip() == "False", bare.stderr


if __name__ == "__main__":
    sys.stdout.write(picture() + "\n")
