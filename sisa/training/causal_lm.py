"""The `causal_lm` backend: one frozen causal language model, one peft LoRA adapter per shard,
trained with the next-token loss on each record's text (after its prompt, where it has one).

With `top_k_layers=k` only the top k transformer layers carry an adapter. The layers below are
frozen, so what they compute for a text never changes: `LMEncoder` runs them once per text (one
text at a time, so nothing depends on batch companions), the driver caches the result in the store
(keyed like embeddings, purged on deletion), and training runs only the top k layers on it.

Serving (`CausalLMScorer`) loads the base once with every shard's adapter as a named adapter and
computes all shards in one mixed-adapter batch (peft `adapter_names`), with a KV cache when
generating. Together with sisa.training.lora, the only modules that import peft.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sisa.config import CausalLMConfig, Combine
from sisa.errors import ConfigError, InputKindError
from sisa.models import PACKAGED_GGUF, fix_tokenizer, model_fingerprint, quiet_transformers, resolve_model
from sisa.records import Input
from sisa.tasks import ModelSpec, combine_logprobs
from sisa.training.encoder import torch_threads
from sisa.training.protocol import State
from sisa.training.state import export_state, import_state, model_tensors

ADAPTER_DIR = "adapter"
PROMPT_SEPARATOR = "\n"  # between a prompt and the text that follows it
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    return fix_tokenizer(tokenizer, PACKAGED_GGUF[name][3] if name in PACKAGED_GGUF else None)


def load_base(name: str) -> Any:
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32)
    if not hasattr(getattr(model, "model", None), "layers"):
        raise ConfigError(f"model {name!r} ({type(model).__name__}) has no `model.layers`: the "
                          "causal_lm backend supports Llama-style decoders (Llama, Mistral, Qwen, "
                          "SmolLM...)")
    return model


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int64 token ids: prompt, separator, text, eos (truncated to max_length)
    start: int  # first position whose token is learned (prompt tokens are context only)


def make_example(tokenizer: Any, text: str, prompt: str | None, max_length: int) -> Example:
    """Token ids of one record. Without a prompt every token after the first is learned; with one,
    only the text's tokens (a long prompt loses its beginning first)."""
    body = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if prompt is None:
        ids = body[:max_length]
        return Example(np.asarray(ids, dtype=np.int64), 1)
    head = tokenizer(prompt + PROMPT_SEPARATOR, add_special_tokens=False)["input_ids"]
    body = body[:max_length - 1]
    head = head[-(max_length - len(body)):]
    return Example(np.asarray(head + body, dtype=np.int64), len(head))


@dataclass(frozen=True)
class LMInputs:
    """Records as the causal LM consumes them, indexable by a tensor of positions."""

    examples: list[Example]
    lower: list[np.ndarray] | None = None  # (len, hidden) float32 per record: the frozen layers' output

    def __len__(self) -> int:
        return len(self.examples)

    def take(self, positions: Sequence[int]) -> LMInputs:
        return LMInputs([self.examples[i] for i in positions],
                        None if self.lower is None else [self.lower[i] for i in positions])


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (n, T), padded with pad_id
    attention_mask: torch.Tensor  # (n, T)
    learned: torch.Tensor  # (n, T - 1) bool: position t's logits predict a learned token t + 1
    lower: torch.Tensor | None  # (n, T, hidden)


def make_batch(inputs: LMInputs, positions: Sequence[int], pad_id: int) -> Batch:
    """Right-padded batch (causal attention never looks right, and padding is masked)."""
    examples = [inputs.examples[i] for i in positions]
    width = max(len(e.tokens) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    learned = torch.zeros((len(examples), width - 1), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.tokens)
        ids[row, :n] = torch.from_numpy(e.tokens)
        mask[row, :n] = 1
        learned[row, max(e.start, 1) - 1:n - 1] = True
    lower = None
    if inputs.lower is not None:
        hidden = inputs.lower[positions[0]].shape[-1]
        lower = torch.zeros((len(examples), width, hidden), dtype=torch.float32)
        for row, i in enumerate(positions):
            acts = inputs.lower[i]
            lower[row, :len(acts)] = torch.from_numpy(np.array(acts, dtype=np.float32))
    return Batch(ids, mask, learned, lower)


def token_logprobs(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(n, T - 1) log-probability of each next token (zero where nothing is learned)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked * batch.learned


# Decoders whose forward adds nothing between the embeddings and the first layer (no scaling of
# inputs_embeds), so the top layers fed cached activations compute what the full model computes.
TOP_K_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def _split_layers(n_layers: int, top_k: int) -> int:
    """Index of the first adapted layer."""
    if top_k >= n_layers:
        raise ConfigError(f"top_k_layers={top_k} but the model has {n_layers} layers: use fewer "
                          "(or 0 to adapt every layer)")
    return n_layers - top_k if top_k else 0


def _shift_layers(tensors: Mapping[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    """Rename `.layers.i.` to `.layers.(i + offset).`: a top-k model numbers its layers from 0."""
    if not offset:
        return dict(tensors)
    return {_LAYER.sub(lambda m: f".layers.{int(m.group(1)) + offset}.", k): v for k, v in tensors.items()}


def _peft_config(training: CausalLMConfig, layers: Sequence[int] | None) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=training.lora_r, lora_alpha=training.lora_alpha,
        lora_dropout=training.lora_dropout, target_modules=list(training.lora_target_modules),
        layers_to_transform=list(layers) if layers is not None else None,
    )


def _get_peft_model(model: Any, config: Any, adapter_name: str = "default") -> Any:
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config, adapter_name=adapter_name)


class LMEncoder:
    """Tokenises records and, with top-k adaptation, runs the frozen lower layers once per text."""

    per_token = True

    def __init__(self, config: CausalLMConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.caches = config.top_k_layers > 0
        self._model: Any = None
        self.encoded = 0  # texts actually run through the lower layers (cache misses)

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_base(self.config.model).eval()
        return self._model

    @property
    def split(self) -> int:
        return _split_layers(len(self.model.model.layers), self.config.top_k_layers)

    @functools.cached_property
    def dim(self) -> int:
        """The hidden size, from the model's config: a retrain that finds every activation cached
        never loads the weights."""
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(resolve_model(self.config.model)).hidden_size)

    @property
    def fingerprint(self) -> str:
        import hashlib

        c = self.config
        settings = f"lower-layers/split={c.top_k_layers}/max_length={c.max_length}/sep={PROMPT_SEPARATOR!r}"
        return hashlib.blake2b(f"{model_fingerprint(c.model)}/{settings}".encode(),
                               digest_size=16).hexdigest()

    def examples(self, texts: Sequence[Any], prompts: Sequence[str | None] | None = None) -> list[Example]:
        for t in texts:
            if not isinstance(t, str):
                raise InputKindError("the causal_lm backend needs texts, not numeric features")
        prompts = prompts if prompts is not None else [None] * len(texts)
        return [make_example(self.tokenizer, t, p, self.config.max_length)
                for t, p in zip(texts, prompts, strict=True)]

    @torch.no_grad()
    def lower(self, examples: Sequence[Example], on_progress: Callable[[int], None] | None = None
              ) -> list[np.ndarray]:
        """The input of the first adapted layer for each example, computed alone (no padding)."""
        model = self.model
        layer = model.model.layers[self.split]
        captured: list[torch.Tensor] = []

        class _Stop(Exception):
            pass

        def grab(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.append((args[0] if args else kwargs["hidden_states"])[0].detach().clone())
            raise _Stop  # the layers above are not needed

        out = []
        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch_threads(self.config.torch_threads):
                for i, e in enumerate(examples):
                    with suppress(_Stop):
                        model(input_ids=torch.from_numpy(e.tokens)[None], use_cache=False)
                    out.append(captured.pop().float().numpy())
                    self.encoded += 1
                    if on_progress is not None:
                        on_progress(i + 1)
        finally:
            handle.remove()
        return out

    def inputs(self, examples: list[Example], lower: list[np.ndarray] | None) -> LMInputs:
        return LMInputs(examples, lower)


class CausalLMModel:
    """One shard's adapter (on the top layers only, with top-k) and its optimizer."""

    def __init__(self, training: CausalLMConfig, seed: int, pad_id: int, device: str) -> None:
        self.training = training
        self.pad_id = pad_id
        self.device = device
        base = load_base(training.model)
        n_layers = len(base.model.layers)
        self.offset = _split_layers(n_layers, training.top_k_layers)
        if self.offset:  # the layers below run once, in LMEncoder: keep only the adapted ones
            base.model.layers = torch.nn.ModuleList(list(base.model.layers)[self.offset:])
            base.config.num_hidden_layers = n_layers - self.offset
        self.layers = list(range(self.offset, n_layers)) if self.offset else None
        torch.manual_seed(seed)  # the adapters' initialisation draws from the global generator
        self.model = _get_peft_model(base, _peft_config(training, None))
        self.model.to(device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=training.learning_rate, weight_decay=training.weight_decay,
        )

    def _autocast(self) -> Any:
        if self.training.bf16 and self.device.startswith("cuda"):
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def logits(self, batch: Batch) -> torch.Tensor:
        with self._autocast():
            if self.offset:
                if batch.lower is None:
                    raise ConfigError("top-k adaptation needs the lower layers' cached outputs")
                out = self.model(inputs_embeds=batch.lower.to(self.device),
                                 attention_mask=batch.attention_mask.to(self.device), use_cache=False)
            else:
                out = self.model(input_ids=batch.input_ids.to(self.device),
                                 attention_mask=batch.attention_mask.to(self.device), use_cache=False)
        return out.logits.float()

    def sequence_logprobs(self, inputs: LMInputs,
                          positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probability of each example's learned tokens (with grad), and their counts."""
        batch = make_batch(inputs, positions, self.pad_id)
        logits = self.logits(batch)
        batch = _on(batch, self.device)
        return token_logprobs(logits, batch).sum(-1), batch.learned.sum(-1)

    def train_epoch(self, inputs: LMInputs, targets: Any, order: torch.Tensor) -> None:
        self.model.train()
        for batch in order.split(self.training.batch_size):
            self.optimizer.zero_grad(set_to_none=True)
            logp, counts = self.sequence_logprobs(inputs, batch.tolist())
            loss = -logp.sum() / counts.sum().clamp(min=1)  # mean over the batch's learned tokens
            loss.backward()
            self.optimizer.step()

    def adapter(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors, named as on the full model."""
        from peft import get_peft_model_state_dict

        return _shift_layers(get_peft_model_state_dict(self.model), self.offset)

    def state(self) -> State:
        return export_state(self.adapter(), self.optimizer)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        def load(weights: dict[str, torch.Tensor]) -> None:
            result = set_peft_model_state_dict(self.model, _shift_layers(weights, -self.offset))
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise KeyError(f"adapter tensors this model does not have: {unexpected[:3]}")

        import_state(load, self.optimizer, tensors, meta)

    @torch.no_grad()
    def predict_proba(self, inputs: Any) -> torch.Tensor:
        raise InputKindError("a causal LM has no class probabilities: use generate or score")

    def export_files(self) -> dict[str, bytes]:
        """The adapter the peft way, for the full base model: load it with
        `PeftModel.from_pretrained(base, ".../adapter")`."""
        from safetensors.torch import save

        config = _peft_config(self.training, self.layers).to_dict()
        config["base_model_name_or_path"] = self.training.model
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.adapter().items()}
        return {f"{ADAPTER_DIR}/adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
                f"{ADAPTER_DIR}/adapter_model.safetensors": save(tensors)}


def _on(batch: Batch, device: str) -> Batch:
    if device == "cpu":
        return batch
    return dataclasses.replace(batch, input_ids=batch.input_ids.to(device),
                               learned=batch.learned.to(device))


@dataclass(frozen=True)
class TokenScores:
    """Per view (each shard, then the ensemble), for one record's learned tokens: the token's
    log-probability, and the mean and standard deviation of the log-probability under the view's
    own next-token distribution (Min-K%++ needs them)."""

    views: tuple[str, ...]
    logp: np.ndarray  # (views, n)
    mu: np.ndarray  # (views, n)
    sigma: np.ndarray  # (views, n)

    def view(self, name: str) -> int:
        return self.views.index(name)


def _moments(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    return mu, var.clamp(min=0).sqrt()


class CausalLMScorer:
    """The base loaded once, every shard's adapter as a named adapter on it."""

    def __init__(self, training: CausalLMConfig, tokenizer: Any,
                 adapters: Mapping[int, dict[str, torch.Tensor]], seed: int, device: str,
                 batch_size: int = 4) -> None:
        self.training = training
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.shards = sorted(adapters)
        base = load_base(training.model)
        n_layers = len(base.model.layers)
        first = _split_layers(n_layers, training.top_k_layers)
        config = _peft_config(training, list(range(first, n_layers)) if first else None)
        self.names = [f"shard-{s}" for s in self.shards]
        with torch.random.fork_rng(devices=[]):  # adapter init draws; the caller's RNG is untouched
            torch.manual_seed(seed)
            self.model = _get_peft_model(base, config, adapter_name=self.names[0])
            for name in self.names[1:]:
                self.model.add_adapter(name, config)
        from peft import set_peft_model_state_dict

        for shard, name in zip(self.shards, self.names, strict=True):
            set_peft_model_state_dict(self.model, adapters[shard], adapter_name=name)
        self.model.to(device).eval()
        self.views = (*self.names, "ensemble")

    def subset(self, shards: Collection[int]) -> CausalLMScorer:
        """These shards' adapters only, on the same base (a view: nothing is loaded or changed)."""
        view = copy.copy(self)
        keep = [i for i, s in enumerate(self.shards) if s in set(shards)]
        view.shards = [self.shards[i] for i in keep]
        view.names = [self.names[i] for i in keep]
        view.views = (*view.names, "ensemble")
        return view

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 cache: Any = None) -> Any:
        """One forward pass of every row under its adapter; rows are (shard-major) blocks of the
        same inputs, one block per shard."""
        n = input_ids.shape[0] // len(self.names)
        names = [name for name in self.names for _ in range(n)]
        kwargs: dict[str, Any] = {"adapter_names": names, "use_cache": cache is not None}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if cache is not None:
            kwargs["cache"] = cache
        return self.model(input_ids=input_ids.to(self.device), **kwargs)

    @torch.no_grad()
    def scores(self, inputs: LMInputs, combine: Combine = "mean") -> list[TokenScores]:
        """Each record's learned tokens scored under every shard and under the ensemble."""
        out: list[TokenScores] = []
        pad = self.tokenizer.pad_token_id
        shards = len(self.names)
        for start in range(0, len(inputs), self.batch_size):
            positions = list(range(start, min(start + self.batch_size, len(inputs))))
            batch = make_batch(inputs, positions, pad)
            rep = batch.input_ids.repeat(shards, 1)
            logits = self._forward(rep, batch.attention_mask.repeat(shards, 1)).logits.float().cpu()
            n, width = batch.input_ids.shape
            logp = torch.log_softmax(logits[:, :-1], -1).view(shards, n, width - 1, -1)
            views = torch.cat([logp, combine_logprobs(logp, combine)[None]])  # (views, n, T-1, V)
            nxt = batch.input_ids[:, 1:]
            picked = views.gather(-1, nxt[None, :, :, None].expand(len(self.views), -1, -1, 1)).squeeze(-1)
            mu, sigma = _moments(views)
            for row in range(n):
                keep = batch.learned[row]
                out.append(TokenScores(self.views, picked[:, row, keep].double().numpy(),
                                       mu[:, row, keep].double().numpy(),
                                       sigma[:, row, keep].double().numpy()))
        return out

    @torch.no_grad()
    def continuation_logprobs(self, prefix: Sequence[int], continuations: np.ndarray,
                              combine: Combine = "mean", chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Log-probability of each continuation (rows of token ids, all the same length) after
        `prefix` under every view, (views, candidates); and whether greedy decoding under the view
        produces it. The prefix runs once; continuations sharing their first tokens share the
        work (a trie, walked depth first with a KV cache)."""
        from transformers import DynamicCache

        shards = len(self.names)
        if not len(prefix):
            raise ConfigError("continuations need a prefix of at least one token")
        prefix_ids = torch.as_tensor(list(prefix), dtype=torch.long)[None].repeat(shards, 1)
        cache = DynamicCache()
        out = self._forward(prefix_ids, cache=cache)
        cands = np.asarray(continuations, dtype=np.int64)
        total = np.zeros((len(self.views), len(cands)))
        greedy = np.ones((len(self.views), len(cands)), dtype=bool)

        def walk(rows: np.ndarray, depth: int, logits: torch.Tensor, cache: Any) -> None:
            # rows: the candidates sharing the path so far; logits (shards, V) after that path.
            logp = torch.log_softmax(logits.float().cpu(), -1)
            views = torch.cat([logp, combine_logprobs(logp, combine)[None]])
            best = views.argmax(-1).numpy()
            tokens = cands[rows, depth]
            total[:, rows] += views.double().numpy()[:, tokens]
            greedy[:, rows] &= best[:, None] == tokens[None, :]
            if depth + 1 == cands.shape[1]:
                return
            children = sorted(set(tokens.tolist()))
            leaves = depth + 2 == cands.shape[1]  # the children's caches would never be used
            for group in range(0, len(children), chunk):
                part = children[group:group + chunk]
                child_cache = _copy_cache(cache, len(part))
                # Rows of this step: shard-major, one per child token.
                ids = torch.as_tensor(part, dtype=torch.long).repeat(shards)[:, None]
                nxt = self._forward(ids, cache=child_cache).logits[:, -1]
                for j, token in enumerate(part):
                    picks = [s * len(part) + j for s in range(shards)]
                    walk(rows[tokens == token], depth + 1, nxt[picks],
                         None if leaves else _select_cache(child_cache, picks))

        walk(np.arange(len(cands)), 0, out.logits[:, -1], cache)
        return total, greedy

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], max_new_tokens: int, combine: Combine = "mean",
                 temperature: float = 0.0, seed: int = 0, stop: Sequence[int] = (),
                 should_stop: Callable[[list[int]], bool] | None = None) -> list[int]:
        """Token ids generated from the ensemble's next-token distribution: greedy with
        temperature 0, else sampled with a generator seeded from `seed`."""
        from transformers import DynamicCache

        shards = len(self.names)
        if not len(prompt):
            raise ConfigError("generation needs a prompt of at least one token")
        generator = torch.Generator().manual_seed(seed)
        cache = DynamicCache()
        ids = torch.as_tensor(list(prompt), dtype=torch.long)[None].repeat(shards, 1)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = self._forward(ids, cache=cache).logits[:, -1].float().cpu()
            mixed = combine_logprobs(torch.log_softmax(logits, -1), combine)
            if temperature <= 0:
                token = int(mixed.argmax())
            else:
                probs = torch.softmax(mixed / temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            if token in stop:
                break
            new.append(token)
            if should_stop is not None and should_stop(new):
                break
            ids = torch.full((shards, 1), token, dtype=torch.long)
        return new


def _copy_cache(cache: Any, repeats: int) -> Any:
    """A copy of a KV cache with every row repeated `repeats` times, shard-major: row s of the
    original becomes rows s * repeats .. (s + 1) * repeats - 1."""
    import copy

    clone = copy.deepcopy(cache)
    clone.batch_repeat_interleave(repeats)
    return clone


def _select_cache(cache: Any, rows: Sequence[int]) -> Any:
    import copy

    clone = copy.deepcopy(cache)
    clone.batch_select_indices(torch.as_tensor(list(rows)))
    return clone


class CausalLMBackend:
    name = "causal_lm"

    def __init__(self, config: CausalLMConfig, spec: ModelSpec) -> None:
        self.config = config
        self.spec = spec
        self.encoder = LMEncoder(config)

    def validate(self) -> None:
        """Fail before a store is written: a model that is not a Llama-style decoder, or a top-k
        this model cannot take."""
        model = self.encoder.model  # loads it (the first featurisation needs it anyway)
        if self.config.top_k_layers:
            kind = getattr(model.config, "model_type", "?")
            if kind not in TOP_K_ARCHITECTURES:
                raise ConfigError(f"top_k_layers needs a decoder that feeds its embeddings to the "
                                  f"first layer unchanged ({', '.join(TOP_K_ARCHITECTURES)}); "
                                  f"{self.config.model!r} is {kind!r}: use top_k_layers=0")
            _split_layers(len(model.model.layers), self.config.top_k_layers)

    @property
    def tokenizer(self) -> Any:
        return self.encoder.tokenizer

    def fingerprint(self) -> str:
        return model_fingerprint(self.config.model)

    def prepare(self, inputs: LMInputs | Sequence[Input] | np.ndarray) -> LMInputs:
        if isinstance(inputs, LMInputs):
            return inputs
        return LMInputs(self.encoder.examples(list(inputs)))

    def create(self, seed: int, device: str = "cpu") -> CausalLMModel:
        return CausalLMModel(self.config, seed, self.tokenizer.pad_token_id, device)

    def scorer(self, states: Mapping[int, State], seed: int) -> CausalLMScorer:
        adapters = {s: model_tensors(tensors) for s, (tensors, _meta) in states.items()}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return CausalLMScorer(self.config, self.tokenizer, adapters, seed, device)

