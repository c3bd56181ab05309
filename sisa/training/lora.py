"""The `lora` backend: one frozen `AutoModelForSequenceClassification` base, one peft LoRA adapter
per shard (the classification head trains with it, as a peft `modules_to_save`).

With sisa.training.causal_lm, the only modules that import peft. Checkpoints hold the adapter and
head weights, optimizer and RNG state in `weights.safetensors`, plus the adapter saved the peft way
in `adapter/` (load it with `PeftModel.from_pretrained(base, ".../adapter")`). Ensemble inference
loads the base once with every shard's adapter as a named adapter and scores all shards in one
mixed-adapter forward pass.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Collection, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sisa.config import LoraConfig
from sisa.errors import InputKindError
from sisa.models import model_fingerprint, quiet_transformers, resolve_model
from sisa.records import Input
from sisa.tasks import ModelSpec
from sisa.training.protocol import State
from sisa.training.state import export_state, import_state, model_tensors

ADAPTER_DIR = "adapter"


class TextInputs:
    """Texts indexable by a tensor of positions (tokenised per batch, with dynamic padding)."""

    def __init__(self, texts: Sequence[str]) -> None:
        for t in texts:
            if not isinstance(t, str):
                raise InputKindError("the lora backend needs texts, not numeric features")
        self.texts = list(texts)

    def __getitem__(self, index: torch.Tensor) -> list[str]:
        return [self.texts[i] for i in index.tolist()]

    def __len__(self) -> int:
        return len(self.texts)


def _lora_config(training: LoraConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type="SEQ_CLS", r=training.lora_r, lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout, target_modules=list(training.lora_target_modules),
    )


def _base_model(training: LoraConfig, num_classes: int, seed: int) -> Any:
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    torch.manual_seed(seed)  # a new classification head is initialised from the global generator
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model(training.model), num_labels=num_classes)


class LoraModel:
    def __init__(self, training: LoraConfig, num_classes: int, seed: int, tokenizer: Any,
                 device: str) -> None:
        from peft import get_peft_model

        self.training = training
        self.tokenizer = tokenizer
        self.device = device
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(_base_model(training, num_classes, seed),
                                        _lora_config(training))
        self.model.to(device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=training.learning_rate, weight_decay=training.weight_decay,
        )

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True,
                             max_length=self.training.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def _autocast(self) -> Any:
        if self.training.bf16 and self.device.startswith("cuda"):
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_epoch(self, inputs: TextInputs, targets: torch.Tensor, order: torch.Tensor) -> None:
        self.model.train()
        for batch in order.split(self.training.batch_size):
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self.model(**self._encode(inputs[batch])).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[batch].to(self.device))
            loss.backward()
            self.optimizer.step()

    def state(self) -> State:
        from peft import get_peft_model_state_dict

        return export_state(get_peft_model_state_dict(self.model), self.optimizer)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        import_state(lambda t: set_peft_model_state_dict(self.model, t), self.optimizer, tensors, meta)

    @torch.no_grad()
    def predict_proba(self, inputs: TextInputs) -> torch.Tensor:
        self.model.eval()
        out = []
        for start in range(0, len(inputs), 64):
            texts = inputs.texts[start:start + 64]
            with self._autocast():
                out.append(torch.softmax(self.model(**self._encode(texts)).logits.float(), -1).cpu())
        return torch.cat(out) if out else torch.empty((0, 0))

    def export_files(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            return {f"{ADAPTER_DIR}/{p.name}": p.read_bytes()
                    for p in sorted(Path(tmp).iterdir()) if p.is_file() and p.name != "README.md"}


class LoraScorer:
    """The base loaded once, every shard's adapter (and head) as a named adapter on it."""

    def __init__(self, training: LoraConfig, num_classes: int, tokenizer: Any,
                 states: Mapping[int, dict[str, torch.Tensor]], seed: int, device: str,
                 batch_size: int = 32) -> None:
        from peft import get_peft_model, set_peft_model_state_dict

        self.training = training
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.shards = sorted(states)
        config = _lora_config(training)
        base = _base_model(training, num_classes, seed)
        names = [f"shard-{s}" for s in self.shards]
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            self.model = get_peft_model(base, config, adapter_name=names[0])
        for name in names[1:]:
            self.model.add_adapter(name, config)
        for shard, name in zip(self.shards, names, strict=True):
            set_peft_model_state_dict(self.model, states[shard], adapter_name=name)
        self.names = names
        self.model.to(device).eval()

    def subset(self, shards: Collection[int]) -> LoraScorer:
        """These shards' adapters only, on the same base (a view: nothing is loaded or changed)."""
        view = copy.copy(self)
        keep = [i for i, s in enumerate(self.shards) if s in set(shards)]
        view.shards = [self.shards[i] for i in keep]
        view.names = [self.names[i] for i in keep]
        return view

    @torch.no_grad()
    def shard_proba(self, inputs: TextInputs) -> dict[int, np.ndarray]:
        per_shard: dict[int, list[np.ndarray]] = {s: [] for s in self.shards}
        for start in range(0, len(inputs), self.batch_size):
            texts = inputs.texts[start:start + self.batch_size]
            enc = self.tokenizer(texts, padding=True, truncation=True,
                                 max_length=self.training.max_length, return_tensors="pt")
            n = len(texts)
            # One forward pass for all shards: the batch repeated once per adapter.
            big = {k: v.repeat(len(self.shards), 1).to(self.device) for k, v in enc.items()}
            adapter_names = [name for name in self.names for _ in range(n)]
            logits = self.model(**big, adapter_names=adapter_names).logits.float()
            proba = torch.softmax(logits, -1).double().cpu().numpy()
            for i, shard in enumerate(self.shards):
                per_shard[shard].append(proba[i * n:(i + 1) * n])
        return {s: np.concatenate(v) if v else np.zeros((0, 0)) for s, v in per_shard.items()}


class LoraBackend:
    name = "lora"
    encoder = None

    def __init__(self, config: LoraConfig, spec: ModelSpec) -> None:
        self.config = config
        self.spec = spec
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            quiet_transformers()
            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.config.model))
        return self._tokenizer

    def fingerprint(self) -> str:
        return model_fingerprint(self.config.model)

    def prepare(self, inputs: Sequence[Input] | np.ndarray) -> TextInputs:
        return TextInputs([x for x in inputs])  # type: ignore[misc]

    def create(self, seed: int, device: str = "cpu") -> LoraModel:
        return LoraModel(self.config, self.spec.num_classes, seed, self.tokenizer, device)

    def scorer(self, states: Mapping[int, State], seed: int) -> LoraScorer:
        adapters = {s: model_tensors(tensors) for s, (tensors, _meta) in states.items()}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return LoraScorer(self.config, self.spec.num_classes, self.tokenizer, adapters, seed, device)
