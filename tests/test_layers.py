"""The floors, enforced: each module's imports (read with `ast`, lazy and type-only ones included)
stay within what its floor allows, so the rules survive the next contributor.

- `shard_store` (the lowest floor) imports the standard library, sqlite-utils and itself: nothing of
  `sisa`, no torch.
- Inside `sisa`, a module imports only modules of a lower floor (`FLOORS`), and the training package
  imports neither `ray` nor `shard_store`: shard tasks run anywhere without the store.
- Only `sisa.execution` (shard tasks) and `sisa.service.ray_serve` (the Ray Serve deployment)
  import `ray`; only the adapter backends (`sisa.training.lora`,
  `sisa.training.causal_lm`) import `peft`.
- Benchmarks and tests use public names only (no `_private` imports), and tests never import
  benchmarks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# sisa's modules by floor: a module may import modules of lower floors only (a package's own
# modules may import each other, bottom up, as the package's internal order allows).
FLOORS: dict[str, int] = {
    "sisa.errors": 0,
    "sisa.config": 1, "sisa.partition": 1, "sisa.schedule": 1, "sisa.sources": 1,
    "sisa.records": 2, "sisa.checkpoint": 2, "sisa.reports": 2, "sisa.models": 2,
    "sisa.builtin": 2, "sisa.evidence": 2,
    "sisa.tasks": 3, "sisa.status": 3, "sisa.intake": 3,
    "sisa.training": 4,  # the package: jobs, protocol, state, encoder, mlp, head, lora, causal_lm,
    # shard_trainer
    "sisa.execution": 5, "sisa.features": 5, "sisa.shard_data": 5,
    "sisa.ensemble": 6,
    "sisa.unlearning": 7,
    "sisa.audit": 8,
    "sisa.api": 9,
    "sisa.proof": 10, "sisa.approximate": 10, "sisa.options": 10,
    "sisa.demo": 11,
    "sisa.service": 11,  # the package: settings, metrics, model, worker, staleness, service, app,
    # ray_serve
    "sisa.cli": 12,
}
THIRD_PARTY_ONLY_IN = {"ray": {"sisa.execution", "sisa.service.ray_serve"},
                       "peft": {"sisa.training.lora", "sisa.training.causal_lm"}}
STORE_MAY_IMPORT = {"sqlite_utils", "shard_store"}
PACKAGES = ("sisa.training", "sisa.service")  # their modules import each other, bottom up


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    """Every module a file imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def floor_of(module: str) -> int | None:
    while module:
        if module in FLOORS:
            return FLOORS[module]
        module = module.rpartition(".")[0]
    return None


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_every_sisa_module_has_a_floor():
    missing = [module_name(p) for p in files("sisa")
               if module_name(p) != "sisa" and floor_of(module_name(p)) is None]
    assert not missing, f"give these modules a floor in FLOORS: {missing}"


@pytest.mark.parametrize("path", files("shard_store"), ids=module_name)
def test_shard_store_imports_nothing_of_sisa(path):
    for name in imports(path):
        top = name.split(".")[0]
        assert top in sys.stdlib_module_names or top in STORE_MAY_IMPORT or top == "__future__", \
            f"{module_name(path)} imports {name}: the store's floor allows the standard library, " \
            "sqlite-utils and itself"


@pytest.mark.parametrize("path", [p for p in files("sisa") if p.name != "__init__.py"
                                  or p.parent.name != "sisa"], ids=module_name)
def test_sisa_modules_import_only_lower_floors(path):
    me = module_name(path)
    mine = floor_of(me)
    assert mine is not None
    for name in imports(path):
        top = name.split(".")[0]
        for lib, owners in THIRD_PARTY_ONLY_IN.items():
            if top == lib:
                assert me in owners, f"{me} imports {lib}: only {sorted(owners)} may"
        if me.startswith("sisa.training"):
            assert top not in ("ray", "shard_store"), f"{me} (training) imports {name}"
        if top != "sisa" or name == "sisa":
            continue
        theirs = floor_of(name)
        if theirs is None:
            continue  # a name imported from a module already checked
        same_package = any(name.startswith(p) and me.startswith(p) for p in PACKAGES)
        assert theirs < mine or same_package, \
            f"{me} (floor {mine}) imports {name} (floor {theirs}): an upward or sideways import"


def test_import_sisa_stays_light():
    import subprocess

    code = ("import sys, sisa; sisa.SisaConfig; "
            "print(','.join(m for m in ('torch', 'ray', 'transformers', 'shard_store') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`import sisa` loaded {out.stdout.strip()}"


def test_the_driver_imports_torch_only_to_train_or_serve():
    """Reading, validating and writing records, the status, the audit, the receipts and a
    deletion's acknowledgement run without torch (its import is two seconds of every command);
    the trainer and the models import it when they are used."""
    import subprocess

    code = ("import sys, sisa.api, sisa.cli, sisa.audit, sisa.unlearning, sisa.execution, "
            "sisa.ensemble, sisa.intake; "
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
