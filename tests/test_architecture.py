"""The package's shape, read from its source: subpackages import in one direction, no module imports itself
back through others (imports inside functions count), and README's Layout table names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "neuron_torch"

# subpackage (or root module) → what it may import of the package besides itself (docs/ARCHITECTURE.md)
ALLOWED = {
    "errors": set(),
    "kernels": set(),
    "nn": {"kernels", "errors"},
    "data": {"errors"},
    "train": {"nn", "data", "errors"},
    "tracking": {"nn", "data", "errors"},
    "sklearn": {"nn", "tracking", "errors"},
    "cli": {"kernels", "nn", "data", "train", "tracking", "errors", "sklearn"},
    "__init__": set(),  # public names are looked up lazily, by string
}
ROOT_MODULES_AT_MOST = 5


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that ``name`` imports anywhere in its source (functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from neuron_torch.nn import layers` imports the module neuron_torch.nn.layers
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "neuron_torch" or target.startswith("neuron_torch."):
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def part(module: str) -> str:
    """The subpackage (or root module) a module belongs to."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_the_root_keeps_at_most_five_modules():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= ROOT_MODULES_AT_MOST, root


def test_every_module_belongs_to_a_known_part():
    unknown = sorted(m for m in modules() if part(m) not in ALLOWED)
    assert not unknown, f"modules outside the layout: {unknown}"


def test_subpackages_import_in_one_direction():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if target == "neuron_torch":  # the package itself: its public names, looked up lazily
                continue
            here, there = part(module), part(target)
            if here != there and there not in ALLOWED[here]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the direction:\n" + "\n".join(sorted(wrong))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a circle of imports."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_anywhere():
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" ↔ ".join(c) for c in found)


def test_the_cycle_finder_finds_a_circle():
    # the check above must be able to fail: a → b → c → a is one circle, d alone is none
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_direction_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "neuron_torch" / "data" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from neuron_torch.train import module\n")
    known = {"neuron_torch.train.module", "neuron_torch.train", "neuron_torch.data.probe"}
    assert imports_of("neuron_torch.data.probe", source, known) == {"neuron_torch.train.module"}


def layout_rows() -> set[str]:
    """The module paths README's Layout table names (``nn/layers.py``, ``errors.py``, ...)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`((?:[a-z_]+/)?[a-z_]+\.(?:py|c))`", section))


def test_readme_layout_names_every_module():
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*") if p.suffix in (".py", ".c")}
    files = {f for f in files if not f.endswith("__init__.py") and not f.endswith("__main__.py")}
    named = layout_rows()
    assert files - named == set(), f"modules missing from README's Layout table: {sorted(files - named)}"
    assert named - files == set(), f"README's Layout table names modules that do not exist: {sorted(named - files)}"


@pytest.mark.parametrize("name", ["nn", "kernels", "data", "train", "tracking", "cli"])
def test_each_subpackage_says_what_it_holds(name):
    init = PACKAGE / name / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{name}/__init__.py has no docstring"
