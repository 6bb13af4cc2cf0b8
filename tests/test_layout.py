"""The repository's layout rules, checked on the source: imports go one way, the environment is read in one module,
and nothing points outside the repository."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kontext_server", "optimizations", "patches")
TOP_MODULES = ("utils.py", "flux_kontext_optimized.py")
SCRIPT_DIRS = ("tools", "bench")


def product_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return sorted(files + [ROOT / m for m in TOP_MODULES])


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules a file imports (absolute names); with top_level_only, only those run when it is imported."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_no_import_cycles_among_the_products_modules():
    files = {module_name(p): p for p in product_files()}
    graph = {m: {i for i in imports(p, top_level_only=True) if i in files and i != m} for m, p in files.items()}
    # A module's import of `pkg.mod` first imports the package `pkg` (its __init__): an edge to each parent too.
    for m in graph:
        graph[m] |= {".".join(i.split(".")[:k]) for i in list(graph[m]) for k in range(1, i.count(".") + 1)
                     if ".".join(i.split(".")[:k]) in files and ".".join(i.split(".")[:k]) != m
                     and not m.startswith(".".join(i.split(".")[:k]) + ".")}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_product_module_imports_a_tool_or_bench_script():
    scripts = {p.stem for d in SCRIPT_DIRS for p in (ROOT / d).glob("*.py")}
    for path in product_files():
        bad = {i.split(".")[0] for i in imports(path, top_level_only=False)} & (scripts | set(SCRIPT_DIRS))
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("package, may_import", [
    ("optimizations", {"kontext_server.settings"}),  # optimisations never reach into the server (settings: a leaf)
    ("patches", set()),
])
def test_lower_layers_do_not_import_the_server(package, may_import):
    for path in (ROOT / package).rglob("*.py"):
        reached = {i for i in imports(path, top_level_only=False) if i.startswith("kontext_server")}
        assert reached <= may_import | {"kontext_server"}, f"{path.relative_to(ROOT)} imports {sorted(reached)}"


def test_the_service_and_the_engine_do_not_import_the_http_layer():
    for sub in ("service", "engine.py", "models", "benchmark", "startup", "settings.py", "request.py", "jobs.py"):
        target = ROOT / "kontext_server" / sub
        for path in ([target] if target.is_file() else target.rglob("*.py")):
            reached = {i for i in imports(path, top_level_only=False) if i.startswith("kontext_server.api")}
            assert not reached, f"{path.relative_to(ROOT)} imports {sorted(reached)}"


def tracked_text_files() -> list[Path]:
    skip = {".git", ".venv", "benchmarks"}  # lab notes quote past commands verbatim; they are dated records
    out = []
    for p in ROOT.rglob("*"):
        if p.is_file() and not (set(p.relative_to(ROOT).parts) & skip) and p.suffix in (".py", ".md", ".sh", ".toml",
                                                                                       ".ini", ".txt", ".yaml"):
            out.append(p)
    return out


def test_nothing_refers_outside_the_repository():
    # spelled with character classes, so that this file does not match itself (it is checked like the others)
    pattern = re.compile(r"[.][.][/]shared|shared[/]DESIGN|(?<![/\w])DESIGN[.]md")
    for path in tracked_text_files():
        hits = [n for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
        assert not hits, f"{path.relative_to(ROOT)} refers outside the repository on lines {hits}"


def test_only_the_settings_module_touches_the_environment():
    allowed = {ROOT / "kontext_server" / "settings.py"}
    for path in product_files() + [p for d in SCRIPT_DIRS for p in (ROOT / d).glob("*.py")]:
        if path in allowed:
            continue
        assert "os.environ" not in path.read_text(), f"{path.relative_to(ROOT)} reads os.environ"


def test_no_sys_path_insert_anywhere():
    for path in product_files() + [p for d in (*SCRIPT_DIRS, "tests") for p in (ROOT / d).rglob("*.py")]:
        if path == Path(__file__):
            continue
        assert "sys.path.insert" not in path.read_text(), f"{path.relative_to(ROOT)} edits sys.path"
