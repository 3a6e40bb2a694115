"""The shape of the code: layers import downwards only, no import cycles, a Lightning-free core, short files,
explicit exports. The import graph counts every import statement: at module level, inside functions and
under ``if TYPE_CHECKING:``."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("checkpoints_dataset", "gpt_params")
# lowest first; a module may import its own layer or lower ones
LAYERS = ("checkpoints_dataset", "gpt_params.core", "gpt_params.evaluation", "gpt_params.training", "gpt_params.cli")


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _targets(mod: str, is_pkg: bool, node: ast.Import | ast.ImportFrom, mods) -> list[str]:
    """The project modules one import statement loads (the deepest known module of each name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != mod:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[mod].update(_targets(mod, is_pkg, node, mods))
    return graph


def _layer(mod: str) -> int:
    if mod in ("gpt_params", "gpt_params.__main__"):
        return len(LAYERS)       # the package's front door re-exports every layer
    return max(i for i, prefix in enumerate(LAYERS) if mod == prefix or mod.startswith(prefix + "."))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_down_the_layers():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, "upward imports: " + ", ".join(sorted(upward))


def test_imports_inside_functions_are_counted(tmp_path):
    """The graph sees an import hidden in a function and one under TYPE_CHECKING (the ways cycles hide)."""
    mod = tmp_path / "m.py"
    mod.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\ndef f():\n    import b\n")
    nodes = [n for n in ast.walk(ast.parse(mod.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
    mods = {"a": None, "b": None, "m": None}
    assert sorted(t for n in nodes for t in _targets("m", False, n, mods)) == ["a", "b"]


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_only_where_it_belongs(package):
    """checkpoints_dataset never imports gpt_params, and only its recorder imports Lightning; nothing imports the
    ``lightning`` package (we use ``pytorch_lightning``); the core and evaluation import no Lightning at all."""
    for path in (ROOT / package).rglob("*.py"):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found = {a.name if isinstance(n, ast.Import) else n.module or "" for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, (ast.Import, ast.ImportFrom)) and not getattr(n, "level", 0) for a in n.names}
        roots = {name.split(".")[0] for name in found}
        assert "lightning" not in roots, f"{mod}: use pytorch_lightning, never lightning"
        if package == "checkpoints_dataset":
            assert "gpt_params" not in roots, f"{mod} imports gpt_params"
        if "pytorch_lightning" in roots:
            assert mod == "checkpoints_dataset.recorder" or _layer(mod) >= LAYERS.index("gpt_params.training"), mod


def test_no_file_is_over_400_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long


@pytest.mark.parametrize("package", ["checkpoints_dataset", "checkpoints_dataset.tasks", "gpt_params",
                                     "gpt_params.core", "gpt_params.evaluation", "gpt_params.training",
                                     "gpt_params.cli"])
def test_packages_export_their_public_names_explicitly(package):
    module = importlib.import_module(package)
    assert module.__all__, f"{package} has no __all__"
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"


BLOCK_LIGHTNING = textwrap.dedent("""
    import sys
    from importlib.abc import MetaPathFinder

    class Block(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pytorch_lightning", "lightning", "lightning_fabric"):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
""")


def _run_without_lightning(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_LIGHTNING + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_a_trained_checkpoint_loads_and_generates_without_lightning(tiny_generator_ckpt):
    done = _run_without_lightning(f"""
        import torch
        import checkpoints_dataset, gpt_params.evaluation
        from gpt_params import Generator
        gen = Generator.load({str(tiny_generator_ckpt)!r})
        task = gen.make_task()
        start = task.init_params(3, torch.Generator().manual_seed(0))
        out = gen.generate(start, task.evaluate(start)[gen.metric], [0.1, 0.2, 0.3], steps=2)
        assert out.shape == start.shape and torch.isfinite(out).all()
        assert not any(m.split(".")[0] in ("pytorch_lightning", "lightning") for m in sys.modules)
        print("generated", tuple(out.shape))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generated (3," in done.stdout


def test_blocking_lightning_does_block_it():
    done = _run_without_lightning("import pytorch_lightning")
    assert done.returncode != 0 and "blocked: pytorch_lightning" in done.stderr
