"""Imports point down the layers (shared/STYLE.md): cli -> export, bench -> passes, heal,
parallel, advise -> frontend, backends -> the shared ground (verify, calibration, artifact, ...)
-> errors. A module importing from a higher layer is a concept living in the wrong room."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slimgraph"
LAYERS = [
    {"errors"},
    {"bits", "progress", "tags", "tolerance", "timing", "artifact", "calibration", "codegen",
     "verify", "model_stats", "report_md"},
    {"frontend", "backends"},
    {"passes", "heal", "parallel", "advise"},
    {"export", "bench"},
    {"cli", "__main__", "__init__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimgraph."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("slimgraph.")}
    return found


def upward_imports() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _top(path)
        for target in _imports(path):
            if target != source and LEVEL.get(target, -1) > LEVEL.get(source, len(LAYERS)):
                found.setdefault((source, target), []).append(str(path.relative_to(PACKAGE)))
    return found


def test_every_top_level_module_has_a_layer() -> None:
    names = {_top(p) for p in PACKAGE.rglob("*.py")}
    assert not names - set(LEVEL), f"give these a layer: {sorted(names - set(LEVEL))}"


def test_imports_point_down() -> None:
    found = upward_imports()
    assert not found, f"imports that point up a layer: {found}"


def test_the_check_sees_an_upward_import(tmp_path: Path, monkeypatch) -> None:
    """verify taking Tolerance from passes (as it once did) is reported."""
    (tmp_path / "verify.py").write_text("from slimgraph.passes.report import PassReport\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path)
    assert upward_imports() == {("verify", "passes"): ["verify.py"]}
