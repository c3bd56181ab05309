"""What a user reads of the evidence and of the work in progress: the verdict decided only where
the evidence can decide it (else "inconclusive", saying why), `sisa prove`'s tables within 80
columns (numbers whole, names whole or folded), and progress that names the shard, slice and
epoch, silent under --json and --no-progress."""

from __future__ import annotations

import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from sisa import Sisa, evidence
from sisa.cli import app, proof_tables
from sisa.workflows.proof import (
    KS_LEVEL,
    POWER_NEEDED,
    TOST_MARGIN,
    CanaryEvidence,
    Evidence,
    ProofReport,
    canary_rows,
    forgotten_rows,
    judge,
    verdict_rows,
)

from .conftest import SPEC, make_rows, small_config

BAR = 10.0
NEVER = [0.77, 2.76, 1.10, 2.91, 0.77, 1.62, 5.82, 2.41]  # bits, as a SmolLM2 demo measured them


# -- the verdict --------------------------------------------------------------------------------


def test_one_forgotten_canary_is_inconclusive_for_lack_of_power_and_says_what_would_decide() -> None:
    """One canary against 8: the KS test cannot reject at all, and the equivalence test (TOST,
    0.5 bit) has almost no power: "inconclusive", naming how many forgotten canaries would do."""
    verdict = judge(True, 11.70, BAR, [("canary-0", 11.70, 0.65)], NEVER)
    assert verdict.answer == "inconclusive"
    assert verdict.tost is not None and verdict.tost["power"] < POWER_NEEDED
    assert "power with 1 forgotten and 8 never-inserted canaries" in verdict.reason
    # 8 never-inserted canaries limit the power whatever the forgotten count: the remedy names both.
    wanted = re.search(r"make (\d+) never-inserted canaries .* forget at least (\d+) canaries",
                       verdict.reason)
    assert wanted, verdict.reason
    m, n = int(wanted.group(1)), int(wanted.group(2))
    sd = float(np.std(NEVER, ddof=1))
    assert evidence.tost_power(n, m, sd, TOST_MARGIN) >= POWER_NEEDED
    assert evidence.tost_power(n - 1, m, sd, TOST_MARGIN) < POWER_NEEDED


def test_a_ks_p_value_above_the_level_is_not_a_yes() -> None:
    """The finding the verdict once missed: 8 forgotten canaries that the KS test cannot tell from
    8 never-inserted ones (p > 0.05) are no evidence of equivalence when the test is weak."""
    alike = [(f"canary-{i}", 12.0, b) for i, b in enumerate(NEVER)]
    assert evidence.ks_pvalue([a for _, _, a in alike], NEVER) > KS_LEVEL
    verdict = judge(True, 12.0, BAR, alike, NEVER)
    assert verdict.answer == "inconclusive" and verdict.tost["power"] < POWER_NEEDED  # type: ignore[index]


def test_a_powered_equivalence_test_decides_yes_or_no() -> None:
    rng = np.random.default_rng(0)
    never = list(rng.normal(1.4, 0.4, 400))
    same = [(f"canary-{i}", 12.0, float(x)) for i, x in enumerate(rng.normal(1.4, 0.4, 120))]
    yes = judge(True, 12.0, BAR, same, never)
    assert yes.answer == "yes" and "equivalent within 0.5 bit" in yes.reason
    assert yes.tost["power"] >= POWER_NEEDED and yes.tost["equivalent"]  # type: ignore[index]
    # 0.6 bit more than the never-inserted ones, on average: below any per-canary alarm, and not
    # equivalent within 0.5 bit, with the power to have shown it.
    shifted = [(f"canary-{i}", 12.0, float(x)) for i, x in enumerate(rng.normal(2.1, 0.4, 120))]
    no = judge(True, 12.0, BAR, shifted, never, margin=0.5)
    assert no.answer == "no", no.reason


def test_calibrated_exposures_decide_where_given() -> None:
    """Patterned secrets rank high under the base model too: the equivalence test reads the
    exposure gained over the base model where the caller has it."""
    rng = np.random.default_rng(1)
    never = [float(x) for x in rng.normal(1.4, 0.4, 300)]
    raw = [(f"canary-{i}", 12.0, 3.0) for i in range(100)]  # raw: 3 bits, all patterned
    gained = ([float(x) for x in rng.normal(0.0, 0.3, 100)], [float(x) for x in rng.normal(0.0, 0.3, 300)])
    assert judge(True, 12.0, BAR, raw, never).answer == "no"
    verdict = judge(True, 12.0, BAR, raw, never, calibrated=gained)
    assert verdict.answer == "yes" and "gained over the base model" in verdict.reason


def test_the_utility_gate_and_the_oracle() -> None:
    forgotten = [("canary-0", 11.7, 0.65)]
    broken = judge(True, 11.7, BAR, forgotten, NEVER, utility=(85.0, 2e10))
    assert broken.answer == "no" and "utility gate" in broken.reason
    assert judge(True, 11.7, BAR, forgotten, NEVER, utility=(85.0, 89.0)).answer == "inconclusive"
    exact = judge(True, 11.7, BAR, forgotten, NEVER, utility=(85.0, 86.0), oracle=True)
    assert exact.answer == "yes" and "retrained oracle byte for byte" in exact.reason
    assert exact.tost is not None and exact.tost["power"] < POWER_NEEDED  # stated all the same
    assert judge(True, 11.7, BAR, forgotten, NEVER, oracle=False).answer == "no"
    # The oracle never overrides memorisation left, nor a broken model.
    assert judge(True, 11.7, BAR, [("canary-0", 11.7, 11.0)], NEVER, oracle=True).answer == "no"
    assert judge(True, 11.7, BAR, forgotten, NEVER, utility=(85.0, 95.0), oracle=True).answer == "no"


def test_memorisation_left_is_no_even_for_one_canary() -> None:
    """Exposure kept at 11 bits: a never-inserted canary gets there with probability 2^-11, far
    below the level; one canary decides that."""
    verdict = judge(True, 11.70, BAR, [("canary-0", 11.70, 11.0)], NEVER)
    assert verdict.answer == "no"
    assert "canary-0 keeps 11.00 bits" in verdict.reason and "0.00049" in verdict.reason


def test_not_memorised_is_inconclusive() -> None:
    verdict = judge(False, 3.2, BAR, [("canary-0", 3.2, 0.5), ("canary-3", 3.2, 1.0)], NEVER)
    assert verdict.answer == "inconclusive" and "not memorised" in verdict.reason
    assert "3.20 bits" in verdict.reason


def test_the_ks_test_still_says_no_where_the_groups_differ() -> None:
    # Both still above every never-inserted canary, yet each below the per-canary level's bar
    # (2^-6 = 0.016 > 0.01 / 2): the KS test tells the groups apart.
    assert evidence.ks_min_pvalue(2, 8) <= KS_LEVEL
    apart = judge(True, 11.5, BAR, [("canary-0", 12.0, 6.0), ("canary-3", 11.0, 6.5)], NEVER)
    assert apart.answer == "no" and "KS p" in apart.reason


def test_the_chance_of_an_exposure_is_exact() -> None:
    """Rank r of N has exposure log2(N / r): a never-inserted canary reaches it with r / N."""
    assert evidence.chance_of_exposure(0.0) == 1.0
    assert evidence.chance_of_exposure(13.287712379549449) == pytest.approx(1e-4)


# -- the tables at 80 columns -----------------------------------------------------------------


def _canary(cid: str, group: str, inserted: bool, shard: int, bits: float, ens: float) -> CanaryEvidence:
    return CanaryEvidence(cid, group, inserted, shard, bits, ens, bits, bits, 1, False, False)


def _report(after_forgotten: float = 0.65) -> ProofReport:
    user = "dd8bd3d0-5894-499d-a9b3-e757b4a563f5"
    before = [_canary("canary-0", user, True, 1, 11.70, 8.29),
              _canary("canary-1", "5f0e2a44-0a3b-4c55-9a8e-1d2c3b4a5f60", True, 2, 13.29, 10.48)]
    before += [_canary(f"canary-never-{i}", f"never-user-{i}", False, i % 4, b, 0.1)
               for i, b in enumerate(NEVER)]
    after = [_canary(c.id, c.group, c.inserted, c.shard,
                     after_forgotten if c.id == "canary-0" else c.exposure_shard or 0.0, 0.61)
             for c in before]
    auc = {"ensemble": {"loss": 0.438, "zlib": 0.365, "min_k": 0.573, "min_k_plus_plus": 0.667}}
    ppl = {"retain": 21.98, "holdout": 85.0, "forget": 30.33}
    verdict = judge(True, 11.70, BAR, [("canary-0", 11.70, after_forgotten)], NEVER)
    return ProofReport(Evidence(before, auc, ppl, 10000, 1000), Evidence(after, auc, ppl, 10000, 1000),
                       [user], 9, 20.4, True, 11.70, after_forgotten, 2.27, 0.222,
                       None, [], verdict.answer, verdict.reason, BAR, tost=verdict.tost)


def _render(report: ProofReport, width: int = 80) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None, emoji=False, markup=False)
    for table in proof_tables(report):
        console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", [80, 100])
def test_the_proof_fits_the_width_with_every_number_whole(width: int) -> None:
    report = _report()
    text = _render(report, width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    numbers = {cell for row in canary_rows(report) for cell in row[2:]}
    numbers |= {cell for row in forgotten_rows(report) for cell in row[2:] if cell}
    for number in numbers:
        assert any(number in line for line in lines), f"{number!r} wrapped or cut"
    assert "…" not in text  # nothing cropped
    for name in ["canary-never-7", "canary-0", "never (8)"]:
        assert name in text, f"{name!r} cut"
    # A user id may fold onto a second line, but whole: its pieces, in order, make it up.
    user = report.forgotten_groups[0]
    pieces = "".join(re.findall(r"[0-9a-f-]+", text.split("the forgotten canaries")[1]))
    assert user in pieces or user in text


def test_the_verdict_reads_inconclusive_with_its_reason_beside_each_canary() -> None:
    report = _report()
    rows = dict(verdict_rows(report))
    assert rows["forgotten look like never inserted"] == "inconclusive"
    verdict = _render(report).split("verdict")[-1]
    assert "│ inconclusive" in verdict and "│ no " not in verdict
    gone = forgotten_rows(report)
    assert gone[0][:4] == ("canary-0", report.forgotten_groups[0], "11.70", "0.65")
    assert gone[0][5] == f"{2 ** -0.65:.2g}"  # 0.64: as likely as for a never-inserted canary
    assert gone[-1][0] == "never (8)" and gone[-1][3] == "0.77 to 5.82"
    assert dict(verdict_rows(report))["why"].startswith("the equivalence test (TOST, margin 0.5")
    assert any(k.startswith("TOST, margin 0.5 bit") for k, _ in verdict_rows(report))


def test_a_proof_without_a_deletion_has_no_verdict() -> None:
    report = _report()
    alone = ProofReport(report.before, None, [], 0, None, True, 11.7, None, None, None, None)
    assert alone.verdict is None and [k for k, _ in verdict_rows(alone)] == ["memorised before"]
    assert "before" in _render(alone)


# -- progress -----------------------------------------------------------------------------------


class Recorder:
    """A progress hook that keeps every bar: description, total, and the items ticked."""

    def __init__(self) -> None:
        self.bars: list[tuple[str, int, list[Any]]] = []

    def __call__(self, description: str, total: int) -> Any:
        items: list[Any] = []
        self.bars.append((description, total, items))
        return items.append


def test_training_in_process_reports_shard_slice_and_epoch(tmp_path: Path) -> None:
    config = small_config()  # S=3, R=3, 2 epochs
    progress = Recorder()
    sisa = Sisa.train(tmp_path / "s", make_rows(), config, SPEC, progress=progress)
    (_, total, items), = [b for b in progress.bars if b[0] == "training shards"]
    assert total == len(items) == 3 * 3 * 2
    assert items[0] == "shard 0 (1/3), slice 1/3, epoch 2/2" and items[-1] == "done"
    assert "shard 2 (3/3), slice 3/3, epoch 2/2" in items
    victim = next(iter(sisa.live_records(1))).id
    sisa.forget([victim])
    (_, total, items), = [b for b in progress.bars if b[0] == "applying deletions"]
    assert total == len(items) and items[-1] == "done"
    assert all(item.startswith("shard 1 (1/1), slice ") for item in items[:-1])
    sisa.close()


def _demo(*flags: str) -> Any:
    return CliRunner().invoke(app, ["demo", "--backend", "mlp", "--shards", "2", "--slices", "2",
                                    "--epochs", "1", "--forget-count", "1", *flags])


def test_progress_is_on_stderr_and_off_under_json_or_no_progress() -> None:
    shown = _demo()
    assert shown.exit_code == 0, shown.output
    assert "training shards" in shown.stderr and "training shards" not in shown.stdout
    for flags in (["--json"], ["--no-progress"], ["--json", "--no-progress"]):
        quiet = _demo(*flags)
        assert quiet.exit_code == 0, quiet.output
        assert quiet.stderr == "", (flags, quiet.stderr)
    assert json.loads(_demo("--json").stdout)["audit_ok"]


def test_greedy_reproduction_is_shown_for_the_own_shard_and_the_ensemble() -> None:
    report = _report()
    shard_hit = dataclasses.replace(report.before.canaries[1], greedy_shard=True, greedy_ensemble=False)
    before = dataclasses.replace(report.before, canaries=[report.before.canaries[0], shard_hit,
                                                          *report.before.canaries[2:]])
    rows = canary_rows(dataclasses.replace(report, before=before))
    assert rows[0][-1] == "n/n n/n" and rows[1][-1] == "y/n n/n"  # own shard/ensemble, before then after
