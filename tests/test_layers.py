"""Imports point down only: checkpoints_dataset -> gpt_params core -> Lightning layer -> cli (checked with ast)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"tokenizer", "dit", "diffusion", "autoencoder"}          # gpt_params modules without Lightning


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:     # relative: resolve inside the package
            package = path.parent.relative_to(ROOT).parts
            base = ".".join(package[: len(package) - node.level + 1])
            names.add(f"{base}.{node.module}" if node.module else base)
    return names


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", files("checkpoints_dataset"), ids=lambda p: str(p.relative_to(ROOT)))
def test_checkpoints_dataset_stands_alone(path):
    found = imports(path)
    assert not any(n == "gpt_params" or n.startswith("gpt_params.") for n in found)
    assert not any(n.split(".")[0] == "lightning" for n in found), "use pytorch_lightning, never lightning"
    if path.name != "recorder.py":
        assert not any(n.split(".")[0] == "pytorch_lightning" for n in found), "only the recorder imports Lightning"


@pytest.mark.parametrize("path", files("gpt_params"), ids=lambda p: str(p.relative_to(ROOT)))
def test_gpt_params_imports_point_down(path):
    found = imports(path)
    own = {n.split(".")[1] for n in found if n.startswith("gpt_params.")}
    assert not any(n.split(".")[0] == "lightning" for n in found), "use pytorch_lightning, never lightning"
    if path.stem in CORE:
        assert not any(n.split(".")[0] == "pytorch_lightning" for n in found)
        assert own <= CORE, f"core module imports the Lightning layer: {own - CORE}"
    elif path.stem not in ("cli", "__main__"):
        assert "cli" not in own, "only the entry points import the CLI"


def test_core_imports_without_lightning():
    import subprocess
    import sys

    code = ("import sys, gpt_params.core.tokenizer, gpt_params.core.dit, gpt_params.core.diffusion, checkpoints_dataset; "
            "assert 'pytorch_lightning' not in sys.modules, 'Lightning was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
