"""The package's structure: no import circle between its modules, and no public name hidden by a module of
the same name (the stages live in ``pipeline.stages``)."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline

ROOT = Path(pipeline.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports, at the top or inside a function (a lazy import is an arrow
    too), except under ``if TYPE_CHECKING:`` in the package's face."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_module_imports_itself_back():
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph = {name: _imports(path, name, modules) for name, path in files.items() if name != "pipeline"}
    # a registry's modules take its base class from their package, which imports them to register them
    # (kinds, sources, model_sources): that arrow up to their own package is the registry, not a circle
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_export_shares_a_name_with_a_module():
    submodules = {m.name for m in pkgutil.iter_modules(pipeline.__path__)}
    assert not submodules & set(pipeline.__all__)


def test_a_stage_is_its_function_after_its_module_was_imported():
    code = ("from pipeline.stages.fit import FitConfig\nfrom pipeline.stages.serve import create_app\n"
            "from pipeline import fit, serve, predict\nimport pipeline.stages.predict\n"
            "print(fit.__module__, serve.__module__, pipeline.predict.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["pipeline.stages.fit", "pipeline.stages.serve", "pipeline.stages.predict"]
