"""Layers import only downward (DESIGN §3): data -> lora -> router -> fusion -> pipeline -> evaluate -> front-ends,
and inference code never imports training code."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dlp_lora"

# rank of each top-level module/package; a module may import only modules of lower or equal-shared rank below it
RANK = {
    "config": 0, "selection": 1, "models": 1, "data": 2, "tasks": 3, "run": 3, "lora": 4, "router": 5,
    "fusion": 6, "pipeline": 7, "metrics": 8, "composite": 9, "evaluate": 10, "bench": 11, "demo": 12,
    "serve": 13, "ui": 13, "cli": 14, "__main__": 15, "__init__": -1,
}
# Inference modules (what generate, the server and the playground run) and the training modules they must not
# import, as dotted module names below dlp_lora. A trained artifact is read through run.py / router.inference.
INFERENCE = ("run", "fusion", "pipeline", "selection", "router.inference", "router.select", "router.mlp",
             "router.hf", "serve", "ui.playground", "ui.routing_view", "ui.common", "ui.jobs", "ui.hosts")
TRAINING = ("lora", "router.train", "router.data")
# cli is the front door: it dispatches to the ui and server front-ends, which never import each other.


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")


def _dotted_imports(path: Path) -> set[str]:
    """Every dlp_lora module a file imports, as a dotted name below dlp_lora (``from .x import y`` also counts
    ``x.y``, which may be a submodule)."""
    tree = ast.parse(path.read_text())
    pkg_parts = list(path.relative_to(PKG).parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("dlp_lora."):
                    continue
                mod = node.module.split(".")[1:]
            else:
                mod = pkg_parts[: len(pkg_parts) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            found.add(".".join(mod))
            found.update(".".join(mod + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("dlp_lora."))
    return {f for f in found if f}


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
        if _unit(path) in ("serve",):
            continue
        src = path.read_text()
        assert "import fastapi" not in src and "from fastapi" not in src, path


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_inference_never_imports_training():
    bad = []
    for path in PKG.rglob("*.py"):
        mod = _module(path)
        if not _in(mod, INFERENCE):
            continue
        bad += [f"{mod} imports {imp}" for imp in _dotted_imports(path) if _in(imp, TRAINING)]
    assert not bad, bad


def test_selection_choices_live_in_one_place():
    """The selection options' choices are spelled out only in selection.py; everything else imports them."""
    spelled = []
    for path in PKG.rglob("*.py"):
        if _module(path) == "selection":
            continue
        src = path.read_text()
        for needle in ('("paper", "renorm")', "('paper', 'renorm')", '("prompt", "sentence", "segment")', '"paper|renorm"'):
            if needle in src:
                spelled.append(f"{path.relative_to(PKG)}: {needle}")
    assert not spelled, spelled


def test_public_api_imports():
    from dlp_lora import DLPPipeline, Router, SelectionConfig, fuse_adapters, open_run, select_top_p, train_adapter

    assert all(callable(x) for x in (DLPPipeline, Router, SelectionConfig, fuse_adapters, open_run, select_top_p,
                                     train_adapter))
