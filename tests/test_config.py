"""Every config class in one table: defaults, each validation error, dict round trip, digest."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from sisa import (
    ConfigError,
    DataSpec,
    ExecutionConfig,
    HeadConfig,
    LoraConfig,
    MLPConfig,
    PartitionConfig,
    SisaConfig,
    TrainingConfig,
    training_config,
)
from sisa.config import TRAINING_CONFIGS, CausalLMConfig, ServiceConfig
from sisa.training import BACKENDS

# Every config class of sisa.config: each field has help, defaults hold, each error is named.
CLASSES = [PartitionConfig, MLPConfig, HeadConfig, LoraConfig, CausalLMConfig, ExecutionConfig,
           DataSpec, SisaConfig, ServiceConfig]
TOKEN = "a-token-long-enough-0123"

# class, a default each backend must keep (what works for it)
DEFAULTS = [
    (PartitionConfig, {"shards": 4, "slices": 4, "seed": 0, "placement": "uniform"}),
    (MLPConfig, {"epochs_per_slice": 5, "learning_rate": 1e-3, "hidden_sizes": (64,)}),
    (HeadConfig, {"epochs_per_slice": 10, "learning_rate": 3e-3, "hidden_sizes": (),
                  "model": "all-MiniLM-L6-v2", "max_length": 128}),
    (LoraConfig, {"epochs_per_slice": 2, "batch_size": 16, "learning_rate": 2e-3, "max_length": 64,
                  "lora_r": 8, "lora_target_modules": ("query", "value")}),
    (ExecutionConfig, {"executor": "local", "ray_address": None, "max_retries": 2}),
    (DataSpec, {"id_column": "id", "label_column": "label"}),
    (CausalLMConfig, {"model": "SmolLM2-135M-Instruct", "epochs_per_slice": 2, "batch_size": 8,
                      "max_length": 96, "lora_dropout": 0.0, "top_k_layers": 0}),
    (SisaConfig, {"voting": "soft"}),
    (ServiceConfig, {"host": "127.0.0.1", "port": 8000, "on_pending": "exclude", "max_batch": 256,
                     "max_body_bytes": 1 << 20, "ray": False, "replicas": 2, "log_level": "info"}),
]

# class, valid base arguments, the bad field and value, a fragment of the message
INVALID = [
    (PartitionConfig, {}, "shards", 0, "shards must be >= 1, got 0"),
    (PartitionConfig, {}, "slices", -1, "slices must be >= 1, got -1"),
    (PartitionConfig, {}, "seed", 2**63, "seed must be in [0, 2**63)"),
    (PartitionConfig, {}, "placement", "random", "placement must be uniform"),
    (PartitionConfig, {}, "prior_threshold", math.nan, "prior_threshold must be a finite number"),
    (PartitionConfig, {"placement": "late_slices"}, "late_slices", 4, "late_slices must be in [1, slices)"),
    (PartitionConfig, {"placement": "dedicated_shards"}, "dedicated_shards", 0,
     "dedicated_shards must be in [1, shards)"),
    (MLPConfig, {}, "epochs_per_slice", 0, "epochs_per_slice must be >= 1"),
    (MLPConfig, {}, "batch_size", 0, "batch_size must be >= 1"),
    (MLPConfig, {}, "learning_rate", math.inf, "learning_rate must be a finite number, got inf"),
    (MLPConfig, {}, "learning_rate", -1e-3, "learning_rate must be > 0"),
    (MLPConfig, {}, "weight_decay", -0.1, "weight_decay must be >= 0"),
    (MLPConfig, {}, "torch_threads", 0, "torch_threads must be >= 1"),
    (MLPConfig, {}, "hidden_sizes", (8, 0), "hidden_sizes must all be integers >= 1"),
    (HeadConfig, {}, "max_length", 4, "max_length must be >= 8"),
    (HeadConfig, {}, "model", "", "model must be given"),
    (LoraConfig, {}, "lora_r", 0, "lora_r must be >= 1"),
    (LoraConfig, {}, "lora_alpha", 0, "lora_alpha must be >= 1"),
    (LoraConfig, {}, "lora_dropout", 1.0, "lora_dropout must be in [0, 1)"),
    (LoraConfig, {}, "lora_target_modules", (), "lora_target_modules must name at least one module"),
    (ExecutionConfig, {}, "executor", "spark", "executor must be 'local' or 'ray'"),
    (ExecutionConfig, {}, "cpus_per_shard", -1.0, "cpus_per_shard must be >= 0"),
    (ExecutionConfig, {}, "gpus_per_shard", math.nan, "gpus_per_shard must be a finite number"),
    (ExecutionConfig, {}, "max_retries", -1, "max_retries must be >= 0"),
    # Finite and in range (a learning rate of 1e300 overflows AdamW; NaN trains NaN models), and
    # integers that a config file gave as text or floats are refused, not compared.
    (PartitionConfig, {}, "prior_threshold", math.inf, "prior_threshold must be a finite number, got inf"),
    (PartitionConfig, {}, "shards", "4", "shards must be an integer >= 1, got '4'"),
    (PartitionConfig, {}, "slices", 2.0, "slices must be an integer >= 1, got 2.0"),
    (PartitionConfig, {"placement": "late_slices"}, "late_slices", "1", "late_slices must be in [1, slices)"),
    (MLPConfig, {}, "learning_rate", math.nan, "learning_rate must be a finite number, got nan"),
    (MLPConfig, {}, "learning_rate", 1e300, "learning_rate must be > 0 and <= 10"),
    (MLPConfig, {}, "learning_rate", True, "learning_rate must be a finite number, got True"),
    (MLPConfig, {}, "weight_decay", -math.inf, "weight_decay must be a finite number, got -inf"),
    (MLPConfig, {"learning_rate": 0.5}, "weight_decay", 3.0, "weight_decay * learning_rate must be <= 1"),
    (MLPConfig, {}, "torch_threads", 10**6, "torch_threads must be <= 1024"),
    (MLPConfig, {}, "batch_size", 8.5, "batch_size must be an integer >= 1, got 8.5"),
    (LoraConfig, {}, "lora_dropout", math.nan, "lora_dropout must be a finite number, got nan"),
    (LoraConfig, {}, "lora_dropout", -0.1, "lora_dropout must be in [0, 1)"),
    (CausalLMConfig, {}, "top_k_layers", -1, "top_k_layers must be >= 0, got -1"),
    (ExecutionConfig, {}, "cpus_per_shard", math.inf, "cpus_per_shard must be a finite number, got inf"),
    (ExecutionConfig, {}, "cpus_per_shard", 1.5, "cpus_per_shard must be a whole number when above 1"),
    (ExecutionConfig, {}, "gpus_per_shard", -0.25, "gpus_per_shard must be >= 0"),
    (ExecutionConfig, {}, "resources_per_shard", {"tpu": math.nan},
     "resources_per_shard['tpu'] must be a finite number, got nan"),
    (DataSpec, {"feature_columns": ("f0",)}, "id_column", "", "id_column must be given"),
    (DataSpec, {"feature_columns": ("f0",)}, "text_column", "text",
     "give exactly one of text_column or feature_columns"),
    (SisaConfig, {}, "voting", "majority", "voting must be 'soft' or 'hard'"),
    (SisaConfig, {}, "training", {"backend": "mlp"}, "training must be a backend's training config"),
    (ServiceConfig, {"token": TOKEN}, "port", 70000, "port must be 0..65535, got 70000"),
    (ServiceConfig, {"token": TOKEN}, "on_pending", "queue", "on_pending must be 'exclude' or 'wait'"),
    (ServiceConfig, {"token": TOKEN}, "max_batch", 0, "max_batch must be >= 1, got 0"),
    (ServiceConfig, {"token": TOKEN}, "wait_timeout", -1.0, "wait_timeout must be >= 0"),
    (ServiceConfig, {"token": TOKEN}, "batch_window", math.nan, "batch_window must be a finite number"),
    (ServiceConfig, {"token": TOKEN}, "replicas", 0, "replicas must be >= 1, got 0"),
    (ServiceConfig, {"token": TOKEN}, "log_level", "loud", "log_level must be one of debug"),
    (ServiceConfig, {}, "token", "short", "the token is shorter than 16 characters"),
    (ServiceConfig, {"token": TOKEN}, "no_auth", True, "give a token or no_auth, not both"),
    (ServiceConfig, {}, "protect_predict", True, "protect_predict needs a token"),
    (ServiceConfig, {}, "deletions", True, "the deletion and admin endpoints need a bearer token"),
]


@pytest.mark.parametrize(("cls", "expected"), DEFAULTS, ids=lambda x: getattr(x, "__name__", ""))
def test_defaults(cls, expected):
    needs = {DataSpec: {"feature_columns": ("f0",)}, ServiceConfig: {"token": TOKEN}}
    config = cls(**needs.get(cls, {}))
    for name, value in expected.items():
        assert getattr(config, name) == value, name


@pytest.mark.parametrize(("cls", "base", "field", "value", "message"), INVALID,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, _, f, v, _ in INVALID])
def test_each_invalid_value_is_named(cls, base, field, value, message):
    with pytest.raises(ConfigError) as info:
        cls(**{**base, field: value})
    assert message in str(info.value)


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as info:
        MLPConfig(epochs_per_slice=0, batch_size=0, learning_rate=-1.0)
    text = str(info.value)
    assert "epochs_per_slice" in text and "batch_size" in text and "learning_rate" in text


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_the_base_training_config_is_abstract_and_every_backend_has_one():
    with pytest.raises(ConfigError, match="base class"):
        TrainingConfig()
    assert set(TRAINING_CONFIGS) == set(BACKENDS) == {"mlp", "head", "lora", "causal_lm"}
    with pytest.raises(ConfigError, match=r"\['lora_r'\] do not apply to backend 'mlp'"):
        training_config("mlp", lora_r=4)
    with pytest.raises(ConfigError, match="unknown backend 'svm'"):
        training_config("svm")


@pytest.mark.parametrize("training", [MLPConfig(hidden_sizes=(16, 8)), HeadConfig(),
                                      LoraConfig(lora_target_modules=("q", "v")),
                                      CausalLMConfig(top_k_layers=2)],
                         ids=lambda t: t.backend)
def test_dict_round_trip(training):
    config = SisaConfig(partition=PartitionConfig(shards=8, placement="late_slices", late_slices=2),
                        training=training, execution=ExecutionConfig(executor="ray"), voting="hard")
    data = config.to_dict()
    assert data["training"]["backend"] == training.backend
    import json

    again = SisaConfig.from_dict(json.loads(json.dumps(data)))  # tuples come back as lists
    assert again == config and again.digest() == config.digest()
    with pytest.raises(ConfigError, match="invalid config"):
        SisaConfig.from_dict({**data, "partition": {**data["partition"], "bogus": 1}})


def test_digest_is_stable_and_covers_exactly_what_changes_the_weights():
    base = SisaConfig()
    # The digest enters every checkpoint key: it must not drift between versions unnoticed.
    assert base.digest() == "295bb18f4de023658e8ddab23b4f757c"
    assert base.replace(execution=ExecutionConfig(executor="ray", max_retries=5)).digest() == base.digest()
    assert base.replace(voting="hard").digest() == base.digest()
    for name, value in [("shards", 5), ("slices", 2), ("seed", 1)]:
        change: dict[str, Any] = {name: value}
        changed = base.replace(partition=dataclasses.replace(base.partition, **change))
        assert changed.digest() != base.digest(), name
    for f in dataclasses.fields(MLPConfig):
        value = getattr(base.training, f.name)
        other = (16,) if isinstance(value, tuple) else value * 2 if value else 0.5
        change = {f.name: other}
        changed = base.replace(training=dataclasses.replace(base.training, **change))
        assert changed.digest() != base.digest(), f.name
    assert SisaConfig(training=HeadConfig()).digest() != SisaConfig(training=LoraConfig()).digest()


def test_values_at_the_edges_of_their_ranges_are_accepted():
    MLPConfig(learning_rate=10.0, weight_decay=0.1, torch_threads=1024)
    MLPConfig(learning_rate=0.5, weight_decay=2.0)  # their product is 1: still a valid AdamW step
    ExecutionConfig(cpus_per_shard=0.5, gpus_per_shard=2.0, resources_per_shard={"tpu": 0.25})
    PartitionConfig(prior_threshold=-3.0)
