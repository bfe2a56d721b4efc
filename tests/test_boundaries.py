"""Architecture rules that keep the two backends honest (DESIGN.md, Boundaries)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKEND_LIBS = {"jax", "jaxlib", "flax", "optax", "orbax", "torch", "accelerate", "diffusers",
                "transformers", "tensorflow"}  # fmt: skip


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("shared"), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shared_never_imports_a_backend(path):
    bad = imported_roots(path) & (BACKEND_LIBS | {"flaxdiff", "torchdiff"})
    assert not bad, f"{path} imports {sorted(bad)}; shared/ must stay backend-neutral"


@pytest.mark.parametrize(
    ("package", "other"), [("flaxdiff", "torchdiff"), ("torchdiff", "flaxdiff")]
)
def test_backends_never_import_each_other(package, other):
    for path in modules(package):
        assert other not in imported_roots(path), f"{path} imports {other}"


def test_importing_all_of_shared_loads_no_backend():
    names = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in modules("shared")
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(set({sorted(BACKEND_LIBS)!r}) & {{m.split('.')[0] for m in sys.modules}})\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing shared loaded: {result.stdout.strip()}"
