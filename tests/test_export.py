"""`sisa export --format hf`: one standard model directory that transformers loads with no sisa,
whose weights are the base with the shards' mean LoRA update (checked against peft's own merge
of each shard's adapter), bit-identical after a deletion to the export of a scratch store, and
refused while a deletion is pending."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sisa import Sisa
from sisa.cli import app
from sisa.errors import ConfigError, NoServableShardError
from sisa.workflows.export import PROVENANCE, export_hf

from .conftest import CHAT_SPEC, make_chat_rows
from .test_causal_lm import lm_config

LOAD_WITHOUT_SISA = (
    "import sys\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
    "AutoTokenizer.from_pretrained(sys.argv[1])\n"
    "assert not any(m == 'sisa' or m.startswith('sisa.') for m in sys.modules), 'sisa was imported'\n"
    "print(sum(p.numel() for p in model.parameters()))\n")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


@pytest.mark.parametrize("top_k", [0, 1])
def test_the_export_is_the_base_with_the_shards_mean_update(tmp_path: Path, tiny_lm: str,
                                                            top_k: int) -> None:
    from peft import PeftModel

    from sisa.training.causal_lm import load_base

    sisa = Sisa.train(tmp_path / "s", make_chat_rows(), lm_config(tiny_lm, top_k), CHAT_SPEC)
    report = export_hf(sisa, tmp_path / "hf")
    assert report.shards == [0, 1] and report.base_model == tiny_lm
    provenance = json.loads((tmp_path / "hf" / PROVENANCE).read_text())
    assert provenance["config_digest"] == sisa.config_digest
    assert provenance["live_checkpoints"] == {str(s): sha for s, sha in sisa.servable().items()}
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SISA, str(tmp_path / "hf")],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    # peft merges each shard's adapter into its own copy of the base; their mean is the export's.
    merged = []
    for row in sisa.live_checkpoints().values():
        model = PeftModel.from_pretrained(load_base(tiny_lm), str(sisa.root / row.path / "adapter"))
        merged.append(model.merge_and_unload().state_dict())
    base = load_base(tiny_lm).state_dict()
    exported = weights(tmp_path / "hf")
    changed = 0
    for name, tensor in exported.items():
        expected = sum(m[name].double() for m in merged) / len(merged)
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
        changed += not torch.equal(tensor, base[name])
    assert changed > 0  # the adapters moved some weights: the comparison above is not base vs base


def test_after_a_deletion_the_export_is_a_scratch_stores(tmp_path: Path, tiny_lm: str) -> None:
    rows = make_chat_rows()
    config = lm_config(tiny_lm, top_k=1)
    sisa = Sisa.train(tmp_path / "s", rows, config, CHAT_SPEC)
    before = export_hf(sisa, tmp_path / "before")
    sisa.request_deletion(group="u1")
    with pytest.raises(NoServableShardError, match="a deletion is pending"):
        export_hf(sisa, tmp_path / "pending")
    assert not (tmp_path / "pending").exists()
    sisa.apply_pending()
    after = export_hf(sisa, tmp_path / "after")
    scratch = Sisa.train(tmp_path / "scratch", [r for r in rows if r["user"] != "u1"], config,
                         CHAT_SPEC)
    export_hf(scratch, tmp_path / "fresh")
    assert (tmp_path / "after" / "model.safetensors").read_bytes() == \
        (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert (tmp_path / "before" / "model.safetensors").read_bytes() != \
        (tmp_path / "after" / "model.safetensors").read_bytes()
    assert after.receipts_head != before.receipts_head and after.receipts_head is not None
    with pytest.raises(ConfigError, match="exists and is not empty"):
        export_hf(sisa, tmp_path / "after")


def test_the_cli_exports_and_refuses_a_classifier(tmp_path: Path, tiny_lm: str) -> None:
    from .conftest import SPEC, make_rows, small_config

    Sisa.train(tmp_path / "lm", make_chat_rows(), lm_config(tiny_lm), CHAT_SPEC).close()
    done = CliRunner().invoke(app, ["export", "--store", str(tmp_path / "lm"), str(tmp_path / "hf"),
                                    "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["format"] == "hf" and (tmp_path / "hf" / "config.json").is_file()
    Sisa.train(tmp_path / "mlp", make_rows(60), small_config(), SPEC).close()
    refused = CliRunner().invoke(app, ["export", "--store", str(tmp_path / "mlp"), str(tmp_path / "x")])
    assert refused.exit_code == 1 and "causal_lm" in refused.stderr
    assert not (tmp_path / "x").exists()
