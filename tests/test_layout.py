"""The house rules of docs/architecture.md, checked on the source: command modules never import
each other, stages import only downwards, and the store and the students never import the app."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The modules behind the commands (cli.py and demo.py are the layer that strings them together).
COMMANDS = {"distill_app.harvest.engine", "distill_app.training.trainer", "distill_app.deploy.evaluate",
            "distill_app.deploy.export", "distill_app.deploy.prune", "distill_app.deploy.predict",
            "distill_app.deploy.compress",
            "distill_app.teachers.serve"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved; ``from X
    import y`` counts as X and X.y, since y may be a module)."""
    module = _module(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}
    return found


def _sources(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", _sources("distill_app"), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_command_module_imports_another(path):
    if _module(path) in COMMANDS:
        assert not (_imports(path) & (COMMANDS - {_module(path)})), "import the shared piece from its stage"


@pytest.mark.parametrize("path", _sources("cache", "students"), ids=lambda p: str(p.relative_to(ROOT)))
def test_lower_layers_never_import_the_app(path):
    imported = _imports(path)
    assert not any(name.split(".")[0] == "distill_app" for name in imported)
    if path.parts[-2] == "cache":
        assert not any(name.split(".")[0] in ("torch", "torchvision", "timm") for name in imported)


def test_every_module_says_what_it_is_for_and_stays_small():
    for path in _sources("distill_app", "cache", "students"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no docstring"
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 600, f"{path.relative_to(ROOT)} is over 600 lines"
