"""The package's shape, read from its own import statements (ast): no cycles, dependencies point one way.

    cli -> commands (trainer, sft, gym, lab, doctor, reward-model) -> lm_run -> reward_models scoring, policy
        -> run -> core

core/ is pure tensors (it imports nothing of ours outside core/), run/ is the shell every command shares
(it never imports a command), reward_models/ uses only rlhf_pg's lower layers and only rlhf_pg's upper layers
use it, one module chooses the sampling engine, and no module outgrows one reader's sitting (~400 lines).
(Imports inside a module-level ``__getattr__``, a lazy re-export, or under ``if TYPE_CHECKING:``, type hints
only, are not counted as edges.)
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
    skipped |= {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and isinstance(block.test, ast.Name)
                and block.test.id == "TYPE_CHECKING" for node in ast.walk(block)}
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


# reward_models may use these layers of rlhf_pg; only the upper layers below may use reward_models
REWARD_MODELS_MAY_USE = ("rlhf_pg.core", "rlhf_pg.run", "rlhf_pg.config", "rlhf_pg.errors", "rlhf_pg.models",
                         "rlhf_pg.chat", "rlhf_pg.policy", "rlhf_pg.tasks", "rlhf_pg.data")
UPPER_LAYERS = ("rlhf_pg.lm_run", "rlhf_pg.trainer", "rlhf_pg.sft", "rlhf_pg.sampling", "rlhf_pg.evaluation",
                "rlhf_pg.cli", "rlhf_pg.doctor", "rlhf_pg.lab", "rlhf_pg.api")


def test_reward_models_use_only_rlhf_pgs_lower_layers(graph):
    for name, imports in graph.items():
        if name.startswith("reward_models"):
            reached = sorted(i for i in imports if i.startswith("rlhf_pg.") and not i.startswith(REWARD_MODELS_MAY_USE))
            assert not reached, f"{name} imports {reached}"


def test_only_rlhf_pgs_upper_layers_use_reward_models(graph):
    for name, imports in graph.items():
        if name.startswith("rlhf_pg") and any(i.startswith("reward_models") for i in imports):
            assert name.startswith(UPPER_LAYERS), f"{name} imports reward_models (only {UPPER_LAYERS} may)"


def test_make_sampler_is_the_one_place_an_engine_is_chosen():
    """No library module names an engine class: they all get their sampler from ``policy.sampler.make_sampler``."""
    engines = {"BuiltinSampler", "EpisodeSampler", "VLLMSampler"}
    for name, path in _modules().items():
        if name == "rlhf_pg.policy.sampler":
            continue
        tree = ast.parse(path.read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not (used & engines) - defined, f"{name} names {sorted((used & engines) - defined)}: use make_sampler"


def test_every_registered_engine_is_a_sampler():
    import importlib.util

    from rlhf_pg.policy.sampler import ENGINES, Sampler, engine_class

    members = [name for name in vars(Sampler) if not name.startswith("_")]
    assert {"engine", "sample", "update_weights", "close"} <= set(members) | set(Sampler.__annotations__)
    for engine in ENGINES:
        if engine != "builtin" and importlib.util.find_spec(engine) is None:
            continue  # its library is not installed here; the engine's own tests say so
        cls = engine_class(engine)
        assert cls.engine == engine, engine
        for method in ("sample", "update_weights", "close"):
            assert callable(getattr(cls, method, None)), f"{cls.__name__} has no {method}"


def test_the_top_level_shows_the_parts():
    top = sorted(path.name for path in (ROOT / "rlhf_pg").glob("*.py"))
    assert len(top) <= 15, f"{len(top)} top-level modules in rlhf_pg/: {top}; group them into a package by part"


def test_readme_module_table_names_every_module():
    """README's layout table stays true: every module (or its package) is named there."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## How the code is laid out")
    section = readme[start: readme.index("\n## ", start + 10)]
    for name, path in _modules().items():
        relative = path.relative_to(ROOT).as_posix()
        package = relative.rsplit("/", 1)[0] + "/"
        assert relative in section or path.name in section or (
            path.name == "__init__.py" and package in section), f"README's layout table does not name {relative}"


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
    assert "reward_models" in graph["rlhf_pg.lm_run"] and "rlhf_pg.chat" in graph["reward_models.scorer"]
    assert "rlhf_pg.recipe" not in graph["reward_models.scorer"]  # its import is under TYPE_CHECKING
    assert "rlhf_pg.run.loop" in graph["reward_models.bradley_terry"]
    assert "rlhf_pg.run.checkpoint" in graph["rlhf_pg.run.loop"]  # `from . import checkpoint as ckpt`
    assert graph["rlhf_pg.config"] == {"rlhf_pg.errors"}  # the engine knows no schema


def test_the_re_export_shims_are_gone():
    """``rlhf_pg.advantages/.losses/.mdp/.kl_control`` moved to ``rlhf_pg.core`` one release ago; the shims are removed."""
    for old in ("advantages", "losses", "mdp", "kl_control", "rollout", "rewards", "multiturn"):
        assert not (ROOT / "rlhf_pg" / f"{old}.py").exists(), old
