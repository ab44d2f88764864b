"""The engine is the layer the methods stand on: no module under ``optlayers/engine`` imports a
method built on it (``optlayers.qp``, ``optlayers.cone``), the experiments or the OptNet
layers. Read from each module's imports (``ast``: those inside functions too), not by importing it."""
import ast
from pathlib import Path

import pytest

import optlayers

PACKAGE = Path(optlayers.__file__).resolve().parent
ENGINE = PACKAGE / "engine"
ABOVE_THE_ENGINE = ("optlayers.qp", "optlayers.cone", "optlayers.experiments", "optlayers.layers")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, module) for each module that ``path`` (the module ``module``) imports; ``from P import
    name`` counts as both P and P.name (the name may be a module), relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _above(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in ABOVE_THE_ENGINE)


def test_the_import_reader_sees_every_form_of_import(tmp_path):
    (tmp_path / "probe.py").write_text(
        "import optlayers.qp.ipm\nfrom optlayers import layers\nfrom optlayers.experiments.common import x\n"
        "def f():\n    from optlayers.qp import fused\nfrom ..qp.ipm import step\nfrom . import kkt\n"
        "from ..cone import psd\n")
    modules = [module for _, module in _imported(tmp_path / "probe.py", "optlayers.engine.probe")]
    assert sorted(module for module in modules if _above(module)) == [
        "optlayers.cone", "optlayers.cone.psd", "optlayers.experiments.common", "optlayers.experiments.common.x",
        "optlayers.layers", "optlayers.qp", "optlayers.qp.fused", "optlayers.qp.ipm", "optlayers.qp.ipm",
        "optlayers.qp.ipm.step"]
    assert "optlayers.engine.kkt" in modules


@pytest.mark.parametrize("path", sorted(ENGINE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_engine_module_imports_a_layer_above_it(path):
    above = [(line, module) for line, module in _imported(path, _module_name(path)) if _above(module)]
    wrong = [f"line {line}: {module}" for line, module in above  # a name imported from a module named already: once
             if not any(other == line and module.startswith(base + ".") for other, base in above)]
    assert not wrong, f"{_module_name(path)} imports from above the engine ({', '.join(ABOVE_THE_ENGINE)}): " + "; ".join(wrong)
