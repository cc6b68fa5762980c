"""The package's shape, checked: no import cycle (imports inside functions count), no module over 450
lines, a short loop that names no metric, and task details kept inside the tasks and model families."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lcdistill"
# where a task's own names may stand: the tasks, the model families, and data/ (each task's layouts)
TASK_PLACES = ("tasks/", "models/classifiers.py", "models/segmentation.py", "models/detection.py", "data/")
TASK_WORDS = ("classification", "segmentation", "detection", "top1", "miou", "aux_classifier")


def modules() -> dict[str, Path]:
    return {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f for f in PACKAGE.rglob("*.py")}


def imports(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions; importing a.b.c also
    runs a.b's __init__ (but a module never counts its own packages)."""
    edges = {}
    for name, path in found.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lcdistill"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("lcdistill")}
        parents = {".".join(d.split(".")[:k]) for d in deps for k in range(2, d.count(".") + 1)}
        edges[name] = {d for d in deps | parents if d in found and d != name and not name.startswith(d + ".")}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def code_words(path: Path) -> set[str]:
    """Names and string contents in the code (comments and docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.update(w.strip(".,:;()'\"") for w in node.value.replace("_", " _ ").split())
            words.add(node.value)
    return words


def test_the_package_has_no_import_cycle():
    found = cycles(imports(modules()))
    assert not found, f"import cycles: {found}"


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_the_loop_is_short_and_names_no_metric():
    loop = PACKAGE / "training" / "loop.py"
    assert len(loop.read_text().splitlines()) <= 170
    assert not code_words(loop) & {"top1", "top5", "miou", "map", "pixel_acc"}


def test_task_names_stay_in_the_tasks_and_their_families():
    leaks = {}
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith("cli/") or rel == "options.py" or any(rel.startswith(p) for p in TASK_PLACES):  # the CLI's help texts name the tasks
            continue
        found = code_words(path) & set(TASK_WORDS)
        if found:
            leaks[rel] = sorted(found)
    assert not leaks, leaks


def test_no_ignore_label_outside_the_tasks():
    """255 as an unlabelled-pixel value belongs to the segmentation task; elsewhere only as the pixel scale (x / 255)."""
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if any(rel.startswith(p) for p in TASK_PLACES):
            continue
        tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        lines = [t.line.strip() for t in tokens if t.type == tokenize.NUMBER and t.string == "255"]
        assert all("/ 255" in line or "* 255" in line or "div_(255)" in line or "/255" in line or "255.0" in line
                   or "(255, 255, 255" in line or "0, 255)" in line or "> 255" in line or "255]" in line for line in lines), (rel, lines)


def test_pyproject_ships_every_package():
    """A wheel (non-editable) install holds only the packages pyproject lists: each folder of the package is one."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(f.parent.relative_to(PACKAGE.parent).parts) for f in PACKAGE.rglob("__init__.py")}
    assert folders <= listed, sorted(folders - listed)


def test_the_lipschitz_maths_imports_nothing_above_it():
    """lipschitz/ is maths the london term imports: a command (lipschitz_report.py) lives above the methods, not in it."""
    edges = imports(modules())
    above = {d for name, deps in edges.items() if name.startswith("lcdistill.lipschitz.") or name == "lcdistill.lipschitz"
             for d in deps if not d.startswith("lcdistill.lipschitz")}
    assert above <= {"lcdistill.errors"}, above


def test_the_package_face_imports_only_the_error_type():
    """`import lcdistill` stays fast: its public names load on first use (module __getattr__), not at import."""
    assert imports(modules())["lcdistill"] <= {"lcdistill.errors"}
