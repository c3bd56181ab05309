"""Scorers: the shard models of an ensemble loaded for answering (weights only, no optimizer),
behind one protocol. Every scorer holds some shards' models, gives a view of fewer of them
(`subset`, which loads nothing), and runs on the device it was built for.

- `NetScorer` (mlp, head): one small network per shard.
- `LoraScorer` (lora): one base classifier, every shard's adapter and head as a named adapter,
  all shards scored in one mixed-adapter forward pass.
- `LMScorer` (causal_lm): one base causal LM with every shard's adapter; per-shard next-token
  log-probabilities for generation (`sisa.serving.generation`), scoring and canary ranking.

`build_scorer` makes the one a backend's checkpoints need.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from sisa.adapters import (
    adapter_name,
    load_adapter,
    lora_config,
    merged_adapter,
    merged_lora_config,
    with_adapters,
)
from sisa.config import Combine
from sisa.errors import ConfigError
from sisa.tasks import combine_logprobs
from sisa.training.protocol import Backend


class Scorer(Protocol):
    shards: list[int]
    device: str

    def subset(self, shards: Collection[int]) -> Scorer:
        """A scorer of these shards only, sharing this one's models (nothing is loaded again or
        changed: both may run at once)."""


class ClassifierScorer(Scorer, Protocol):
    def shard_proba(self, inputs: Any) -> dict[int, np.ndarray]:
        """Each shard's class probabilities for prepared inputs, shape (n, num_classes)."""


class NetScorer:
    """One network per shard (the mlp and head backends)."""

    def __init__(self, nets: Mapping[int, torch.nn.Module], device: str) -> None:
        self.device = device
        self.nets = {s: net.to(device).eval() for s, net in sorted(nets.items())}
        self.shards = list(self.nets)

    def subset(self, shards: Collection[int]) -> NetScorer:
        view = copy.copy(self)
        view.nets = {s: n for s, n in self.nets.items() if s in set(shards)}
        view.shards = list(view.nets)
        return view

    @torch.no_grad()
    def shard_proba(self, inputs: torch.Tensor) -> dict[int, np.ndarray]:
        x = inputs.to(self.device)
        return {s: torch.softmax(net(x), dim=-1).double().cpu().numpy() for s, net in self.nets.items()}


class _Adapters:
    """What the adapter scorers share: the base with every shard's adapter, and views of some."""

    model: Any
    shards: list[int]
    names: list[str]
    lock: threading.RLock

    def _load(self, base: Any, config: Any, adapters: Mapping[int, dict[str, torch.Tensor]],
              seed: int, device: str) -> None:
        self.device = device
        # Held around every pass and every change of the adapters, by every view (`subset` copies
        # the reference): peft passes a pass's `adapter_names` to its layers through hooks it
        # registers on the model for the pass, so two passes at once would mix their adapters.
        self.lock = threading.RLock()
        self.shards = sorted(adapters)
        self.names = [adapter_name(s) for s in self.shards]
        self.model = with_adapters(base, config, {adapter_name(s): adapters[s] for s in self.shards},
                                   seed)
        self.model.to(device).eval()

    def subset(self, shards: Collection[int]) -> Any:
        """These shards' adapters only, on the same base (a view: nothing is loaded or changed)."""
        view = copy.copy(self)
        keep = [i for i, s in enumerate(self.shards) if s in set(shards)]
        view.shards = [self.shards[i] for i in keep]
        view.names = [self.names[i] for i in keep]
        return view

    def rows(self, n: int) -> list[str]:
        """The adapter of each row of a batch that repeats `n` inputs once per shard."""
        return [name for name in self.names for _ in range(n)]


class LoraScorer(_Adapters):
    """The lora backend: one base classifier, every shard's adapter (and head) on it."""

    def __init__(self, training: Any, base: Any, tokenizer: Any,
                 adapters: Mapping[int, dict[str, torch.Tensor]], seed: int, device: str,
                 batch_size: int = 32) -> None:
        self.training = training
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._load(base, lora_config(training, "SEQ_CLS"), adapters, seed, device)

    @torch.no_grad()
    def shard_proba(self, inputs: Any) -> dict[int, np.ndarray]:
        per_shard: dict[int, list[np.ndarray]] = {s: [] for s in self.shards}
        for start in range(0, len(inputs), self.batch_size):
            texts = inputs.texts[start:start + self.batch_size]
            enc = self.tokenizer(texts, padding=True, truncation=True,
                                 max_length=self.training.max_length, return_tensors="pt")
            n = len(texts)
            # One forward pass for all shards: the batch repeated once per adapter.
            big = {k: v.repeat(len(self.shards), 1).to(self.device) for k, v in enc.items()}
            with self.lock:
                logits = self.model(**big, adapter_names=self.rows(n)).logits.float()
            proba = torch.softmax(logits, -1).double().cpu().numpy()
            for i, shard in enumerate(self.shards):
                per_shard[shard].append(proba[i * n:(i + 1) * n])
        return {s: np.concatenate(v) if v else np.zeros((0, 0)) for s, v in per_shard.items()}


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


def perplexity(scores: Sequence[TokenScores], view: str) -> float:
    """The perplexity of these records' learned tokens, all together, under one view (nan where
    there is no token)."""
    total = sum(float(s.logp[s.view(view)].sum()) for s in scores)
    tokens = sum(s.logp.shape[1] for s in scores)
    return math.exp(-total / tokens) if tokens else math.nan


def _moments(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = logp.exp()
    mu = (p * logp).sum(-1)
    var = (p * logp.square()).sum(-1) - mu.square()
    return mu, var.clamp(min=0).sqrt()


class LMScorer(_Adapters):
    """The causal_lm backend: one base causal LM, every shard's adapter on it. A pass runs blocks
    of rows, the same inputs once per block: one block per shard's adapter, then (where the
    ensemble is `merged`) the adapter merged from them, then (in a `with_base` view) the bare base
    model. The views are the shards' adapter names, then "ensemble" (their next-token
    distributions combined, see `combine_logprobs`, or the merged adapter's), then "base"."""

    def __init__(self, training: Any, base: Any, tokenizer: Any,
                 adapters: Mapping[int, dict[str, torch.Tensor]], seed: int, device: str,
                 layers: Sequence[int] | None = None, batch_size: int = 4) -> None:
        self.training = training
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self._config = lora_config(training, "CAUSAL_LM", layers)
        self._tensors = dict(adapters)  # for the merge of any subset of the shards
        self._load(base, self._config, adapters, seed, device)
        # Shared by every view (`subset` copies the reference): a merge is made once per set.
        self._merges: dict[tuple[int, ...], str] = {}
        self._merging = threading.Lock()
        self.base_view = False
        # With adapters on the top layers only, the layers below compute the same for every
        # shard: `scores` runs them once per text, not once per shard (see `split_model`).
        self.split = min(layers) if layers else 0
        self._parts: tuple[Any, Any] | None = None

    @property
    def views(self) -> tuple[str, ...]:
        return (*self.names, "ensemble", *(("base",) if self.base_view else ()))

    def with_base(self) -> LMScorer:
        """This view with a "base" view too: the frozen base model without any adapter (peft's
        `__base__` rows, in the same pass), for calibrating against what the base alone does."""
        view = copy.copy(self)
        view.base_view = True
        return view

    def merged_name(self) -> str:
        """The name of the adapter merged from this view's shards (`merged_adapter`: their mean
        update, one pass serves it), made on first use and kept while the scorer lives; a scorer
        is loaded for one version of the store, so a changed shard gets a new merge."""
        key = tuple(self.shards)
        with self._merging, self.lock:
            name = self._merges.get(key)
            if name is None:
                name = f"merged-{len(self._merges)}"
                with torch.random.fork_rng(devices=[]):  # throwaway init, replaced below
                    torch.manual_seed(self.seed)
                    self.model.add_adapter(name, merged_lora_config(self._config, len(key)))
                load_adapter(self.model, merged_adapter({s: self._tensors[s] for s in key}), name)
                self.model.to(self.device).eval()
                self._merges[key] = name
        return name

    def blocks(self, combine: Combine) -> list[str]:
        """The adapter of each block of rows a pass runs for every view (see the class)."""
        return [*self.names, *([self.merged_name()] if combine == "merged" else []),
                *(["__base__"] if self.base_view else [])]

    def combine_views(self, logp: torch.Tensor, combine: Combine) -> torch.Tensor:
        """Log-probabilities per view from those per block (laid out as `blocks(combine)`)."""
        shards = logp[:len(self.names)]
        ensemble = logp[len(self.names)] if combine == "merged" else combine_logprobs(shards, combine)
        return torch.cat([shards, ensemble[None], *([logp[-1:]] if self.base_view else [])])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: Any = None, blocks: Sequence[str] | None = None, last: bool = False) -> Any:
        """One forward pass of every row under its block's adapter (`blocks`: default, one per
        shard; `cache`: a KV cache that the pass extends; `last`: logits of the last position
        only)."""
        names = list(blocks) if blocks is not None else self.names
        n = input_ids.shape[0] // len(names)
        kwargs: dict[str, Any] = {"adapter_names": [b for b in names for _ in range(n)],
                                  "use_cache": cache is not None}
        if last:
            kwargs["logits_to_keep"] = 1
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(self.device)
        if cache is not None:
            kwargs["cache"] = cache
        with self.lock:
            return self.model(input_ids=input_ids.to(self.device), **kwargs)

    def parts(self) -> tuple[Any, Any]:
        """The model split below the adapted layers (`split_model`), made once."""
        if self._parts is None:
            self._parts = split_model(self.model, self.split)
        return self._parts

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                blocks: Sequence[str]) -> torch.Tensor:
        """(blocks * n, T, V) logits of n padded inputs under every block, block-major; below the
        adapted layers, one pass for all blocks."""
        k = len(blocks)
        if not self.split:
            return self.forward(input_ids.repeat(k, 1), attention_mask.repeat(k, 1),
                                blocks=blocks).logits
        lower, upper = self.parts()
        mask = attention_mask.to(self.device)
        n = input_ids.shape[0]
        with self.lock:  # the lower part shares its modules with the whole model too
            hidden = lower(input_ids=input_ids.to(self.device), attention_mask=mask,
                           use_cache=False).last_hidden_state
            return upper(inputs_embeds=hidden.repeat(k, 1, 1), attention_mask=mask.repeat(k, 1),
                         adapter_names=[b for b in blocks for _ in range(n)], use_cache=False).logits

    @torch.no_grad()
    def scores(self, inputs: Any, combine: Combine = "mean",
               on_progress: Callable[[int, int], None] | None = None) -> list[TokenScores]:
        """Each record's learned tokens scored under every shard and under the ensemble.
        `on_progress(batches done, batches)`: called as each batch is scored."""
        from sisa.training.causal_lm import make_batch

        out: list[TokenScores] = []
        pad = self.tokenizer.pad_token_id
        blocks = self.blocks(combine)
        starts = range(0, len(inputs), self.batch_size)
        for number, start in enumerate(starts, 1):
            positions = list(range(start, min(start + self.batch_size, len(inputs))))
            batch = make_batch(inputs, positions, pad)
            logits = self._logits(batch.input_ids, batch.attention_mask, blocks).float().cpu()
            n, width = batch.input_ids.shape
            # Only the learned positions (not padding, not a prompt) are scored: the rest of the
            # work is over the vocabulary, per position.
            keep = batch.learned  # (n, T-1)
            logp = torch.log_softmax(logits.view(len(blocks), n, width, -1)[:, :, :-1][:, keep], -1)
            views = self.combine_views(logp, combine)  # (views, L, V)
            nxt = batch.input_ids[:, 1:][keep]
            picked = views.gather(-1, nxt[None, :, None].expand(len(self.views), -1, 1)).squeeze(-1)
            mu, sigma = _moments(views)
            counts = keep.sum(1).tolist()
            for p, m, sd in zip(picked.split(counts, 1), mu.split(counts, 1), sigma.split(counts, 1),
                                strict=True):
                out.append(TokenScores(self.views, p.double().numpy(), m.double().numpy(),
                                       sd.double().numpy()))
            if on_progress is not None:
                on_progress(number, len(starts))
        return out

    @torch.no_grad()
    def continuation_logprobs(self, prefix: Sequence[int], continuations: np.ndarray,
                              combine: Combine = "mean", chunk: int = 64,
                              on_progress: Callable[[int, int], None] | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
        """Log-probability of each continuation (rows of token ids, all the same length) after
        `prefix` under every view, (views, candidates); and whether greedy decoding under the view
        produces it. The prefix runs once; continuations sharing their first tokens share the
        work (a trie, walked depth first with a KV cache). `on_progress(nodes done, nodes)`:
        called as each inner node of the trie has run its children."""
        from transformers import DynamicCache

        blocks = self.blocks(combine)
        k = len(blocks)
        if not len(prefix):
            raise ConfigError("continuations need a prefix of at least one token")
        prefix_ids = torch.as_tensor(list(prefix), dtype=torch.long)[None].repeat(k, 1)
        cache = DynamicCache()
        out = self.forward(prefix_ids, cache=cache, blocks=blocks)
        cands = np.asarray(continuations, dtype=np.int64)
        total = np.zeros((len(self.views), len(cands)))
        greedy = np.ones((len(self.views), len(cands)), dtype=bool)
        # Inner nodes: the distinct paths of 0 .. L-2 tokens (each runs its children once).
        inner = sum(len({tuple(r) for r in cands[:, :d].tolist()}) for d in range(cands.shape[1] - 1))
        walked = [0]

        def walk(rows: np.ndarray, depth: int, logits: torch.Tensor, cache: Any) -> None:
            # rows: the candidates sharing the path so far; logits (blocks, V) after that path.
            views = self.combine_views(torch.log_softmax(logits.float().cpu(), -1), combine)
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
                child_cache = copy_cache(cache, len(part))
                # Rows of this step: block-major, one per child token.
                ids = torch.as_tensor(part, dtype=torch.long).repeat(k)[:, None]
                nxt = self.forward(ids, cache=child_cache, blocks=blocks).logits[:, -1]
                for j, token in enumerate(part):
                    picks = [b * len(part) + j for b in range(k)]
                    walk(rows[tokens == token], depth + 1, nxt[picks],
                         None if leaves else select_cache(child_cache, picks))
            walked[0] += 1
            if on_progress is not None:
                on_progress(walked[0], inner)

        walk(np.arange(len(cands)), 0, out.logits[:, -1], cache)
        return total, greedy


def _view(module: torch.nn.Module, **children: torch.nn.Module) -> Any:
    """A shallow copy of `module` with some children replaced: it shares every other child (and
    every parameter) with `module`, which is left as it was."""
    view = copy.copy(module)
    view.__dict__["_modules"] = dict(module._modules)  # its own registry of children
    for name, child in children.items():
        view._modules[name] = child
    return view


def split_model(model: Any, split: int) -> tuple[Any, Any]:
    """Two models made of a peft Llama-style causal LM's own modules: the decoder's layers below
    `split` (no adapter on them), whose output is the input of layer `split`; and the causal LM
    whose decoder starts at layer `split`, fed that as its embeddings, with every adapter (called
    as the whole model is, `adapter_names` and all). Together they compute what the whole model
    computes (the decoders of `causal_lm.TOP_K_ARCHITECTURES` add nothing between the embeddings
    and the first layer); nothing of `model` changes, so both may run beside it."""
    lora = model.base_model  # peft's tuner, around the causal LM
    causal = lora.model
    layers = list(causal.model.layers)

    def decoder(kept: list[Any], norm: torch.nn.Module) -> Any:
        config = copy.copy(causal.model.config)  # (the decoder's: a view may attend its own way)
        config.num_hidden_layers = len(kept)
        part = _view(causal.model, layers=torch.nn.ModuleList(kept), norm=norm)
        part.config = config
        return part

    lower = decoder(layers[:split], torch.nn.Identity())
    top = decoder(layers[split:], causal.model.norm)
    upper_lm = _view(causal, model=top)
    upper_lm.config = top.config
    return lower, _view(model, base_model=_view(lora, model=upper_lm))


def copy_cache(cache: Any, repeats: int) -> Any:
    """A copy of a KV cache with every row repeated `repeats` times, shard-major: row s of the
    original becomes rows s * repeats .. (s + 1) * repeats - 1."""
    clone = copy.deepcopy(cache)
    clone.batch_repeat_interleave(repeats)
    return clone


def select_cache(cache: Any, rows: Sequence[int]) -> Any:
    clone = copy.deepcopy(cache)
    clone.batch_select_indices(torch.as_tensor(list(rows)))
    return clone


def build_scorer(backend: Backend, weights: Mapping[int, dict[str, torch.Tensor]], seed: int,
                 device: str) -> Scorer:
    """The scorer of some shards' model weights (shard -> the tensors a checkpoint's model holds:
    a network's, or an adapter's) for `backend`, on `device`; `seed` seeds any throwaway
    initialisation the loaded weights then replace."""
    b: Any = backend
    if backend.name in ("mlp", "head"):
        nets = {}
        for shard, tensors in weights.items():
            net = b.network(seed)
            net.load_state_dict(tensors)
            nets[shard] = net
        return NetScorer(nets, device)
    if backend.name == "lora":
        from sisa.training.lora import base_model

        return LoraScorer(b.config, base_model(b.config, b.spec.num_classes, seed), b.tokenizer,
                          weights, seed, device)
    if backend.name == "causal_lm":
        from sisa.training.causal_lm import adapted_layers, load_base

        base = load_base(b.config.model)
        return LMScorer(b.config, base, b.tokenizer, weights, seed, device,
                        adapted_layers(len(base.model.layers), b.config.top_k_layers))
    raise ConfigError(f"no scorer for backend {backend.name!r}")
