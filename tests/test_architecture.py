"""The package's import rules, read from the code's own imports (an ast scan: nothing is imported).

Stages import one way, data -> training -> perf -> inference -> evaluation -> run (the trainer's command
line, which hands the loop its end-of-training export); `distributed` and `launch` sit below the stages;
the leaves (the model, the pure metrics, the errors and the command lines' error path, the model folder,
the allocator)
import only leaves and may be imported from anywhere. No module cycle, and sub-package `__init__.py` files
stay empty, so importing a sub-package never loads TensorFlow before the rank's threads are set.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "unet"

# the lower the number, the more of the package may import it
LEAVES = {"unet.model", "unet.metrics", "unet.errors", "unet.cli", "unet.modelfolder", "unet.malloc"}
LAYERS = {"distributed": 1, "launch": 1, "data": 2, "training": 3, "perf": 4, "inference": 5, "evaluation": 6, "run": 7}


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(path):
    """Every `unet...` module the file imports, at module level or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    known = dict(modules())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from unet.x import y` names module unet.x.y when that is a module, else unet.x
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "unet" or n.startswith("unet."))
    return found


def place(module):
    """(layer, package) of a module; leaves are layer 0."""
    if module in LEAVES:
        return 0, "leaf"
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None, None
    return LAYERS[parts[1]], parts[1]


def graph():
    return {name: imports(path) for name, path in modules()}


def test_every_module_has_a_place():
    homeless = [m for m, _ in modules() if m != "unet" and place(m)[0] is None]
    assert not homeless, f"modules outside the declared packages and leaves: {homeless}"


def test_imports_go_one_way():
    wrong = []
    for src, targets in graph().items():
        if src == "unet":
            continue
        s_layer, s_pkg = place(src)
        for dst in targets:
            d_layer, d_pkg = place(dst)
            if d_layer is None:
                wrong.append(f"{src} -> {dst} (not a module of the package)")
            elif d_pkg == "leaf":
                continue                      # leaves from anywhere
            elif s_pkg == "leaf":
                wrong.append(f"{src} -> {dst} (a leaf imports only leaves)")
            elif d_pkg != s_pkg and d_layer >= s_layer:
                wrong.append(f"{src} -> {dst} ({s_pkg} may not import {d_pkg})")
    assert not wrong, "imports against the grain:\n" + "\n".join(wrong)


def test_no_import_cycle():
    g = graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if n not in g:
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_subpackage_inits_are_empty():
    """A docstring at most: no import, no code."""
    def code(path):
        body = ast.parse(path.read_text()).body
        return body[1:] if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            else body
    full = [str(p.relative_to(PKG.parent)) for p in PKG.rglob("__init__.py") if p.parent != PKG and code(p)]
    assert not full, f"sub-package __init__.py files hold code: {full}"


def test_the_scan_sees_a_backward_edge(tmp_path):
    """The rule test itself: a data module importing the trainer is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from unet.training.config import parse_args\n")
    assert "unet.training.config" in imports(bad)
    assert place("unet.training.config")[0] > place("unet.data.sources")[0]


@pytest.mark.parametrize("pkg", sorted(LAYERS))
def test_importing_a_subpackage_loads_no_tensorflow(pkg):
    code = f"import sys, unet.{pkg}; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout.split()
    assert out == ["False", "False"]
