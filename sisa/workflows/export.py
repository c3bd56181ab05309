"""A causal-LM store as one standard Hugging Face model directory, which `AutoModelForCausalLM`
and any evaluator that takes a model path (lm-eval, OpenUnlearning) load with no sisa installed.

The shards' LoRA adapters become one model: the base with the mean of the shards' weight updates
folded in (`sisa.adapters.merged_deltas`: the exact low-rank sum, each update B @ A scaled as peft
scales it, divided by S). That is parameter averaging, not the ensemble's mixture of the shards'
next-token distributions that `generate` and `score` serve: a model of its own, for tools that
take one model. It is a function of the live adapters alone, so after a deletion it is
bit-identical to the export of a store trained from scratch without the deleted records.
Next to the weights, `sisa_provenance.json` says where they came from.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sisa import __version__
from sisa.adapters import merged_deltas
from sisa.api import Sisa
from sisa.config import CausalLMConfig
from sisa.errors import ConfigError
from sisa.reports import _Dict

PROVENANCE = "sisa_provenance.json"
MERGE = "mean of the shards' LoRA updates, (1/S) sum of (lora_alpha / r) * B @ A, folded into the base"


@dataclass(frozen=True)
class ExportReport(_Dict):
    directory: str
    format: str
    base_model: str
    shards: list[int]
    model_version: str  # digest of the live checkpoints exported
    config_digest: str
    receipts_head: str | None  # the receipt chain's head when exported: the deletions it reflects
    merge: str


def export_hf(sisa: Sisa, directory: str | Path) -> ExportReport:
    """Write the store's model to `directory` (which must not exist, or be empty) as a Hugging
    Face model directory: config, safetensors weights, tokenizer, and the provenance file. It is
    written beside the target and renamed into place once whole. Refused while any shard may not
    serve (a deletion pending, damage): an export never holds a deleted record."""
    sisa.require_language_model()
    training = sisa.config.training
    assert isinstance(training, CausalLMConfig)
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"export directory {str(target)!r} exists and is not empty: give a new one")
    adapters = sisa.live_adapters()  # verified; refused while a deletion is pending
    receipts = sisa.verify_receipts()
    if not receipts.ok:
        raise ConfigError("the receipt chain fails its verification (`sisa receipts verify` says "
                          "how): export refused, as the deletions it reflects are in doubt")
    from sisa.training.causal_lm import load_base, load_tokenizer

    model: Any = load_base(training.model)
    deltas = merged_deltas(adapters, training.lora_alpha / training.lora_r)
    params = dict(model.named_parameters())
    missing = sorted(set(deltas) - set(params))
    if missing:
        raise ConfigError(f"the adapters update weights the base model lacks: {missing[:3]}")
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = params[name]
            weight.copy_((weight.double() + delta).to(weight.dtype))
    versions = sorted(sisa.servable().items())
    report = ExportReport(str(target), "hf", training.model, [s for s, _ in versions],
                          sisa.status().model_version, sisa.config_digest, receipts.head, MERGE)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(partial, safe_serialization=True)
        load_tokenizer(training.model).save_pretrained(partial)
        (partial / PROVENANCE).write_text(json.dumps(
            {**report.to_dict(), "sisa_version": __version__,
             "live_checkpoints": {str(s): sha for s, sha in versions}}, indent=2, sort_keys=True) + "\n")
        if target.exists():
            target.rmdir()  # empty, checked above
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return report
