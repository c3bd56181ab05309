"""The floors, enforced: each module's imports (read with `ast`: lazy, type-only and literal
`importlib.import_module` ones included; names imported from a package resolved to the module that
defines them) stay within what its floor allows, so the rules survive the next contributor.

- `shard_store` (the lowest floor) imports the standard library, sqlite-utils and itself.
- Inside `sisa`, a module imports only modules of a lower floor (`FLOORS`); inside a package, only
  modules before it in the package's order (`PACKAGE_ORDER`): no cycle hides in a package.
- The training package imports neither `ray` nor `shard_store`, not even through a module it
  imports (the transitive closure is checked, and what importing it loads is checked in a process).
- Only `sisa.execution` and `sisa.service.ray_serve` import `ray`; only `sisa.adapters` imports peft.
- Nothing follows `.store.` or `.manager.` (or `._store`, `._manager`) of another object than
  `self`: the store and the deletion manager are reached through their owner's public verbs.
- Benchmarks and tests use public names only; tests never import benchmarks; benchmarks never
  run a script from tests.

Every rule is also fed a snippet that breaks it, and must catch it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# sisa's modules by floor: a module may import modules of lower floors only.
FLOORS: dict[str, int] = {
    "sisa.errors": 0,
    "sisa.config": 1, "sisa.partition": 1, "sisa.schedule": 1, "sisa.sources": 1,
    "sisa.records": 2, "sisa.checkpoint": 2, "sisa.reports": 2, "sisa.models": 2,
    "sisa.builtin": 2, "sisa.evidence": 2, "sisa.custody": 2, "sisa.handoff": 2,
    "sisa.tasks": 3, "sisa.status": 3, "sisa.intake": 3, "sisa.adapters": 3, "sisa.inputs": 3,
    "sisa.training": 4,
    "sisa.execution": 5, "sisa.features": 5, "sisa.shard_data": 5,
    "sisa.serving": 6,
    "sisa.unlearning": 7,
    "sisa.audit": 8,
    "sisa.api": 9,
    "sisa.options": 10, "sisa.workflows": 10,
    "sisa.service": 11,
    "sisa.cli": 12,
    "sisa.testing": 13,  # the fault kit drives the CLI; nothing in the library imports it
}
# A package's modules, bottom up: each may import only those before it (the package's __init__
# is named by the package).
PACKAGE_ORDER: dict[str, list[str]] = {
    "sisa.training": ["protocol", "jobs", "optim", "state", "encoder", "mlp", "head", "lora", "causal_lm",
                      "", "shard_trainer"],
    "sisa.serving": ["", "scorers", "ensemble", "generation", "loader"],
    "sisa.workflows": ["", "attacks", "proof", "approximate", "export", "demo"],
    "sisa.service": ["settings", "metrics", "staleness", "model", "batching", "worker", "service",
                     "remote", "app", "ray_serve", ""],
    "sisa.testing": ["", "tamper", "killer", "serving"],
}
THIRD_PARTY_ONLY_IN = {"ray": {"sisa.execution", "sisa.service.ray_serve"},
                       "peft": {"sisa.adapters"}}
STORE_MAY_IMPORT = {"sqlite_utils", "shard_store"}
TRAINING_NEVER_REACHES = ("shard_store", "ray")
# Who may follow an object's store or deletion manager (`x.store.live()`, `x._manager`): the
# object itself (`self.store.live()`).
REACH_THROUGH = {"store", "manager"}
PRIVATE = {"_store", "_manager"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _exports(package: str) -> dict[str, str]:
    """A lazy package's `_EXPORTS` (name -> defining module), read from its __init__."""
    init = ROOT.joinpath(*package.split("."), "__init__.py")
    if not init.is_file():
        return {}
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            return {k: v for k, v in ast.literal_eval(node.value).items()}
    return {}


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def resolve(base: str, name: str) -> str:
    """The module a `from base import name` reads `name` from: a submodule, the module that
    defines a lazily exported name, or `base` itself."""
    if _is_module(f"{base}.{name}"):
        return f"{base}.{name}"
    return _exports(base).get(name, base)


def imports_of(source: str, me: str, is_package: bool = False) -> list[str]:
    """Every module the code imports (absolute names; relative imports and names imported from a
    package resolved; literal `import_module("...")` and `__import__("...")` calls included)."""
    tree = ast.parse(source)
    package = me if is_package else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
            found += [base] + [resolve(base, alias.name) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                found.append(node.args[0].value)
    return found


def imports(path: Path) -> list[str]:
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py")


def floor_of(module: str) -> int | None:
    while module:
        if module in FLOORS:
            return FLOORS[module]
        module = module.rpartition(".")[0]
    return None


def position(module: str) -> tuple[str, int] | None:
    """(package, place in its order) of a module inside an ordered package."""
    for package, order in PACKAGE_ORDER.items():
        if module == package:
            return package, order.index("")
        if module.startswith(package + "."):
            leaf = module[len(package) + 1:].split(".")[0]
            return package, order.index(leaf) if leaf in order else -1
    return None


def floor_problems(me: str, names: list[str]) -> list[str]:
    """What is wrong with module `me` importing `names`."""
    problems = []
    mine = floor_of(me)
    where = position(me)
    for name in names:
        top = name.split(".")[0]
        for lib, owners in THIRD_PARTY_ONLY_IN.items():
            if top == lib and me not in owners:
                problems.append(f"{me} imports {lib}: only {sorted(owners)} may")
        if me.startswith("sisa.training") and top in TRAINING_NEVER_REACHES:
            problems.append(f"{me} (training) imports {name}")
        if top != "sisa" or name == "sisa" or name == me:
            continue
        theirs = floor_of(name)
        if theirs is None or mine is None:
            problems.append(f"{me} imports {name}, which has no floor")
            continue
        other = position(name)
        if where is not None and other is not None and where[0] == other[0]:
            if not other[1] < where[1]:
                problems.append(f"{me} imports {name}: later (or not) in {where[0]}'s order "
                                f"{PACKAGE_ORDER[where[0]]}")
        elif not theirs < mine:
            problems.append(f"{me} (floor {mine}) imports {name} (floor {theirs}): an upward or "
                            "sideways import")
    return problems


def reach_through(source: str) -> list[str]:
    """Attribute chains that follow another object's `.store.` or `.manager.`, or touch its
    `._store` or `._manager` (line: text)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        inner = node.value
        mine = isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) \
            and inner.value.id == "self"
        if isinstance(inner, ast.Attribute) and inner.attr in REACH_THROUGH and not mine:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        if node.attr in PRIVATE and not (isinstance(inner, ast.Name) and inner.id == "self"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def script_paths(source: str) -> list[str]:
    """String literals in a benchmark that name a path under tests/ (a script run from there)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.replace("\\", "/").split("/")
            if "tests" in parts or node.value.startswith("tests."):
                found.append(f"line {node.lineno}: {node.value!r}")
    return found


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def closure(start: str) -> Iterator[tuple[str, list[str]]]:
    """Every module `start` reaches through sisa's own imports, with the chain that reaches it."""
    seen = {start}
    todo = [(start, [start])]
    while todo:
        name, chain = todo.pop()
        path = ROOT.joinpath(*name.split("."))
        source = path / "__init__.py" if (path / "__init__.py").is_file() else path.with_suffix(".py")
        if not source.is_file():
            continue
        for found in imports_of(source.read_text(), name, source.name == "__init__.py"):
            yield found, [*chain, found]
            if found.split(".")[0] in ("sisa", "shard_store") and found not in seen:
                seen.add(found)
                todo.append((found, [*chain, found]))


# -- the rules, on the code --------------------------------------------------------------------


def test_every_sisa_module_has_a_floor_and_a_place():
    missing = [module_name(p) for p in files("sisa")
               if module_name(p) != "sisa" and floor_of(module_name(p)) is None]
    assert not missing, f"give these modules a floor in FLOORS: {missing}"
    unplaced = [module_name(p) for p in files("sisa")
                if position(module_name(p)) is not None and position(module_name(p))[1] < 0]  # type: ignore[index]
    assert not unplaced, f"give these modules a place in PACKAGE_ORDER: {unplaced}"


@pytest.mark.parametrize("path", files("shard_store"), ids=module_name)
def test_shard_store_imports_nothing_of_sisa(path):
    for name in imports(path):
        top = name.split(".")[0]
        assert top in sys.stdlib_module_names or top in STORE_MAY_IMPORT or top == "__future__", \
            f"{module_name(path)} imports {name}: the store's floor allows the standard library, " \
            "sqlite-utils and itself"


@pytest.mark.parametrize("path", [p for p in files("sisa") if module_name(p) != "sisa"], ids=module_name)
def test_sisa_modules_import_only_lower_floors(path):
    assert floor_problems(module_name(path), imports(path)) == []


@pytest.mark.parametrize("path", files("sisa/training"), ids=module_name)
def test_training_never_reaches_the_store_or_ray_through_what_it_imports(path):
    reached = [" -> ".join(chain) for found, chain in closure(module_name(path))
               if found.split(".")[0] in TRAINING_NEVER_REACHES]
    assert not reached, f"{module_name(path)} reaches the store or ray: {reached[:3]}"


def test_importing_the_training_package_loads_neither_the_store_nor_ray():
    modules = [module_name(p) for p in files("sisa/training")]
    code = (f"import sys; import {', '.join(modules)}; "
            f"print(','.join(m for m in {TRAINING_NEVER_REACHES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "", f"importing sisa.training loaded {out.stdout.strip()}"


@pytest.mark.parametrize("path", files("sisa") + files("benchmarks") + files("tests"), ids=module_name)
def test_nothing_reaches_through_an_objects_store_or_manager(path):
    assert reach_through(path.read_text()) == []


@pytest.mark.parametrize("path", files("benchmarks"), ids=module_name)
def test_benchmarks_run_no_script_from_tests(path):
    assert script_paths(path.read_text()) == []


def test_import_sisa_stays_light():
    code = ("import sys, sisa; sisa.SisaConfig; "
            "print(','.join(m for m in ('torch', 'ray', 'transformers', 'shard_store') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`import sisa` loaded {out.stdout.strip()}"


def test_the_driver_imports_torch_only_to_train_or_serve():
    """Reading, validating and writing records, the status, the audit, the receipts and a
    deletion's acknowledgement run without torch (its import is two seconds of every command);
    the trainer and the models import it when they are used."""
    code = ("import sys, sisa.api, sisa.cli, sisa.audit, sisa.unlearning, sisa.execution, "
            "sisa.serving, sisa.serving.loader, sisa.serving.ensemble, sisa.intake; "
            "print(','.join(m for m in ('torch', 'transformers', 'peft', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the driver loaded {out.stdout.strip()}"


@pytest.mark.parametrize("path", files("benchmarks") + files("tests"), ids=module_name)
def test_benchmarks_and_tests_use_public_names(path):
    me = module_name(path)
    for name in imports(path):
        private = [p for p in name.split(".") if p.startswith("_") and not p.startswith("__")]
        assert not private, f"{me} imports the private name {name}"
        if me.startswith("tests"):
            assert not name.startswith("benchmarks"), f"{me} imports {name}: tests never import benchmarks"


def test_every_public_name_resolves():
    import sisa

    assert sisa.__all__ == sorted(sisa.__all__)
    for name in sisa.__all__:
        assert getattr(sisa, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sisa.nope  # noqa: B018


# -- each rule catches a snippet that breaks it -------------------------------------------------


@pytest.mark.parametrize(("me", "snippet", "words"), [
    # a name imported from the `sisa` package is the module that defines it (here: floor 9)
    ("sisa.partition", "def f():\n    from sisa import Sisa\n", "sisa.api"),
    # a literal import_module string is an import
    ("sisa.training.mlp", "import importlib\nimportlib.import_module('shard_store')\n", "(training)"),
    ("sisa.training.mlp", "__import__('ray')\n", "only"),
    # inside a package, only modules before it in its order
    ("sisa.training.protocol", "from sisa.training.mlp import MLPBackend\n", "order"),
    ("sisa.serving.scorers", "from sisa.serving.loader import Loader\n", "order"),
    # sideways between floors, and upward
    ("sisa.features", "from sisa.execution import run_jobs\n", "sideways"),
    ("sisa.audit", "import sisa.cli\n", "upward"),
    ("sisa.status", "import peft\n", "only ['sisa.adapters'] may"),
])
def test_the_floor_rule_catches(me, snippet, words):
    problems = floor_problems(me, imports_of(snippet, me))
    assert problems and any(words in p for p in problems), problems


def test_the_transitive_rule_catches_a_store_pulled_in_through_a_lower_floor(tmp_path):
    # sisa.intake is on a lower floor than training (allowed directly), but it imports the store.
    assert floor_problems("sisa.training.mlp", ["sisa.intake"]) == []
    chains = [chain for found, chain in closure("sisa.intake") if found == "shard_store"]
    assert chains, "sisa.intake imports shard_store: importing it from training would pull it in"


@pytest.mark.parametrize("snippet", [
    "def f(sisa):\n    return sisa.store.live()\n",
    "class S:\n    def f(self):\n        return self.sisa.manager.pending()\n",
    "x = service.reader._store\n",
    "y = acker.manager.acknowledged.pop('r')\n",
])
def test_the_reach_through_rule_catches(snippet):
    assert reach_through(snippet)


def test_the_reach_through_rule_lets_an_object_use_its_own():
    assert reach_through("class M:\n    def f(self):\n        return self.store.live()\n") == []
    assert reach_through("print(report.store)\n") == []  # a field named store, not followed


@pytest.mark.parametrize("snippet", [
    'KILLER = ROOT / "tests" / "killer.py"\n',
    'subprocess.run([sys.executable, "tests/killer.py"])\n',
    'subprocess.run([sys.executable, "-m", "tests.killer"])\n',
])
def test_the_script_path_rule_catches(snippet):
    assert script_paths(snippet)
