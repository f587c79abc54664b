"""The package's layers: each imports only the layers below it, and old module paths still work (warned)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import celery_services
from celery_services._moved import MOVED

PACKAGE = Path(celery_services.__file__).parent

#: What each layer may import at run time (``if TYPE_CHECKING:`` blocks aside).
ALLOWED = {
    "core": {"core"},
    "distribution": {"core", "distribution"},
    "http": {"core", "distribution", "http"},
    "testing": {"core", "distribution", "testing"},
    "cli": {"core", "distribution", "http", "testing", "cli"},
}


def _layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "celery_services" and parts[1] in ALLOWED else None


def _runtime_imports(path: Path, module: str) -> list[tuple[int, str]]:
    """Absolute names of the ``celery_services`` modules ``path`` imports outside ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name if _layer_of(name) else target) for name in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("celery_services")]


def _modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append((path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)))
    return out


def test_lower_layers_never_import_higher_ones() -> None:
    violations = []
    for path, module in _modules():
        layer = _layer_of(module)
        if layer is None:
            continue
        for line, name in _runtime_imports(path, module):
            target = _layer_of(name)
            if target is not None and target not in ALLOWED[layer]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({layer}) imports {name}")
    assert violations == []


def test_the_check_sees_a_violation() -> None:
    # The walker itself: a core module importing the distribution is reported.
    sample = PACKAGE / "core" / "app.py"
    imports = dict((name, line) for line, name in _runtime_imports(sample, "celery_services.core.app"))
    assert "celery_services.core.errors.Conflict" in imports or "celery_services.core.errors" in imports
    assert not any(_layer_of(name) == "distribution" for name in imports)  # its TYPE_CHECKING import aside


def test_old_module_paths_still_import_with_a_warning() -> None:
    # In a fresh interpreter: here the modules are already imported under their new names.
    code = """
import importlib, json, sys, warnings
from celery_services._moved import MOVED
out = {}
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    warned = [str(w.message) for w in caught if w.category is DeprecationWarning]
    out[old] = [module is importlib.import_module(new), warned]
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert sorted(results) == sorted(MOVED)
    for old, (same, warned) in results.items():
        assert same, old
        assert any(message.startswith(f"{old} moved to {MOVED[old]}") for message in warned), (old, warned)


def test_public_api_is_unchanged() -> None:
    from celery_services import App, MemoryService, distribute, finalize  # noqa: F401
    from celery_services.cli import main  # noqa: F401
    from celery_services.http import asgi_app  # noqa: F401
    from celery_services.testing import WorkerProcess, wait_for  # noqa: F401

    assert (
        importlib.import_module("celery_services.distribution").Distribution is celery_services.Distribution
    )


def test_long_modules_say_why_they_are_one_piece() -> None:
    # Past ~300 lines a module is probably two concepts: the ones that are not say why in their docstring.
    unexplained = []
    for path, _module in _modules():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > 300 and "One piece" not in doc:
            unexplained.append(str(path.relative_to(PACKAGE.parent)))
    assert unexplained == []
