"""The package's layout is its architecture: data flows compiler → ops → kernels (the demo and
the tools on top), no module imports one that imports it back, and no source file outgrows
~400 lines."""

import ast
from pathlib import Path

import slicecompile
from slicecompile import kernels

PACKAGE = Path(slicecompile.__file__).parent
KERNELS = Path(kernels.__file__).parent
# What each layer may import from the package, besides itself and the kernels.
ALLOWED = {
    "kernels": set(),
    "ops": {"kernels"},
    "compiler": {"kernels", "ops"},
    "demo": {"kernels", "ops", "compiler", "tools", ""},
    "tools": {"kernels", "ops", "compiler", ""},
}


def _modules():
    """{module name: path} of every module of the package, kernels included."""
    found = {}
    for root, prefix in ((PACKAGE, "slicecompile"), (KERNELS, "slicecompile.kernels")):
        for path in root.rglob("*.py"):
            parts = [part for part in path.relative_to(root).with_suffix("").parts if part != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


def _imports(name, path, modules):
    """The package's modules that module `name` imports (a name imported from a package counts
    as that package when it is no module of its own)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{source}.{alias.name}"
                imported.add(full if full in modules else source)
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    return {module for module in imported if module in modules and module != name}


def _layer(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its children is how a package is built, not a cycle.
    graph = {name: {dep for dep in deps if not name.startswith(dep + ".")} for name, deps in graph.items()}
    state, cycles = {}, []

    def visit(name, stack):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_data_flows_one_way():
    modules = _modules()
    wrong = [
        f"{name} imports {dep}"
        for name, path in modules.items()
        if _layer(name) in ALLOWED
        for dep in _imports(name, path, modules)
        if _layer(dep) != _layer(name) and _layer(dep) not in ALLOWED[_layer(name)]
    ]
    assert not wrong, wrong


def test_files_stay_small_and_the_top_level_holds_entry_points_only():
    too_long = {str(path): n for path in _modules().values() if (n := len(path.read_text().splitlines())) > 400}
    assert not too_long, too_long
    assert sorted(path.name for path in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]
