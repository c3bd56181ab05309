"""Generation from a causal-LM ensemble: the decoding loop over the shards' combined next-token
distribution, with the prompt formatted as training formatted it (`sisa.tasks.format_prompt`).

All servable shards run in one batched forward pass per token (peft mixed-adapter rows, one block
per shard) with a KV cache; their next-token log-probabilities combine as a mixture (`mean`) or a
normalised product (`product`). `merged` runs one row instead, the adapter merged from the
shards' (the mean of their updates, `sisa.adapters.merged_adapter`): one pass per token, whatever
the shard count. Greedy at temperature 0, else sampled with a generator seeded per prompt, so an
answer never depends on what else was asked.

Several prompts decode side by side (`Batch`). A prompt alone decodes as `decode` always did (the
same passes, so the same speed and bits); in company, every prompt is prefilled on its own (the
logits of its last position only), then each step runs the rows of `SLOTS` prompts at once (a
fixed shape: an empty slot runs dummy rows), each prompt attending over exactly its own keys, its
token picked from its own rows. With adapters on the top layers only (`mean`, `product`), the
layers below run once per prompt, not once per shard, in the prefill and in every step. A BLAS
picks its kernel by a matrix's shape, so such a pass may differ from the lone one in the last bits
of a logit; the token is the lone one's wherever the pass's margin (best against second best,
`MARGIN`) is far above any such difference, and a prompt with one pass under it is decoded again
alone (past that token it may join the others once more). So every answer is the one `decode`
gives, greedy or sampled.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from sisa.config import Combine
from sisa.errors import ConfigError
from sisa.tasks import combine_logprobs, format_prompt

SLOTS = 4  # prompts decoded side by side; every shared step runs this many, busy or not
# Nats between the best and the second-best choice of a shared step under which the token might
# not be the lone decoding's: a shared step's log-probabilities differed from the lone ones by at
# most 6e-5 over SmolLM2-135M's first tokens (float32, CPU), so this leaves a wide berth.
MARGIN = 1e-3
_ATTENTION = "sisa-slots"  # the attention implementation of a step: each prompt over its own keys


@dataclass(frozen=True, eq=False)
class DecodeRequest:
    """One prompt to continue: greedy with temperature 0, else sampled with a generator seeded
    from `seed`; at most `max_new_tokens`, ending before a token in `stop` (not returned) or once
    `should_stop(tokens so far)`."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    stop: Sequence[int] = ()
    should_stop: Callable[[list[int]], bool] | None = None


@runtime_checkable
class SharedDecoding(Protocol):
    """A scorer whose decoding runs beside other callers' (the service's shared decoder,
    `sisa.service.batching`): `generate_texts` hands it the requests instead of decoding them."""

    def decode_requests(self, requests: Sequence[DecodeRequest], combine: Combine) -> list[list[int]]:
        """Each request's new tokens, as `decode_requests` gives them."""


def _blocks(scorer: Any, combine: Combine) -> list[str]:
    return [scorer.merged_name()] if combine == "merged" else list(scorer.names)


class Solo:
    """One prompt decoded alone, a step at a time (`decode` runs it to the end): one pass of its
    rows per token, through the scorer's KV cache."""

    def __init__(self, scorer: Any, combine: Combine, request: DecodeRequest, tag: Any = None,
                 blocks: Sequence[str] | None = None) -> None:
        from transformers import DynamicCache

        if not len(request.prompt):
            raise ConfigError("generation needs a prompt of at least one token")
        self.scorer, self.combine, self.request, self.tag = scorer, combine, request, tag
        self.blocks = list(blocks) if blocks is not None else _blocks(scorer, combine)
        self.generator = torch.Generator().manual_seed(request.seed)
        self.cache: Any = DynamicCache()
        self.ids = torch.as_tensor(list(request.prompt), dtype=torch.long)[None].repeat(len(self.blocks), 1)
        self.new: list[int] = []
        self.done = request.max_new_tokens < 1
        self.rejoined = False  # decoded again alone, then taken back into the shared steps

    @torch.no_grad()
    def step(self) -> bool:
        """One pass (the first: the prompt's) and the token it picks; whether the prompt is done."""
        request = self.request
        # The logits of the last position only: the prompt's others are never read (and a shared
        # prefill, `Slots.enter`, computes them the same way).
        out = self.scorer.forward(self.ids, cache=self.cache, blocks=self.blocks, last=True)
        logits = out.logits[:, -1].float().cpu()
        logp = torch.log_softmax(logits, -1)
        mixed = logp[0] if self.combine == "merged" else combine_logprobs(logp, self.combine)
        if request.temperature <= 0:
            token = int(mixed.argmax())
        else:
            probs = torch.softmax(mixed / request.temperature, -1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.done = True
        if token in request.stop:
            return True
        self.new.append(token)
        if request.should_stop is not None and request.should_stop(self.new):
            return True
        if len(self.new) >= request.max_new_tokens:
            return True
        self.done = False
        self.ids = torch.full((len(self.blocks), 1), token, dtype=torch.long)
        return False


@torch.no_grad()
def decode(scorer: Any, prompt: Sequence[int], max_new_tokens: int, combine: Combine = "mean",
           temperature: float = 0.0, seed: int = 0, stop: Sequence[int] = (),
           should_stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Token ids generated after `prompt` from the ensemble of `scorer` (an `LMScorer`): greedy
    with temperature 0, else sampled with a generator seeded from `seed`. Stops at a token in
    `stop` (not returned) or once `should_stop(tokens so far)`."""
    solo = Solo(scorer, combine, DecodeRequest(prompt, max_new_tokens, temperature, seed, stop,
                                               should_stop))
    while not solo.done:
        solo.step()
    return solo.new


@dataclass(eq=False)
class _Slot:
    """A prompt in a shared step: its tokens so far, its sampler, and its keys and values per
    layer (rows: one per block; positions: the prompt's, then each token fed back)."""

    request: DecodeRequest
    tag: Any
    generator: torch.Generator
    new: list[int]
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # positions held in `keys` and `values`
    unsure: bool = False  # a step's margin was under MARGIN: decode it again alone
    rejoined: bool = False  # it was decoded again alone once already (`Again.rejoin`)


@dataclass(frozen=True, eq=False)
class Again:
    """What `Slots` gives for a prompt unsure in a shared pass: decode it again alone. Once its
    lone decoding has the unsure token (its `at`-th), it may join the shared steps again: only
    once (`rejoin`), so a prompt of many near ties is not decoded from its start again and again."""

    request: DecodeRequest
    at: int = 0  # tokens it had before the unsure one
    rejoin: bool = True


class Slots:
    """Prompts decoded side by side under one scorer (an `LMScorer`) and `combine`, `SLOTS` at a
    time: `adopt` takes a prompt decoded alone so far (its prefill at least) into a free slot;
    `step` runs one token of every slot. A slot's rows are `s, s + slots, ...`: block-major."""

    def __init__(self, scorer: Any, combine: Combine, blocks: Sequence[str], slots: int = SLOTS) -> None:
        self.scorer = scorer
        self.combine = combine
        self.slots = slots
        self.blocks = list(blocks)
        # Below the first adapted layer every block computes the same: those layers run one row
        # per prompt (its keys and values: one row), the layers above one per block.
        self.split = getattr(scorer, "split", 0) if len(self.blocks) > 1 else 0
        self.steps = 0  # steps run
        self._held: list[_Slot | None] = [None] * slots
        self._model: Any = None  # the scorer's model, attending per slot (made at the first step)
        self._parts: tuple[Any, Any] | None = None  # that model split at `split` (`split_model`)
        self._inner: Callable[..., Any] | None = None  # the attention it attends with, per slot

    @property
    def free(self) -> int:
        return sum(s is None for s in self._held)

    @property
    def busy(self) -> int:
        return self.slots - self.free

    @property
    def tags(self) -> list[Any]:
        """The tags of the prompts holding a slot."""
        return [s.tag for s in self._held if s is not None]

    def adopt(self, solo: Solo) -> None:
        """Take over `solo` (not done) in a free slot: its tokens, its sampler and its keys."""
        if not self.free:
            raise ValueError("no slot is free: step until a prompt is done")
        slot = _Slot(solo.request, solo.tag, solo.generator, solo.new, rejoined=solo.rejoined)
        # Below the split the blocks' rows are alike: the first one serves.
        self._hold(slot, [(layer.keys, layer.values) for layer in solo.cache.layers],
                   solo.cache.get_seq_length())

    @torch.no_grad()
    def enter(self, solo: Solo) -> tuple[Any, Any] | None:
        """Prefill `solo`'s prompt (not started, not done) into a free slot: the logits of its last
        position only, the layers below the split once. Its first token is picked as a shared
        step picks one; (tag, tokens), (tag, error) or (tag, `Again`) where it is done with that,
        else None (it holds a slot)."""
        from transformers import DynamicCache

        if not self.free:
            raise ValueError("no slot is free: step until a prompt is done")
        request, k = solo.request, len(self.blocks)
        prompt = torch.as_tensor(list(request.prompt), dtype=torch.long)[None].to(self.scorer.device)
        if self.split:
            lower, upper = self.scorer.parts()
            below, above = DynamicCache(), DynamicCache()
            with self.scorer.lock:
                hidden = lower(input_ids=prompt, cache=below, use_cache=True).last_hidden_state
                logits = upper(inputs_embeds=hidden.repeat(k, 1, 1), adapter_names=self.blocks,
                               cache=above, use_cache=True, logits_to_keep=1).logits[:, -1]
            layers: list[Any] = [*below.layers[:self.split], *above.layers[self.split:]]
        else:
            cache = DynamicCache()
            logits = self.scorer.forward(prompt.repeat(k, 1), cache=cache, blocks=self.blocks,
                                         last=True).logits[:, -1]
            layers = list(cache.layers)
        slot = _Slot(request, solo.tag, solo.generator, solo.new, rejoined=solo.rejoined)
        try:
            finished = self._pick(slot, logits)
        except Exception as exc:  # its stopping rule
            return solo.tag, exc
        if slot.unsure:
            return solo.tag, Again(request, 0, not slot.rejoined)
        if finished:
            return solo.tag, slot.new
        self._hold(slot, [(layer.keys, layer.values) for layer in layers], prompt.shape[1])
        return None

    def _hold(self, slot: _Slot, layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
              length: int) -> None:
        """`slot` in a free slot, with its keys and values per layer (`length` positions)."""
        # Room for every position the prompt can reach: the buffers never move.
        width = length + slot.request.max_new_tokens - len(slot.new) + 1
        for i, (keys, values) in enumerate(layers):
            if i < self.split:
                keys, values = keys[:1], values[:1]
            slot.keys.append(_room(keys, width))
            slot.values.append(_room(values, width))
        slot.length = length
        self._held[self._held.index(None)] = slot

    @torch.no_grad()
    def step(self) -> list[tuple[Any, Any]]:
        """One token for every held prompt: (tag, tokens) of those now done, (tag, error) of those
        whose stopping rule failed, (tag, `Again`) of those to decode again alone. An error of the
        pass itself is raised: the held prompts are lost with this object (`tags` names them)."""
        held = [(s, slot) for s, slot in enumerate(self._held) if slot is not None]
        if not held:
            return []
        if self._model is None:
            self._model, self._inner = _slot_model(self.scorer.model)
            if self.split:
                from sisa.serving.scorers import split_model

                self._parts = split_model(self._model, self.split)
        k, device = len(self.blocks), self.scorer.device
        ids = torch.zeros((self.slots, 1), dtype=torch.long)
        positions = torch.zeros((self.slots, 1), dtype=torch.long)
        for s, slot in held:
            ids[s] = slot.new[-1]
            positions[s] = slot.length
        positions = positions.to(device)
        names = [b for b in self.blocks for _ in range(self.slots)]  # rows block-major
        with self.scorer.lock:  # the adapters of a pass are the model's state while it runs
            if self._parts is not None:  # below the split: a row per slot
                lower, upper = self._parts
                hidden = lower(input_ids=ids.to(device), position_ids=positions, use_cache=False,
                               sisa_slots=self).last_hidden_state
                logits = upper(inputs_embeds=hidden.repeat(k, 1, 1), adapter_names=names,
                               position_ids=positions.repeat(k, 1), use_cache=False,
                               sisa_slots=self).logits[:, -1]
            else:
                logits = self._model(input_ids=ids.repeat(k, 1).to(device), adapter_names=names,
                                     position_ids=positions.repeat(k, 1), use_cache=False,
                                     sisa_slots=self).logits[:, -1]
        self.steps += 1
        done: list[tuple[Any, Any]] = []
        for s, slot in held:
            slot.length += 1
            try:
                finished = self._pick(slot, logits[s::self.slots])
            except Exception as exc:  # its stopping rule: this prompt's error alone
                done.append((slot.tag, exc))
                self._held[s] = None
                continue
            if slot.unsure:
                done.append((slot.tag, Again(slot.request, len(slot.new), not slot.rejoined)))
                self._held[s] = None
            elif finished:
                done.append((slot.tag, slot.new))
                self._held[s] = None
        return done

    def attend(self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """One layer's attention in a step (query, key, value: one position per row): each held
        prompt's new key and value join its own, and its rows attend over exactly those, in a call
        of their own, as when it is decoded alone; rows of empty slots give zeros. A prompt's rows
        are every `slots`-th from its slot's: one below the split, one per block above it."""
        inner: Any = self._inner
        layer = module.layer_idx
        out = query.new_zeros((query.shape[0], query.shape[2], query.shape[1], query.shape[3]))
        for s, slot in enumerate(self._held):
            if slot is None:
                continue
            rows = slice(s, None, self.slots)
            n = slot.length
            keys, values = slot.keys[layer], slot.values[layer]
            keys[:, :, n] = key[rows, :, 0]
            values[:, :, n] = value[rows, :, 0]
            out[rows], _ = inner(module, query[rows].contiguous(), keys[:, :, :n + 1],
                                 values[:, :, :n + 1], None, dropout=0.0, scaling=scaling, **kwargs)
        return out, None

    def _pick(self, slot: _Slot, logits: torch.Tensor) -> bool:
        """Pick `slot`'s next token from its rows' logits (blocks, vocabulary) as `Solo.step`
        does (its sampler drawn the way `torch.multinomial` draws); whether it is done. A margin
        under `MARGIN` marks the slot unsure."""
        request = slot.request
        logp = torch.log_softmax(logits.float().cpu().clone(memory_format=torch.contiguous_format), -1)
        mixed = logp[0] if self.combine == "merged" else combine_logprobs(logp, self.combine)
        if request.temperature <= 0:
            scores, margin = mixed, MARGIN
            token = int(mixed.argmax())
        else:
            # torch.multinomial's one draw: the argmax of p / q, q ~ Exp(1), from the generator.
            probs = torch.softmax(mixed / request.temperature, -1)
            q = torch.empty_like(probs).exponential_(1, generator=slot.generator)
            token = int((probs / q).argmax())
            scores = probs.log() - q.log()
            margin = MARGIN * max(1.0, 2.0 / request.temperature)  # 1/T scales a logit's error
        top = scores.topk(2).values
        if not bool(top[0] - top[1] > margin):
            slot.unsure = True
            return True
        if token in request.stop:
            return True
        slot.new.append(token)
        if request.should_stop is not None and request.should_stop(slot.new):
            return True
        return len(slot.new) >= request.max_new_tokens


class Batch:
    """The prompts of one scorer and `combine`, decoded together: `add` queues a prompt, `step`
    advances every prompt by a token and gives those done, (tag, tokens) or (tag, error). A
    prompt alone (nothing else decoding or queued) decodes as `decode` does; once others come,
    it joins them in the shared steps (`Slots`); a prompt unsure there starts again alone."""

    def __init__(self, scorer: Any, combine: Combine) -> None:
        self.scorer = scorer
        self.combine = combine
        self.blocks = _blocks(scorer, combine)  # made here: a merge may be made
        self.waiting: deque[tuple[DecodeRequest, Any]] = deque()
        self.solo: Solo | None = None  # the prompt decoding alone, which company may take along
        # Prompts decoded again alone (unsure in a shared pass), each with the count of tokens
        # after which it may join the shared steps again (None: it stays alone).
        self.alone: list[tuple[Solo, int | None]] = []
        self.slots: Slots | None = None
        self.fullest = 0  # the most prompts a shared step has run
        self.shared_steps = 0  # shared steps run
        self.solo_steps = 0  # steps of prompts decoding alone (a prefill counts)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.solo is not None or self.alone
                    or (self.slots is not None and self.slots.busy))

    @property
    def tags(self) -> list[Any]:
        """Every prompt's tag."""
        return [*(t for _, t in self.waiting), *([self.solo.tag] if self.solo is not None else []),
                *(s.tag for s, _ in self.alone), *(self.slots.tags if self.slots else [])]

    def add(self, request: DecodeRequest, tag: Any = None) -> None:
        self.waiting.append((request, tag))

    def step(self) -> list[tuple[Any, Any]]:
        """Start what waits (alone, or in the slots when there is company), then one token for
        every prompt: (tag, tokens) or (tag, error) of those done."""
        done: list[tuple[Any, Any]] = []
        shared = self.slots.busy if self.slots else 0
        if self.waiting and not shared and self.solo is None and len(self.waiting) == 1:
            request, tag = self.waiting.popleft()
            self._start(request, tag, done, lambda s: setattr(self, "solo", s))
        elif self.waiting:  # company: every prompt takes a slot, the lone one first
            slots = self.slots = self.slots or Slots(self.scorer, self.combine, self.blocks)
            if self.solo is not None:
                slots.adopt(self.solo)
                self.solo = None
            while self.waiting and slots.free:
                request, tag = self.waiting.popleft()
                self._enter(slots, request, tag, done)
        if self.solo is not None and self._advance(self.solo, done):
            self.solo = None
        alone = []
        for solo, at in self.alone:
            if self._advance(solo, done):
                continue
            if (at is not None and len(solo.new) > at and self.slots is not None
                    and self.slots.busy and self.slots.free):  # past its near tie: in company again
                solo.rejoined = True
                self.slots.adopt(solo)
            else:
                alone.append((solo, at))
        self.alone = alone
        if self.slots is not None and self.slots.busy:
            self.fullest = max(self.fullest, self.slots.busy)
            self.shared_steps += 1
            try:
                finished = self.slots.step()
            except Exception as exc:  # the pass: every prompt in it; those queued start afresh
                done.extend((tag, exc) for tag in self.slots.tags)
                self.slots = None
                return done
            for tag, result in finished:
                self._again(tag, result, done)
        return done

    def _again(self, tag: Any, result: Any, done: list[tuple[Any, Any]]) -> None:
        """A prompt's result from the shared passes: done, or (`Again`) decoded again alone."""
        if not isinstance(result, Again):
            done.append((tag, result))
            return
        at = result.at if result.rejoin else None
        self._start(result.request, tag, done, lambda s: self.alone.append((s, at)))

    def _enter(self, slots: Slots, request: DecodeRequest, tag: Any,
               done: list[tuple[Any, Any]]) -> None:
        """A prompt prefilled into a free slot (`Slots.enter`)."""
        try:
            solo = Solo(self.scorer, self.combine, request, tag, self.blocks)
            if solo.done:
                done.append((tag, solo.new))
                return
            self.solo_steps += 1
            result = slots.enter(solo)
        except Exception as exc:
            done.append((tag, exc))
            return
        if result is not None:
            self._again(*result, done)

    def _start(self, request: DecodeRequest, tag: Any, done: list[tuple[Any, Any]],
               keep: Callable[[Solo], None]) -> None:
        """A prompt begins alone; `keep` takes it if not done."""
        try:
            solo = Solo(self.scorer, self.combine, request, tag, self.blocks)
        except Exception as exc:
            done.append((tag, exc))
            return
        if solo.done:
            done.append((tag, solo.new))
        else:
            keep(solo)

    def _advance(self, solo: Solo, done: list[tuple[Any, Any]]) -> bool:
        """One step of a prompt decoding alone; whether it is done (its result in `done`)."""
        try:
            self.solo_steps += 1
            finished = solo.step()
        except Exception as exc:
            done.append((solo.tag, exc))
            return True
        if finished:
            done.append((solo.tag, solo.new))
        return finished


def _room(part: Any, width: int) -> torch.Tensor:
    """A layer's keys (or values), (rows, heads, positions, dim), in a buffer of `width` positions."""
    buffer = part.new_zeros((*part.shape[:2], width, part.shape[3]))
    buffer[:, :, :part.shape[2]] = part
    return buffer


def _view(module: torch.nn.Module, **children: torch.nn.Module) -> Any:
    """A shallow copy of `module` with some children replaced (it shares every other child and
    every parameter with `module`, which is left as it was)."""
    view = copy.copy(module)
    view.__dict__["_modules"] = dict(module._modules)
    for name, child in children.items():
        view._modules[name] = child
    return view


def _slot_model(model: Any) -> tuple[Any, Callable[..., Any]]:
    """A view of a peft causal LM (a Llama-style decoder) whose attention layers attend per slot
    (`Slots.attend`), and the attention function they attend with (the model's own); the view
    shares every module with `model`, which still attends as it did."""
    import sys

    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(_ATTENTION, _slot_attention)
    lora = model.base_model
    causal = lora.model
    decoder = causal.model
    attentions: list[Any] = [getattr(layer, "self_attn", None) for layer in decoder.layers]
    if not all(hasattr(a, "layer_idx") and hasattr(a, "config") for a in attentions):
        raise ConfigError(f"decoding side by side needs a Llama-style decoder (each layer's "
                          f"`self_attn` with a `layer_idx`); {type(causal).__name__} has none")
    config = copy.copy(decoder.config)
    name = config._attn_implementation or "eager"
    # "eager" is each architecture's own function, in its modelling module.
    eager: Any = getattr(sys.modules[type(attentions[0]).__module__], "eager_attention_forward", None)
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)
    config._attn_implementation = _ATTENTION
    layers = []
    for layer, attention in zip(decoder.layers, attentions, strict=True):
        attention = copy.copy(attention)
        attention.config = config
        layers.append(_view(layer, self_attn=attention))
    top = _view(decoder, layers=torch.nn.ModuleList(layers))
    top.config = config  # no mask is made: each slot attends over all of its own keys
    return _view(model, base_model=_view(lora, model=_view(causal, model=top))), inner


def _slot_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                    sisa_slots: Slots | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    if sisa_slots is None:
        raise ConfigError("the per-slot attention runs inside `Slots.step` only")
    return sisa_slots.attend(module, query, key, value, scaling, **kwargs)


def decode_requests(scorer: Any, requests: Sequence[DecodeRequest],
                    combine: Combine = "mean") -> list[list[int]]:
    """Each request's new tokens from the ensemble of `scorer` (an `LMScorer`), decoded together
    (`Batch`): the tokens `decode` gives each alone. The first error is raised."""
    if not requests:
        return []
    out: list[list[int] | None] = [None] * len(requests)
    batch = Batch(scorer, combine)
    for i, request in enumerate(requests):
        batch.add(request, i)
    while batch.busy:
        for i, result in batch.step():
            if isinstance(result, Exception):
                raise result
            out[i] = result
    return [tokens if tokens is not None else [] for tokens in out]


def decode_batch(scorer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 combine: Combine = "mean", temperature: float | Sequence[float] = 0.0,
                 seeds: int | Sequence[int] = 0, stop: Sequence[int] = (),
                 should_stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (token ids), decoded together; `max_new_tokens`,
    `temperature` and `seeds`: one for all, or one per prompt. Each prompt's tokens are those
    `decode` gives it alone."""
    n = len(prompts)

    def each(value: Any, what: str) -> list[Any]:
        if isinstance(value, (int, float)):
            return [value] * n
        if len(value) != n:
            raise ConfigError(f"{len(value)} {what} for {n} prompts: give one, or one per prompt")
        return list(value)

    requests = [DecodeRequest(p, m, t, s, stop, should_stop) for p, m, t, s in zip(
        prompts, each(max_new_tokens, "max_new_tokens"), each(temperature, "temperatures"),
        each(seeds, "seeds"), strict=True)]
    return decode_requests(scorer, requests, combine)


def generate_texts(scorer: Any, prompts: Sequence[str], prompted: bool, max_new_tokens: int,
                   combine: Combine, temperature: float, seed: int,
                   stop: Sequence[str]) -> list[tuple[str, int]]:
    """Each prompt's continuation (text, tokens generated). `prompted`: the store learned what
    follows a formatted prompt, so the prompt is formatted the same way; prompt i samples with
    seed + i; generation stops at the end-of-text token or any `stop` string (cut off). The prompts
    decode together, or beside other callers' where `scorer` shares its decoding."""
    tok = scorer.tokenizer

    def stopped(new: list[int]) -> bool:
        return any(s in tok.decode(new) for s in stop)

    requests = []
    for i, prompt in enumerate(prompts):
        text = format_prompt(prompt) if prompted else prompt
        ids = tok(text, add_special_tokens=False)["input_ids"]
        requests.append(DecodeRequest(ids, max_new_tokens, temperature, seed + i,
                                      (tok.eos_token_id,), stopped if stop else None))
    outs = (scorer.decode_requests(requests, combine) if isinstance(scorer, SharedDecoding)
            else decode_requests(scorer, requests, combine))
    out = []
    for new in outs:
        answer = tok.decode(new, skip_special_tokens=True)
        for s in stop:
            answer = answer.split(s, 1)[0]
        out.append((answer, len(new)))
    return out
