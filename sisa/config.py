"""Configuration: frozen dataclasses for partitioning, each backend's training, execution, and data
columns; validated on creation, with every problem reported at once.

Each field carries its help text (and, where the flag differs from the field name, its CLI flag) in
its metadata: the CLI options and the README's option table are generated from these fields.
`SisaConfig.digest()` covers everything that changes the weights (partition and training); execution
settings never change them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from sisa.errors import ConfigError

# Above these, a run cannot be meant: AdamW moves each weight by about the learning rate every
# step (so the model only diverges, to NaN), and torch crashes when asked for a million threads.
MAX_LEARNING_RATE = 10.0
MAX_TORCH_THREADS = 1024

Executor = Literal["local", "ray"]
Voting = Literal["soft", "hard"]
Placement = Literal["uniform", "late_slices", "dedicated_shards"]
InputKind = Literal["features", "text"]


def option(default: Any, help: str, *, flag: str | None = None, cli: bool = True,
           negate: bool = False) -> Any:
    """A config field with its help text; `flag` overrides the CLI flag derived from the field
    name; `cli=False` keeps it out of the CLI (set it in a config file or the library); `negate`:
    a boolean that defaults to True, turned off by its (`--no-...`) flag."""
    metadata = {"help": help, "flag": flag, "cli": cli, "negate": negate}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _override(cls: type, name: str, default: Any) -> Any:
    """The field `name` of `cls` with another default (and the same help)."""
    metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    return field(default=default, metadata=metadata)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class _Checks:
    """Collects every problem of a config, so a user fixes it in one pass."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.errors: list[str] = []

    def __call__(self, ok: bool, message: str) -> bool:
        if not ok:
            self.errors.append(message)
        return ok

    def finite(self, value: float, name: str) -> bool:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        self(ok, f"{name} must be a finite number, got {value!r}")
        return ok

    def integer(self, value: int, name: str, minimum: int) -> bool:
        """`value` is an integer >= `minimum` (a config file may hold "4" or 4.0: refuse them
        with this message rather than fail on a comparison)."""
        if not _is_int(value):
            self(False, f"{name} must be an integer >= {minimum}, got {value!r}")
            return False
        self(value >= minimum, f"{name} must be >= {minimum}, got {value!r}")
        return value >= minimum

    def raise_all(self) -> None:
        if self.errors:
            raise ConfigError(f"invalid {self.name}: " + "; ".join(self.errors))


@dataclass(frozen=True)
class PartitionConfig:
    """Where each record goes: S shards, R slices per shard, placement keyed by `seed`."""

    shards: int = option(4, "S: independent shard models; a deletion retrains about 1/S of the work.")
    slices: int = option(4, "R: slices (checkpoints) per shard; a deletion resumes from the slice "
                            "before the deleted record's.")
    seed: int = option(0, "Keys placement and every random draw.")
    placement: Placement = option(
        "uniform", "uniform, late_slices (records likely to be deleted go to the last slices of "
                   "their shard) or dedicated_shards (they go to shards of their own).")
    prior_threshold: float = option(0.5, "A record is likely to be deleted when its prior "
                                         "(the data's prior column) is >= this.")
    late_slices: int = option(1, "late_slices placement: how many last slices.")
    dedicated_shards: int = option(1, "dedicated_shards placement: how many shards.")

    def __post_init__(self) -> None:
        check = _Checks("partition config")
        shards_ok = check.integer(self.shards, "shards", 1)
        slices_ok = check.integer(self.slices, "slices", 1)
        if check.integer(self.seed, "seed", 0):
            check(self.seed < 2**63, f"seed must be in [0, 2**63), got {self.seed!r}")
        check(self.placement in ("uniform", "late_slices", "dedicated_shards"),
              f"placement must be uniform, late_slices or dedicated_shards, got {self.placement!r}")
        check.finite(self.prior_threshold, "prior_threshold")
        if self.placement == "late_slices" and slices_ok:
            check(_is_int(self.late_slices) and 1 <= self.late_slices < self.slices,
                  f"late_slices must be in [1, slices), got {self.late_slices!r} with "
                  f"slices={self.slices}")
        if self.placement == "dedicated_shards" and shards_ok:
            check(_is_int(self.dedicated_shards) and 1 <= self.dedicated_shards < self.shards,
                  f"dedicated_shards must be in [1, shards), got {self.dedicated_shards!r} "
                  f"with shards={self.shards}")
        check.raise_all()


def _check_amount(value: float, name: str, check: _Checks) -> None:
    """A Ray resource amount: finite, >= 0, and whole above 1 (Ray refuses 1.5 CPUs)."""
    if check.finite(value, name) and check(value >= 0, f"{name} must be >= 0, got {value!r}"):
        check(value <= 1 or float(value).is_integer(),
              f"{name} must be a whole number when above 1 (Ray's rule), got {value!r}")


_HIDDEN = "Hidden layer widths, comma-separated; empty for a logistic model."


def _check_lora(config: Any, check: _Checks) -> None:
    """The adapter options the lora and causal_lm backends share."""
    check.integer(config.lora_r, "lora_r", 1)
    check.integer(config.lora_alpha, "lora_alpha", 1)
    if check.finite(config.lora_dropout, "lora_dropout"):
        check(0 <= config.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {config.lora_dropout!r}")
    check(bool(config.lora_target_modules) and all(config.lora_target_modules),
          f"lora_target_modules must name at least one module, got {config.lora_target_modules!r}")


def _check_hidden_sizes(sizes: tuple[int, ...], check: _Checks) -> None:
    check(all(_is_int(h) and h >= 1 for h in sizes),
          f"hidden_sizes must all be integers >= 1, got {sizes!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """How each shard model is trained. Use a backend's class (`MLPConfig`, `HeadConfig`,
    `LoraConfig`) or `training_config(backend, ...)`; every field changes the weights."""

    backend: ClassVar[str] = ""
    task: ClassVar[str] = "classification"  # what the store learns (see sisa.tasks)
    input_kind: ClassVar[InputKind] = "features"  # what the data must provide
    summary: ClassVar[str] = ""

    epochs_per_slice: int = option(5, "Epochs run over slices 0..k after adding slice k.",
                                   flag="epochs")
    batch_size: int = option(32, "Examples per optimizer step.")
    learning_rate: float = option(1e-3, "AdamW learning rate.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    torch_threads: int = option(1, "Torch threads per shard; fixed, so every executor computes the "
                                   "same floats.")

    def __post_init__(self) -> None:
        if not self.backend:
            raise ConfigError("TrainingConfig is the base class: use MLPConfig, HeadConfig, "
                              "LoraConfig or CausalLMConfig, or training_config(backend, ...)")
        for f in dataclasses.fields(self):  # tuples survive JSON as lists: normalise them
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        check = _Checks(f"{self.backend} training config")
        self._validate(check)
        check.raise_all()

    def _validate(self, check: _Checks) -> None:
        check.integer(self.epochs_per_slice, "epochs_per_slice", 1)
        check.integer(self.batch_size, "batch_size", 1)
        lr = self.learning_rate
        lr_ok = check.finite(lr, "learning_rate") and check(
            0 < lr <= MAX_LEARNING_RATE, f"learning_rate must be > 0 and <= {MAX_LEARNING_RATE:g} "
                                         f"(AdamW moves each weight by about that much a step), got {lr!r}")
        wd = self.weight_decay
        if check.finite(wd, "weight_decay") and check(wd >= 0, f"weight_decay must be >= 0, got {wd!r}") \
                and lr_ok:
            check(lr * wd <= 1, f"weight_decay * learning_rate must be <= 1 (AdamW multiplies each "
                                f"weight by 1 - their product every step), got {wd!r} * {lr!r}")
        if check.integer(self.torch_threads, "torch_threads", 1):
            check(self.torch_threads <= MAX_TORCH_THREADS, f"torch_threads must be <= "
                  f"{MAX_TORCH_THREADS} (torch crashes on far more), got {self.torch_threads!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class MLPConfig(TrainingConfig):
    """`mlp`: a torch MLP over numeric feature columns."""

    backend: ClassVar[str] = "mlp"
    input_kind: ClassVar[InputKind] = "features"
    summary: ClassVar[str] = "a torch MLP over numeric feature columns"

    hidden_sizes: tuple[int, ...] = option((64,), _HIDDEN)

    def _validate(self, check: _Checks) -> None:
        super()._validate(check)
        _check_hidden_sizes(self.hidden_sizes, check)


@dataclass(frozen=True)
class TextModelConfig(TrainingConfig):
    """Options shared by the backends that run a pretrained text model."""

    input_kind: ClassVar[InputKind] = "text"

    model: str = option("all-MiniLM-L6-v2", "Model directory, a hub id already in the local cache, "
                                            "or a packaged model (all-MiniLM-L6-v2; for causal_lm "
                                            "SmolLM2-135M-Instruct); never downloaded.")
    max_length: int = option(128, "Tokens per text; longer texts are truncated.")

    def _validate(self, check: _Checks) -> None:
        super()._validate(check)
        check(isinstance(self.model, str) and bool(self.model), f"model must be given, got {self.model!r}")
        check.integer(self.max_length, "max_length", 8)


@dataclass(frozen=True)
class HeadConfig(TextModelConfig):
    """`head`: a frozen encoder embeds each text once (cached); each shard trains a small head."""

    backend: ClassVar[str] = "head"
    summary: ClassVar[str] = "a frozen encoder's cached embeddings, and a logistic or MLP head"

    # A logistic head for 10 epochs at 3e-3 learns a small text task where a 64-unit MLP at 1e-3
    # for 5 epochs stays near the majority class.
    epochs_per_slice: int = _override(TrainingConfig, "epochs_per_slice", 10)
    learning_rate: float = _override(TrainingConfig, "learning_rate", 3e-3)
    hidden_sizes: tuple[int, ...] = option((), _HIDDEN)

    def _validate(self, check: _Checks) -> None:
        super()._validate(check)
        _check_hidden_sizes(self.hidden_sizes, check)


@dataclass(frozen=True)
class LoraConfig(TextModelConfig):
    """`lora`: one peft LoRA adapter (and classification head) per shard on a frozen base."""

    backend: ClassVar[str] = "lora"
    summary: ClassVar[str] = "a peft LoRA adapter and classification head per shard, one frozen base"

    # What trains on a 2-core CPU in minutes (about 0.6 s a step on MiniLM) and learns.
    epochs_per_slice: int = _override(TrainingConfig, "epochs_per_slice", 2)
    batch_size: int = _override(TrainingConfig, "batch_size", 16)
    learning_rate: float = _override(TrainingConfig, "learning_rate", 2e-3)
    max_length: int = _override(TextModelConfig, "max_length", 64)
    lora_r: int = option(8, "Adapter rank.")
    lora_alpha: int = option(16, "Adapter scaling numerator (scale = alpha / r).")
    lora_dropout: float = option(0.1, "Dropout on the adapter's input.")
    lora_target_modules: tuple[str, ...] = option(("query", "value"),
                                                  "Adapted linear layers, comma-separated.")
    bf16: bool = option(False, "bf16 autocast on CUDA.")

    def _validate(self, check: _Checks) -> None:
        super()._validate(check)
        _check_lora(self, check)


Combine = Literal["mean", "product", "merged"]
COMBINES: tuple[str, ...] = ("mean", "product", "merged")


@dataclass(frozen=True)
class CausalLMConfig(TextModelConfig):
    """`causal_lm`: one peft LoRA adapter per shard on a frozen causal language model, trained with
    the next-token loss (on the response only, where the data names a prompt column)."""

    backend: ClassVar[str] = "causal_lm"
    task: ClassVar[str] = "causal_lm"
    summary: ClassVar[str] = "a peft LoRA adapter per shard on a frozen causal LM (next-token loss)"

    model: str = _override(TextModelConfig, "model", "SmolLM2-135M-Instruct")  # packaged as GGUF
    epochs_per_slice: int = _override(TrainingConfig, "epochs_per_slice", 2)
    batch_size: int = _override(TrainingConfig, "batch_size", 8)
    max_length: int = _override(TextModelConfig, "max_length", 96)
    lora_r: int = option(8, "Adapter rank.")
    lora_alpha: int = option(16, "Adapter scaling numerator (scale = alpha / r).")
    lora_dropout: float = option(0.0, "Dropout on the adapter's input.")
    # Every linear layer of a Llama-style block (as QLoRA does): on SmolLM2 it memorises a canary
    # seen 24 times to 11-12 bits of exposure where q_proj,v_proj alone reach 8-9.
    lora_target_modules: tuple[str, ...] = option(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "Adapted linear layers, comma-separated.")
    top_k_layers: int = option(0, "Adapt only the top k transformer layers (0: all). The frozen "
                                  "layers below are run once per text and cached in the store, so "
                                  "training runs only the top k.")
    bf16: bool = option(False, "bf16 autocast on CUDA.")

    def _validate(self, check: _Checks) -> None:
        super()._validate(check)
        _check_lora(self, check)
        check.integer(self.top_k_layers, "top_k_layers", 0)


TRAINING_CONFIGS: dict[str, type[TrainingConfig]] = {
    c.backend: c for c in (MLPConfig, HeadConfig, LoraConfig, CausalLMConfig)
}


def training_config(backend: str, **values: Any) -> TrainingConfig:
    """The training config of `backend`; an option the backend does not have is an error."""
    cls = TRAINING_CONFIGS.get(backend)
    if cls is None:
        raise ConfigError(f"unknown backend {backend!r}; choose from {sorted(TRAINING_CONFIGS)}")
    known = {f.name for f in dataclasses.fields(cls)}
    foreign = sorted(set(values) - known)
    if foreign:
        raise ConfigError(f"option(s) {foreign} do not apply to backend {backend!r}; it takes "
                          f"{sorted(known)}")
    return cls(**values)


@dataclass(frozen=True)
class ExecutionConfig:
    """Where shard jobs run. Never changes the weights, so it is not part of the digest."""

    executor: Executor = option("local", "local (in this process) or ray (one Ray task per shard).")
    ray_address: str | None = option(None, "An existing Ray cluster's address; default: start a "
                                           "private one on 127.0.0.1.")
    ray_temp_dir: str | None = option(
        None, "Local Ray's temp dir: yours, not group- or world-writable; default: a fresh private "
        "dir under the system temp dir, removed after.")
    cpus_per_shard: float = option(1.0, "Ray CPUs reserved by each shard task.")
    gpus_per_shard: float = option(0.0, "Ray GPUs reserved by each shard task (0.25: four shards "
                                        "share a GPU); 0 trains on the CPU.")
    resources_per_shard: dict[str, float] = option({}, "Custom Ray resources per shard task.",
                                                   cli=False)
    max_retries: int = option(2, "Extra attempts for a failing shard before the error surfaces.")
    progress: bool = option(True, "Show progress bars on long work.", cli=False)

    def __post_init__(self) -> None:
        check = _Checks("execution config")
        check(self.executor in ("local", "ray"), f"executor must be 'local' or 'ray', got {self.executor!r}")
        for name in ("cpus_per_shard", "gpus_per_shard"):
            _check_amount(getattr(self, name), name, check)
        resources = self.resources_per_shard
        if check(isinstance(resources, dict), f"resources_per_shard must map resource names to "
                                              f"amounts, got {resources!r}"):
            for key, amount in resources.items():
                _check_amount(amount, f"resources_per_shard[{key!r}]", check)
        check.integer(self.max_retries, "max_retries", 0)
        check.raise_all()

    @property
    def device(self) -> Literal["cpu", "cuda"]:
        """The device shard jobs ask for (a job falls back to the CPU where there is no GPU)."""
        return "cuda" if self.gpus_per_shard > 0 else "cpu"


@dataclass(frozen=True)
class DataSpec:
    """Which input columns hold the record id, target, inputs and optional group and prior."""

    id_column: str = option("id", "Column with the stable record id.")
    label_column: str | None = option("label", "Column with the class label.")
    text_column: str | None = option(None, "Column with the input text (text backends).")
    feature_columns: tuple[str, ...] = option((), "Numeric input columns, comma-separated (mlp).")
    group_column: str | None = option(None, "Column with a group (user) id; a group stays in one "
                                            "shard, and can be forgotten as a whole.")
    prior_column: str | None = option(None, "Column with a number per record: how likely it is to be "
                                            "deleted (deletion-aware placement).")
    prompt_column: str | None = option(None, "causal_lm: column with a prompt; the model learns the "
                                             "text that follows it (the loss skips the prompt).")
    messages_column: str | None = option(
        None, "causal_lm: column with one conversation per record, a list of {role, content} "
              "messages (roles system, user, assistant; in CSV, that list as JSON text), formatted "
              "by the model's chat template; the loss covers the assistant turns only. Instead of "
              "a text column.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_columns", tuple(self.feature_columns))
        check = _Checks("data spec")
        check(bool(self.id_column), "id_column must be given")
        given = [v for v in (self.text_column, self.messages_column, self.feature_columns) if v]
        check(len(given) == 1,
              "give exactly one of text_column or feature_columns (or a causal LM's messages_column), "
              f"got text_column={self.text_column!r}, feature_columns={list(self.feature_columns)!r}"
              + (f", messages_column={self.messages_column!r}" if self.messages_column else ""))
        if self.messages_column is not None:
            check(self.prompt_column is None,
                  "messages_column holds whole conversations (the user turns are the prompts): "
                  f"give no prompt_column, got {self.prompt_column!r}")
        else:
            check(self.prompt_column is None or self.text_column is not None,
                  "prompt_column needs a text_column (the text that follows the prompt)")
        check.raise_all()

    @property
    def kind(self) -> InputKind:
        return "features" if self.feature_columns else "text"

    @property
    def input_column(self) -> str | None:
        """The column holding a text model's input: the text, or the conversation."""
        return self.messages_column or self.text_column

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SisaConfig:
    """Everything a store is trained and served with."""

    partition: PartitionConfig = field(default_factory=PartitionConfig, metadata={
        "help": "Where each record goes (shards, slices, seed, placement).", "cli": False})
    training: TrainingConfig = field(default_factory=lambda: MLPConfig(), metadata={
        "help": "How each shard model is trained: a backend's training config.", "cli": False})
    execution: ExecutionConfig = field(default_factory=ExecutionConfig, metadata={
        "help": "Where shard jobs run (never changes the weights).", "cli": False})
    voting: Voting = option("soft", "Ensemble voting: soft (mean probability) or hard (majority).")
    combine: Combine = option(
        "mean", "How a causal LM's shards combine by default: mean (mixture of their next-token "
                "probabilities), product (normalised geometric mean), or merged (one adapter "
                "merged from theirs: one forward pass per token whatever the shard count).")

    def __post_init__(self) -> None:
        if not isinstance(self.training, TrainingConfig):
            raise ConfigError(f"training must be a backend's training config, got {self.training!r}")
        if self.voting not in ("soft", "hard"):
            raise ConfigError(f"voting must be 'soft' or 'hard', got {self.voting!r}")
        if self.combine not in COMBINES:
            raise ConfigError(f"combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")

    def digest(self) -> str:
        """Digest of every setting that changes the weights (partition and training)."""
        payload = {"partition": dataclasses.asdict(self.partition), "training": self.training.to_dict()}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"partition": dataclasses.asdict(self.partition), "training": self.training.to_dict(),
                "execution": dataclasses.asdict(self.execution), "voting": self.voting,
                "combine": self.combine}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SisaConfig:
        training = dict(data.get("training", {}))
        try:
            return cls(
                partition=PartitionConfig(**data.get("partition", {})),
                training=training_config(training.pop("backend", "mlp"), **training),
                execution=ExecutionConfig(**data.get("execution", {})),
                voting=data.get("voting", "soft"),
                combine=data.get("combine", "mean"),
            )
        except TypeError as exc:  # an unknown key
            raise ConfigError(f"invalid config: {exc}") from exc

    def replace(self, **changes: Any) -> SisaConfig:
        return dataclasses.replace(self, **changes)


KEY_FILE_ENV = "SISA_KEY_FILE"  # a store's key file, from the environment
WITNESS_ENV = "SISA_WITNESS"  # a store's witness, from the environment


@dataclass(frozen=True)
class StoreConfig:
    """Where a store's ledger key and its witness are kept, when not in the store (every command
    that opens a store takes these; each also comes from the environment)."""

    key_file: str | None = option(
        None, "File holding the store's ledger key, kept outside the store (mode 600; default: "
              "$SISA_KEY_FILE). A store created with one holds no key, so whoever can write its "
              "database cannot re-seal it.")
    witness: str | None = option(
        None, "File outside the store that witnesses its deletions (default: $SISA_WITNESS): "
              "every acknowledgement is written there before it returns, so a store restored from "
              "a backup gets them applied again.")

    def __post_init__(self) -> None:
        check = _Checks("store settings")
        for name in ("key_file", "witness"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, str) and bool(value)),
                  f"{name} must be a path, got {value!r}")
        check.raise_all()

    def resolved(self) -> StoreConfig:
        """These settings, with the environment's where none was given."""
        import os

        return StoreConfig(key_file=self.key_file or os.environ.get(KEY_FILE_ENV) or None,
                           witness=self.witness or os.environ.get(WITNESS_ENV) or None)


TOKEN_ENV = "SISA_SERVE_TOKEN"  # the service's bearer token, from the environment
OnPending = Literal["exclude", "wait"]
ReplicaStore = Literal["auto", "shared", "fetch"]
WorkerPlace = Literal["process", "thread"]
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServiceConfig:
    """How `sisa serve` runs: where it listens, who may delete, what it accepts, and what it does
    while a shard retrains. Deletion and admin endpoints need `token`, unless `no_auth`."""

    host: str = option("127.0.0.1", "Interface to listen on; another than loopback exposes the "
                                    "service to the network.")
    port: int = option(8000, "Port to listen on.")
    token: str | None = field(default=None, repr=False, metadata={
        "help": "Bearer token of the protected endpoints (from --token-file or SISA_SERVE_TOKEN).",
        "flag": None, "cli": False, "negate": False})
    no_auth: bool = option(False, "Serve deletion and admin endpoints with no token (a trusted "
                                  "host only).")
    protect_predict: bool = option(False, "Predict, generate and score need the token too.")
    deletions: bool = option(True, "Serve predictions only: no deletion endpoints, no worker.",
                             flag="no_deletions", negate=True)
    on_pending: OnPending = option(
        "exclude", "While a deleted record's shard retrains: exclude (answer without it) or wait "
                   "(hold requests until it is live, up to --wait-timeout).")
    wait_timeout: float = option(30.0, "Seconds a request may wait (--on-pending wait).")
    max_body_bytes: int = option(1 << 20, "Largest request body accepted (larger: 413).")
    max_batch: int = option(256, "Most inputs, prompts or texts in one request.")
    max_deletion_ids: int = option(10_000, "Most record ids in one deletion request.")
    max_new_tokens: int = option(256, "Cap on the tokens one generation request may ask for.")
    batch_window: float = option(0.2, "Seconds the deletion worker waits for more deletions to "
                                      "apply together.")
    poll_interval: float = option(1.0, "Seconds between the worker's looks for deletions other "
                                       "processes acknowledged.")
    worker: WorkerPlace = option(
        "process", "Where the deletion worker retrains: process (its own, so retraining never "
                   "competes with requests for the interpreter) or thread (in the service's). "
                   "With --ray it runs in the driver.")
    worker_nice: int = option(10, "Niceness of the deletion worker's process (0-19; --worker "
                                  "process): higher leaves the CPU to requests while a shard "
                                  "retrains, which then takes longer on a busy machine.")
    ray: bool = option(False, "Run on Ray Serve (a local Ray on 127.0.0.1, or --ray-address).")
    replicas: int = option(2, "Ray Serve replicas (--ray).")
    replica_cpus: float = option(1.0, "Ray CPUs per replica (--ray).")
    replica_store: ReplicaStore = option(
        "auto", "How Ray Serve replicas reach the store (--ray): shared (each opens its directory: "
                "one machine, or a file system all nodes share), fetch (through a keeper on the "
                "driver's node, checkpoints sent by digest: no shared file system) or auto "
                "(shared on the driver's node, fetch on the others).")
    replica_resources: dict[str, float] = option(
        {}, "Custom Ray resources each replica reserves (--ray): places replicas on the nodes "
            "that have them.", cli=False)
    log_level: str = option("info", "debug, info, warning or error.")

    def __post_init__(self) -> None:
        check = _Checks("service settings")
        if check.integer(self.port, "port", 0):
            check(self.port <= 65535, f"port must be 0..65535, got {self.port!r}")
        check(self.on_pending in ("exclude", "wait"),
              f"on_pending must be 'exclude' or 'wait', got {self.on_pending!r}")
        check(self.worker in ("process", "thread"),
              f"worker must be 'process' or 'thread', got {self.worker!r}")
        if check.integer(self.worker_nice, "worker_nice", 0):
            check(self.worker_nice <= 19, f"worker_nice must be 0..19, got {self.worker_nice!r}")
        for name in ("max_body_bytes", "max_batch", "max_deletion_ids", "max_new_tokens", "replicas"):
            check.integer(getattr(self, name), name, 1)
        check(self.replica_store in ("auto", "shared", "fetch"),
              f"replica_store must be 'auto', 'shared' or 'fetch', got {self.replica_store!r}")
        if check(isinstance(self.replica_resources, dict), "replica_resources must map resource "
                 f"names to amounts, got {self.replica_resources!r}"):
            for key, amount in self.replica_resources.items():
                _check_amount(amount, f"replica_resources[{key!r}]", check)
        for name in ("wait_timeout", "batch_window", "poll_interval", "replica_cpus"):
            if check.finite(getattr(self, name), name):
                check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        check(self.log_level in LOG_LEVELS,
              f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.token is not None and len(self.token) < 16:
            check(False, "the token is shorter than 16 characters: use a long random one "
                         "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        check(not (self.token and self.no_auth), "give a token or no_auth, not both")
        check(not self.protect_predict or bool(self.token), "protect_predict needs a token")
        check(not (self.deletions and not self.token and not self.no_auth),
              f"the deletion and admin endpoints need a bearer token: set {TOKEN_ENV} or give a "
              "token file; or serve predictions only (no deletions), or turn authentication off "
              "explicitly (no_auth, on a trusted host only)")
        check.raise_all()

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"
