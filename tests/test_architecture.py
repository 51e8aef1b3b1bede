"""The shape of the code: imports point one way, every document a file names exists, no config key is dead.

Layers, lowest first; a module may import its own layer and the ones below, never above:
  core (errors, paths, records, tables, provenance, config, ops, kl, losses, advantages)
  ← data, models, rollout, reward, attention, sft, tracking ← train ← evaluation ← analysis
  (report, plots, theory, audit) ← bench ← cli.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from klbench import config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "klbench"

LAYERS = [
    {"klbench", "klbench.errors", "klbench.paths", "klbench.records", "klbench.tables", "klbench.provenance",
     "klbench.config", "klbench.ops", "klbench.kl", "klbench.losses", "klbench.advantages"},
    {"klbench.data", "klbench.models", "klbench.rollout", "klbench.reward", "klbench.attention", "klbench.precision", "klbench.sft",
     "klbench.tracking"},
    {"klbench.train"},
    {"klbench.evaluate"},
    {"klbench.report", "klbench.plots", "klbench.theory", "klbench.audit"},
    {"klbench.bench"},
    {"klbench.cli", "klbench.__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(module == g or module.startswith(g + ".") for g in group if g != "klbench") or module in group:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it")


def imports(module: str) -> set[str]:
    """klbench modules `module` imports anywhere in its body (lazy imports inside functions included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


GRAPH = {m: imports(m) for m in MODULES}


def test_there_is_no_import_cycle():
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for n in sorted(GRAPH[m]):
            visit(n)
        stack.pop()

    for m in sorted(GRAPH):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_point_down_the_layers():
    upward = [f"{m} (layer {layer(m)}) imports {n} (layer {layer(n)})"
              for m, targets in GRAPH.items() for n in targets if layer(n) > layer(m)]
    assert not upward, "\n".join(upward)


def test_nothing_but_the_cli_uses_the_benchmarks():
    users = [m for m, targets in GRAPH.items() if not m.startswith(("klbench.bench", "klbench.cli"))
             and any(n.startswith("klbench.bench") for n in targets)]
    assert not users, users


# -- documents --------------------------------------------------------------------------------------
TEXT_FILES = [*PACKAGE.rglob("*.py"), *(REPO / "conf").rglob("*.yaml"), REPO / "README.md", *(REPO / "docs").glob("*.md"),
              REPO / "pyproject.toml", *(REPO / "scripts").glob("*"), REPO / "Makefile", *(REPO / ".ci").glob("*")]
MD_NAME = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
#: Files klbench writes into a results folder: named in code as outputs, not as documents to read.
WRITTEN = {"table.md"}
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_markdown_file_named_in_code_configs_and_docs_exists():
    missing = []
    for f in TEXT_FILES:
        for name in MD_NAME.findall(f.read_text()):
            candidates = [REPO / name, f.parent / name, REPO / "docs" / name]
            if not any(c.exists() for c in candidates) and not name.startswith(("DIR/", "<", "{")) \
                    and name not in WRITTEN:
                missing.append(f"{f.relative_to(REPO)}: {name}")
    assert not missing, "\n".join(missing)


def test_links_in_readme_and_docs_resolve():
    broken = []
    for f in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in LINK.findall(f.read_text()):
            if not target.startswith(("http://", "https://")) and not (f.parent / target).exists():
                broken.append(f"{f.relative_to(REPO)}: {target}")
    assert not broken, "\n".join(broken)


#: the planning documents that live beside the repository, never in it (assembled here from their parts, so
#: this guard does not itself name them)
OUTSIDE = [re.escape(".." + "/" + "shared"), *(re.escape(n + ".md") for n in ("THEORY", "DESIGN", "STYLE")),
           "FIELD" + "_NOTES"]


@pytest.mark.parametrize("pattern", OUTSIDE)
def test_no_reference_to_documents_outside_the_repository(pattern):
    hits = [str(f.relative_to(REPO)) for f in TEXT_FILES if re.search(pattern, f.read_text())]
    assert not hits, hits


def test_every_claim_number_points_at_the_theory_page():
    text = (REPO / "docs" / "theory.md").read_text()
    assert all(f"{n}. **" in text for n in range(1, 6)), "docs/theory.md defines claims 1-5"


# -- config keys -----------------------------------------------------------------------------------
def _keys(node, prefix=""):
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f.name


def test_every_config_key_is_read_by_the_code():
    """A key nothing reads does nothing: each field name is used outside config.py (as `.name`, or by
    name through KLSpec.from_config's fields)."""
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "config.py")
    spec_fields = {f.name for f in dataclasses.fields(__import__("klbench.kl", fromlist=["KLSpec"]).KLSpec)}
    dead = [key for key, name in _keys(config.Config())
            if not re.search(rf"\.{name}\b", source) and not (key.startswith("kl.") and name in spec_fields)]
    assert not dead, f"config keys no code reads: {dead}"
