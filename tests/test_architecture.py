"""The architecture as a test (docs/architecture.md): imports between the project's packages point one way, no
project import hides inside a function, and modules and functions stay small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "models", "parallel", "data_pipeline", "trainer", "jobs")
ALLOWED = {  # package -> the project packages it may import
    "common": set(),
    "models": {"common"},
    "parallel": {"common"},  # it knows no model and no video: a model hands it a ParallelPlan
    "data_pipeline": {"common", "models"},  # models: the tokenizer encoder
    "trainer": {"common", "models", "parallel", "data_pipeline"},
    "jobs": {"common", "models", "parallel", "data_pipeline", "trainer"},
}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
LONG_FUNCTIONS = {  # (file, function): why it stays one function
}


def sources(folders=PACKAGES + ("benchmarks",)) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def project_imports(tree: ast.AST):
    """(node, imported project package, inside a function?) for every import of one of our packages."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    yield child, name.split(".")[0], in_function
            yield from visit(child, nested)
    yield from visit(tree, False)


def test_imports_point_one_way_and_none_hides_in_a_function():
    bad = []
    for path in sources(PACKAGES):
        package = path.relative_to(ROOT).parts[0]
        for node, target, local in project_imports(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if target != package and target not in ALLOWED[package]:
                bad.append(f"{where}: {package} -> {target} is not allowed")
            if local:
                bad.append(f"{where}: a function-local import of {target} (import the project's modules at the top)")
    assert not bad, "\n".join(bad)


def test_no_cycles_between_packages():
    """The allowed edges themselves form no cycle (so neither can the imports)."""
    order = []

    def visit(package, path):
        assert package not in path, f"cycle: {' -> '.join(path + [package])}"
        for dep in ALLOWED[package]:
            visit(dep, path + [package])
        order.append(package)

    for package in PACKAGES:
        visit(package, [])


def test_files_and_functions_stay_small():
    bad = []
    for path in sources():
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            bad.append(f"{rel}: {len(text.splitlines())} lines > {MAX_FILE_LINES}")
        for node in ast.walk(ast.parse(text, rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                lines = node.end_lineno - start + 1
                if lines > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS:
                    bad.append(f"{rel}:{node.lineno} {node.name}: {lines} lines > {MAX_FUNCTION_LINES}")
    assert not bad, "\n".join(bad)


def test_the_exceptions_still_exist():
    """A listed exception that was shortened or removed is taken off the list."""
    stale = []
    for rel, name in LONG_FUNCTIONS:
        tree = ast.parse((ROOT / rel).read_text())
        found = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name
                 and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
        if not found:
            stale.append(f"{rel}:{name}")
    assert not stale, stale
