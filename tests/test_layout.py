"""The package's shape (README, "What is where"): floors and one-way imports (file sizes, the
README's line counts and references to outside notes are checked by .ci/lint.py).

Read from the source with `ast`, so a cycle or a reach into another module's private names
fails here even where Python would happen to import it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minimoe"

# floor of every library module: a module imports only from its own floor or below
FLOORS = {
    "config": 0, "checks": 0, "files": 0, "data": 0, "tokens": 0, "tables": 0, "mixing": 0, "tasks": 0,
    "notebook": 0, "shards": 0, "run_files": 0,
    "model": 1, "moe": 1, "flops": 1,
    "grow": 2, "stream": 2, "upcycle": 2, "interop": 2, "checkpoint": 2, "sim": 2, "hub": 3,
    "train": 3, "evaluate": 3, "generate": 3, "dist": 3, "expert_parallel": 3, "tensor_parallel": 3, "experts": 3,
    "recipes": 4,
    "cli": 5, "__main__": 5, "__init__": 5,
}
# the only modules a function body may import: heavy, optional at run time
LAZY_OK = ("matplotlib", "transformers", "minimoe.bench", "fvcore", "torch.utils.tensorboard")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def _floor(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "minimoe" or len(parts) == 1:
        return None
    return FLOORS.get(parts[1])


def _minimoe_imports(tree):
    """(node, imported module, names) for every `import minimoe...` / `from minimoe... import`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minimoe"):
            yield node, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minimoe"):
                    yield node, alias.name, []


def _is_bench(name: str) -> bool:
    return name.startswith("minimoe.bench")


@pytest.mark.parametrize("name, path, tree", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_run_downward_and_use_no_private_names(name, path, tree):
    if _is_bench(name):
        return  # benchmarks sit beside the library and may use all of it
    own = _floor(name)
    for node, module, names in _minimoe_imports(tree):
        if module == "minimoe":  # `from minimoe import files`: the imported names are modules
            targets = [f"minimoe.{n}" for n in names]
        else:
            targets = [module]
        for target in targets:
            assert not _is_bench(target) or name.startswith("minimoe.cli"), \
                f"{name} imports {target}: the library never imports the benchmarks"
            floor = _floor(target)
            if floor is not None and own is not None and not _is_bench(target):
                assert floor <= own, f"{name} (floor {own}) imports {target} (floor {floor})"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{path.name}:{node.lineno} imports private names {private} of {module}"


@pytest.mark.parametrize("name, path, tree", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_inside_functions_only_for_heavy_optional_dependencies(name, path, tree):
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            else:
                continue
            for module in modules:
                assert module.startswith(LAZY_OK) or _is_bench(name), \
                    f"{path.name}:{node.lineno} imports {module} inside {func.name}()"


def test_no_import_cycle():
    graph = {}
    for name, _, tree in _modules():
        deps = set()
        for _, module, names in _minimoe_imports(tree):
            deps |= {f"minimoe.{n}" for n in names} if module == "minimoe" else {module}
        graph[name] = {d for d in deps if d != name}
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(node):] + [node])}")
        if node in seen or node not in graph:
            return
        stack.append(node)
        for dep in graph[node]:
            visit(dep)
        stack.pop()
        seen.add(node)

    for node in graph:
        visit(node)
