"""Layers import only downward (DESIGN §3): data -> lora -> router -> fusion -> pipeline -> evaluate -> front-ends."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dlp_lora"

# rank of each top-level module/package; a module may import only modules of lower or equal-shared rank below it
RANK = {
    "config": 0, "models": 1, "data": 2, "tasks": 3, "lora": 4, "router": 5, "fusion": 6, "pipeline": 7,
    "evaluate": 8, "bench": 9, "demo": 10, "proxy": 10, "ui": 11, "server": 11, "cli": 12, "__main__": 13,
    "__init__": -1,
}
# cli is the front door: it dispatches to the ui and server front-ends, which never import each other.


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    unit = _unit(path)
    pkg_parts = path.relative_to(PKG).parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("dlp_lora."):
                    found.add(node.module.split(".")[1])
                continue
            base = list(pkg_parts)[: len(pkg_parts) - (node.level - 1)] if node.level > 1 else list(pkg_parts)
            target = base + (node.module.split(".") if node.module else [])
            if target:
                found.add(target[0].removesuffix(".py"))
            else:  # "from . import x"
                found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dlp_lora."):
                    found.add(a.name.split(".")[1])
    found.discard(unit)
    return found


def test_every_module_has_a_rank():
    units = {_unit(p) for p in PKG.rglob("*.py")}
    assert units <= set(RANK), f"add new modules to RANK: {sorted(units - set(RANK))}"


def test_layers_import_only_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        unit = _unit(path)
        for imp in _imports(path):
            if imp == "__init__" or imp not in RANK:
                continue
            if RANK[imp] >= RANK[unit] and unit != "__main__":
                bad.append(f"{path.relative_to(PKG)} imports {imp}")
    assert not bad, bad


def test_front_end_dependencies_stay_inside_their_module():
    for path in PKG.rglob("*.py"):
        if _unit(path) in ("ui",):
            continue
        src = path.read_text()
        assert "import gradio" not in src, path
    for path in PKG.rglob("*.py"):
        if _unit(path) in ("server", "proxy"):
            continue
        src = path.read_text()
        assert "import fastapi" not in src and "from fastapi" not in src, path
