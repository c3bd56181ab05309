"""Transformer backends (`head`, `lora`) on a tiny random-config BERT: exactness, round trips,
voting, the embedding cache, and the LoRA multi-adapter scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shard_store import ShardStore
from sisa import ConfigError, ExecutionConfig, HeadConfig, LoraConfig, PartitionConfig, Sisa, SisaConfig

from .conftest import TEXT_SPEC, assert_exact, make_text_rows

BACKENDS = ["head", "lora"]


def text_config(model: str, backend: str) -> SisaConfig:
    common = {"model": model, "epochs_per_slice": 2, "batch_size": 8, "learning_rate": 1e-2,
              "max_length": 32}
    training = HeadConfig(**common, hidden_sizes=()) if backend == "head" else \
        LoraConfig(**common, lora_r=2)
    return SisaConfig(partition=PartitionConfig(shards=2, slices=2, seed=5), training=training,
                      execution=ExecutionConfig(progress=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forget_equals_scratch(tmp_path, tiny_model, text_rows, backend):
    config = text_config(tiny_model, backend)
    sisa = Sisa.train(tmp_path / "store", text_rows, config, TEXT_SPEC)
    victims = [text_rows[4]["id"], text_rows[33]["id"], text_rows[50]["id"]]
    receipt = sisa.forget(victims)
    assert receipt.affected_shards
    assert_exact(sisa, [r for r in text_rows if r["id"] not in victims], config, TEXT_SPEC,
                 tmp_path / "scratch")
    assert sisa.audit().ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_round_trip(tmp_path, tiny_model, text_rows, backend):
    config = text_config(tiny_model, backend)
    sisa = Sisa.train(tmp_path / "store", text_rows, config, TEXT_SPEC)
    model = sisa.shard_model(0)  # the live checkpoint, restored with its optimizer state
    tensors, meta = model.state()
    assert any(k.startswith("optim.") for k in tensors) and "rng.torch_cpu" in tensors
    again = sisa.shard_model(0)
    again.load_state(load_safetensors(save_safetensors(tensors)), meta)
    inputs = sisa.model_inputs([r["text"] for r in text_rows[:10]])
    assert torch.equal(model.predict_proba(inputs), again.predict_proba(inputs))
    for name, value in again.state()[0].items():
        if name != "rng.torch_cpu":
            assert torch.equal(value, tensors[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_voting_is_the_mean_of_the_shard_models(tmp_path, tiny_model, text_rows, backend):
    config = text_config(tiny_model, backend)
    sisa = Sisa.train(tmp_path / "store", text_rows, config, TEXT_SPEC)
    texts = [r["text"] for r in text_rows[:12]]
    per_shard = sisa.ensemble().shard_proba(texts)
    np.testing.assert_allclose(sisa.predict_proba(texts), np.mean(list(per_shard.values()), 0))
    # Each shard's column of the ensemble equals that shard's model used on its own.
    inputs = sisa.model_inputs(texts)
    for shard in sisa.live_checkpoints():
        alone = sisa.shard_model(shard).predict_proba(inputs)
        np.testing.assert_allclose(per_shard[shard], alone.double().numpy(), atol=1e-5)


@pytest.mark.parametrize("backend", ["mlp", *BACKENDS])
def test_a_backend_is_known_before_it_is_built(tmp_path, tiny_model, text_rows, backend):
    """A store opened for its audit or receipts builds no backend (no torch import): the name,
    shape and fingerprint it uses then are the built backend's; a text store reopened that way
    still encodes, audits and predicts as the one that trained it."""
    from sisa import MLPConfig
    from sisa.tasks import ModelSpec
    from sisa.training import LazyBackend, backend_fingerprint, resolve_backend

    training = MLPConfig() if backend == "mlp" else text_config(tiny_model, backend).training
    built = resolve_backend(training, ModelSpec(num_classes=2, input_dim=4 if backend == "mlp" else None))
    lazy = LazyBackend(training, built.spec)
    assert backend_fingerprint(training) == lazy.fingerprint() == built.fingerprint()
    assert (lazy.name, lazy.spec) == (built.name, built.spec)
    assert (lazy.encoder is None) == (built.encoder is None)
    if backend == "mlp":
        return
    config = text_config(tiny_model, backend)
    texts = [r["text"] for r in text_rows[:6]]
    with Sisa.train(tmp_path / "store", text_rows, config, TEXT_SPEC) as trained:
        expected = trained.predict_proba(texts)
    with Sisa.open(tmp_path / "store", recover=False, read_only=True) as sisa:
        assert sisa.verify_receipts().ok and sisa.audit().ok
        np.testing.assert_array_equal(sisa.predict_proba(texts), expected)


def test_head_embeddings_are_cached_and_never_recomputed(tmp_path, tiny_model, text_rows):
    config = text_config(tiny_model, "head")
    sisa = Sisa.train(tmp_path / "store", text_rows, config, TEXT_SPEC)
    encoder = sisa.encoder
    assert encoder.encoded == len(text_rows)
    store = ShardStore.open(sisa.root)  # the store's embedding cache, read directly
    assert store.embedding_count() == len({r["text"] for r in text_rows})
    sisa.forget([text_rows[1]["id"], text_rows[2]["id"]])
    sisa.add(make_text_rows(6, seed=9, prefix="new"))
    assert encoder.encoded == len(text_rows) + 6  # only the new texts were encoded
    # The deleted records' embeddings were purged with them (unless another live record
    # shares the text).
    live_texts = {r["text"] for r in text_rows if r["id"] not in ("t001", "t002")}
    gone = {text_rows[1]["text"], text_rows[2]["text"]} - live_texts
    from sisa.records import input_digest

    assert not store.get_embeddings(encoder.fingerprint, [input_digest(t) for t in gone])
    # A second store seeded from this one encodes nothing at all.
    other = Sisa.train(tmp_path / "other", text_rows[10:], config, TEXT_SPEC,
                       embeddings_from=tmp_path / "store")
    assert other.encoder.encoded == 0


def test_embedding_of_a_text_does_not_depend_on_its_batch(tiny_model, text_rows):
    from sisa.training.encoder import TextEncoder

    encoder = TextEncoder(HeadConfig(model=tiny_model, max_length=32))
    texts = [r["text"] for r in text_rows[:8]]
    together = encoder.encode(texts)
    alone = np.stack([encoder.encode([t])[0] for t in reversed(texts)])[::-1]
    assert np.array_equal(together, alone)
    assert np.array_equal(encoder.encode([texts[3], "very long " * 20 + texts[5]])[0], together[3])
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)


def test_lora_adapter_is_saved_the_peft_way_and_loads(tmp_path, tiny_model, text_rows):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = text_config(tiny_model, "lora")
    sisa = Sisa.train(tmp_path / "store", text_rows, config, TEXT_SPEC)
    row = sisa.live_checkpoints()[1]
    adapter_dir = sisa.root / row.path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    texts = [r["text"] for r in text_rows[:6]]
    enc = AutoTokenizer.from_pretrained(tiny_model)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = torch.softmax(peft_model(**enc).logits, -1).double().numpy()
    ours = sisa.ensemble().shard_proba(texts)[1]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_lora_ensemble_holds_one_base_with_named_adapters(tmp_path, tiny_model, text_rows):
    config = text_config(tiny_model, "lora")
    sisa = Sisa.train(tmp_path / "store", text_rows, config, TEXT_SPEC)
    scorer = sisa.ensemble().scorer
    assert set(scorer.model.peft_config) == {"shard-0", "shard-1"}
    bases = [m for m in scorer.model.modules() if type(m).__name__ == "BertModel"]
    assert len(bases) == 1


def test_text_backend_rejects_numeric_features_and_vice_versa(tmp_path, tiny_model, rows):
    from .conftest import SPEC, small_config

    with pytest.raises(ConfigError, match="needs a text column"):
        Sisa.train(tmp_path / "a", rows, text_config(tiny_model, "head"), SPEC)
    with pytest.raises(ConfigError, match="needs numeric feature columns"):
        Sisa.train(tmp_path / "b", make_text_rows(), small_config(), TEXT_SPEC)
    assert not (tmp_path / "a" / "store.db").exists() and not (tmp_path / "b" / "store.db").exists()


def test_missing_model_is_a_clear_error(tmp_path, text_rows):
    with pytest.raises(ConfigError, match="never downloads"):
        Sisa.train(tmp_path / "s", text_rows, text_config("no-org/no-such-model", "lora"), TEXT_SPEC)
    assert not (tmp_path / "s").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_on_gpu_is_exact(tmp_path, tiny_model, text_rows):
    config = text_config(tiny_model, "lora")
    config = config.replace(execution=ExecutionConfig(gpus_per_shard=0.5, progress=False))
    sisa = Sisa.train(tmp_path / "store", text_rows, config, TEXT_SPEC)
    victim = text_rows[7]["id"]
    sisa.forget([victim])
    assert_exact(sisa, [r for r in text_rows if r["id"] != victim], config, TEXT_SPEC,
                 tmp_path / "scratch")


def test_a_hub_id_resolves_from_the_local_cache_only(tmp_path, tiny_model, monkeypatch):
    import shutil

    from huggingface_hub import constants

    from sisa.models import resolve_model

    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-bert" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model, snapshot)
    refs = tmp_path / "hub" / "models--tiny-org--tiny-bert" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("tiny-org/tiny-bert") == snapshot
    with pytest.raises(ConfigError, match="never downloads"):
        resolve_model("tiny-org/not-cached")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_scorer_subset_scores_its_shards_as_the_whole_does(tmp_path, tiny_model, text_rows, backend):
    """An ensemble of fewer shards (the service's view while a shard retrains) shares the models
    and gives each of its shards the very same probabilities."""
    sisa = Sisa.train(tmp_path / "store", text_rows, text_config(tiny_model, backend), TEXT_SPEC)
    whole = sisa.ensemble()
    part = whole.subset([1])
    texts = [r["text"] for r in text_rows[:12]]
    assert part.shards == [1] and part.shas == {1: whole.shas[1]} and part.version != whole.version
    assert set(part.shard_proba(texts)) == {1}
    np.testing.assert_array_equal(part.shard_proba(texts)[1], whole.shard_proba(texts)[1])
    assert whole.shards == [0, 1] and set(whole.shard_proba(texts)) == {0, 1}  # unchanged
