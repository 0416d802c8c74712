"""The package's shape, read from its own import statements (ast): no cycles, dependencies point one way.

    cli -> commands (trainer, sft, gym, lab, reward_models) -> run -> core

core/ is pure tensors (it imports nothing of ours outside core/), run/ is the shell every command shares
(it never imports a command), reward_models/ never reaches into the trainer, and no module outgrows one
reader's sitting (~400 lines). (Imports inside a module-level ``__getattr__``, a lazy re-export, would not
be counted as edges; there are none today.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf_pg", "reward_models")
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``name`` imports (module level and inside functions, but not in ``__getattr__``)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skipped = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef) and fn.name == "__getattr__"
               for node in ast.walk(fn)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    # `from .x import y` lists both x.y (not a module: dropped above by walking up to x) and x
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_the_import_graph_has_no_cycle(graph):
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                cycle = stack[stack.index(child):] + [child]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if child not in state:
                visit(child)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_core_is_pure_and_run_imports_no_command(graph):
    for name, imports in graph.items():
        if name.startswith("rlhf_pg.core"):
            outside = sorted(i for i in imports if not i.startswith("rlhf_pg.core"))
            assert not outside, f"{name} (pure tensors) imports {outside}"
        if name.startswith("rlhf_pg.run"):
            allowed = ("rlhf_pg.run", "rlhf_pg.core", "rlhf_pg.config", "rlhf_pg.errors")
            outside = sorted(i for i in imports if not i.startswith(allowed))
            assert not outside, f"{name} (the run shell) imports {outside}"


def test_reward_models_never_reach_into_the_trainer_or_the_commands(graph):
    commands = ("rlhf_pg.trainer", "rlhf_pg.lm_run", "rlhf_pg.sft", "rlhf_pg.cli", "rlhf_pg.lab", "rlhf_pg.gym")
    for name, imports in graph.items():
        if name.startswith("reward_models"):
            reached = sorted(i for i in imports if i.startswith(commands))
            assert not reached, f"{name} imports {reached}"


def test_only_the_cli_imports_the_cli_and_the_lab_is_imported_by_no_library_module(graph):
    for name, imports in graph.items():
        if name != "rlhf_pg.__main__":
            assert "rlhf_pg.cli" not in imports, name
        if not name.startswith(("rlhf_pg.lab", "rlhf_pg.cli")):
            assert not any(i.startswith("rlhf_pg.lab") for i in imports), name


@pytest.mark.parametrize("name,path", sorted(_modules().items()))
def test_no_module_outgrows_one_sitting(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it by idea"


def test_the_graph_reader_sees_real_edges(graph):
    """The checks above are only worth something if the reader finds the imports that are there."""
    assert "rlhf_pg.core.estimator" in graph["rlhf_pg.trainer"]
    assert "rlhf_pg.run.loop" in graph["reward_models.bradley_terry"]
    assert "rlhf_pg.run.checkpoint" in graph["rlhf_pg.run.loop"]  # `from . import checkpoint as ckpt`
    assert graph["rlhf_pg.config"] == {"rlhf_pg.errors"}  # the engine knows no schema


def test_moved_modules_stay_importable_from_their_old_paths():
    import rlhf_pg.advantages as old_advantages
    import rlhf_pg.kl_control as old_kl
    import rlhf_pg.losses as old_losses
    import rlhf_pg.mdp as old_mdp
    from rlhf_pg.core import advantages, kl_control, losses, mdp

    for old, new in ((old_advantages, advantages), (old_losses, losses), (old_mdp, mdp), (old_kl, kl_control)):
        public = [n for n in dir(new) if not n.startswith("_") and getattr(getattr(new, n), "__module__", None) == new.__name__]
        assert public, new.__name__
        for attribute in public:
            assert getattr(old, attribute) is getattr(new, attribute), f"{old.__name__}.{attribute}"
    assert old_advantages.BASELINES is advantages.BASELINES and old_losses.AGGREGATIONS is losses.AGGREGATIONS
    import reward_models

    assert callable(reward_models.register_reward)
