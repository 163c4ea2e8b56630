"""The import rule, read from the source with `ast`: the stages import one way
(core <- io <- {training, prediction} <- analysis; models for training and prediction; the
CPU kernels only through the model factory), no circle among the package's modules
(counting imports inside functions too), the library never imports the prep stage, the
model knows no CPU kernel, and a module imports another of the package inside a function
only where that one is an optional heavy dependency (the CPU kernels)."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (importing module, imported module prefix): imports allowed inside a function only.
OPTIONAL = {("iap_jax.models.factory", "iap_jax.kernels")}
# stage -> the stages it may import besides itself (the README's import rule).
MAY_IMPORT = {
    "core": set(),
    "io": {"core"},
    "kernels": set(),
    "models": {"core", "kernels"},
    "training": {"core", "io", "models"},
    "prediction": {"core", "io", "models"},
    "analysis": {"core", "io", "models", "prediction"},
}


def _modules(package: str) -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(os.path.join(REPO, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(module: str, path: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every import statement of the file."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, local) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.append((base, local))
                found.extend((f"{base}.{alias.name}", local) for alias in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def _graph():
    modules = _modules("iap_jax")
    graph = {m: set() for m in modules}
    local = []
    for module, path in modules.items():
        for target, inside in _imports(module, path):
            if target in modules and target != module:
                graph[module].add(target)
                if inside:
                    local.append((module, target))
    return modules, graph, local


def _cycle(graph) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_circle_among_the_modules():
    _, graph, _ = _graph()
    assert _cycle(graph) is None


def test_the_rule_finds_a_circle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["iap_jax"])
def test_the_library_never_imports_the_prep_stage(package):
    for module, path in _modules(package).items():
        assert not [t for t, _ in _imports(module, path) if t.split(".")[0] == "data_prep"], module


def test_the_model_imports_no_kernel():
    path = os.path.join(REPO, "iap_jax", "models", "resnet.py")
    imported = [t for t, _ in _imports("iap_jax.models.resnet", path)]
    assert imported and not [t for t in imported if t.startswith("iap_jax.kernels")]


def test_imports_inside_functions_only_for_optional_heavy_dependencies():
    _, _, local = _graph()
    unexpected = [(m, t) for m, t in local
                  if not any(m == a and t.startswith(b) for a, b in OPTIONAL)]
    assert unexpected == []


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else None


def _violations(graph) -> list[tuple[str, str]]:
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if _stage(m) and _stage(t) and _stage(t) != _stage(m)
                  and _stage(t) not in MAY_IMPORT[_stage(m)])


def test_every_module_lives_in_a_stage():
    modules, _, _ = _graph()
    assert sorted(m for m in modules if m != "iap_jax" and _stage(m) not in MAY_IMPORT) == []


def test_the_stages_import_one_way():
    _, graph, _ = _graph()
    assert _violations(graph) == []


def test_the_rule_finds_an_import_against_the_stages():
    graph = {"iap_jax.io.dicom": {"iap_jax.training.train", "iap_jax.core.iaps"},
             "iap_jax.training.train": {"iap_jax.prediction.engine"},
             "iap_jax.core.iaps": set()}
    assert _violations(graph) == [("iap_jax.io.dicom", "iap_jax.training.train"),
                                  ("iap_jax.training.train", "iap_jax.prediction.engine")]
