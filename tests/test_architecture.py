"""The package's layering, read from its imports with `ast` (function-local imports count: a
late import is still a dependency). Each rule names what a layer may not import and why, so
the next change that breaks one is told here, not by an import cycle at run time."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_vl"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, path: pathlib.Path, node: ast.AST, modules) -> set:
    """The modules of ours an import statement loads (the longest name that is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" for a in node.names]
    out = set()
    for name in names:
        if not name.startswith("megatron_vl"):
            continue
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            out.add(name)
    return out


def import_graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _resolve(name, path, node, modules)
        graph[name] = edges
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def _in(module: str, layer: str) -> bool:
    full = f"megatron_vl.{layer}"
    return module == full or module.startswith(full + ".")


# layer -> (layers it must not import, why)
FORBIDDEN = {
    "model": (("training", "convert", "data", "eval", "inference", "stage1", "checkpoint", "plan"),
              "model files hold architecture only; parallelism, training and formats are applied from outside"),
    "parallel": (("model", "data", "config", "training", "convert", "eval", "inference", "stage1"),
                 "parallel layers and groups know tensors and process groups, not models or settings"),
    "ops": (("*",), "kernels import nothing of ours"),
    "data": (("training", "model", "eval", "inference", "convert", "checkpoint", "stage1"),
             "data preparation runs without a model (tools/preprocess_data.py on a CPU box)"),
    "convert": (("training",), "conversion reads checkpoints offline; it never builds a training run"),
    "checkpoint": (("training", "convert", "eval", "inference", "stage1", "data"),
                   "the on-disk formats and nothing else: training/ and convert/ import it"),
    "inference": (("training", "stage1"), "generation runs on an export, without the training stack"),
    "plan": (("training",), "the planner is arithmetic; measuring a run lives in testing/"),
    "eval": (("training",), "the in-training evaluator is handed the engine; it does not import training"),
}


def test_no_import_cycle():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer):
    forbidden, why = FORBIDDEN[layer]
    bad = []
    for module, edges in sorted(import_graph().items()):
        if not _in(module, layer):
            continue
        for target in sorted(edges):
            if _in(target, layer):
                continue
            if "*" in forbidden or any(_in(target, f) for f in forbidden):
                bad.append(f"{module} imports {target}")
    assert not bad, f"{layer}/: {why}:\n  " + "\n  ".join(bad)


def test_config_is_a_leaf():
    """config is read by every layer, so it imports nothing of ours but the two leaves it
    writes and raises with (atomic for saving YAML, errors for ConfigError)."""
    allowed = {"megatron_vl.atomic", "megatron_vl.errors"}
    graph = import_graph()
    bad = sorted(f"{m} imports {t}" for m, edges in graph.items() if _in(m, "config")
                 for t in edges if not _in(t, "config") and t not in allowed)
    assert not bad, "\n".join(bad)
    assert graph["megatron_vl.errors"] == set() and graph["megatron_vl.atomic"] <= {"megatron_vl.errors"}


def test_rules_see_real_edges():
    """The graph reader itself: known edges are found, relative and absolute, module-level and
    function-local — so the rules above cannot pass by reading nothing."""
    graph = import_graph()
    assert "megatron_vl.checkpoint.layout" in graph["megatron_vl.training.build"]
    assert "megatron_vl.model.llama" in graph["megatron_vl.model.vlgpt"]
    assert "megatron_vl.inference.diffusion_decoder" in graph["megatron_vl.inference.generation"]   # lazy import
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_one_subprocess_runner():
    """Tests and benchmarks start processes through megatron_vl.testing.processes, which kills a
    timed-out child with its whole process tree; a bare subprocess call would leave torchrun or
    deepspeed grandchildren running past a test's timeout."""
    runner = PACKAGE / "testing" / "processes.py"
    offenders = []
    for path in sorted(ROOT.glob("tests/*.py")) + sorted(ROOT.glob("benchmarks/*.py")) + sorted(PACKAGE.rglob("testing/*.py")):
        if path in (runner, pathlib.Path(__file__).resolve(), ROOT / "tests" / "test_processes.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            if "subprocess" in names:
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, "subprocess imported in " + ", ".join(sorted(set(offenders)))


def test_scripts_import_the_installed_package():
    """The package is installed (pip install -e .): no script puts the checkout on sys.path,
    which would shadow the installed copy with whichever checkout the script sits in."""
    offenders = []
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("tools/*.py")) + sorted(ROOT.glob("benchmarks/*.py")) \
            + sorted(ROOT.glob("tests/*.py")) + sorted(PACKAGE.rglob("*.py")):
        if path.name == "setup.py" or path == pathlib.Path(__file__).resolve():
            continue
        if "sys.path.insert" in path.read_text():
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, "sys.path.insert in " + ", ".join(offenders)
