"""The `causal_lm` backend: one frozen causal language model, one peft LoRA adapter per shard,
trained with the next-token loss on each record's text (after its prompt, where it has one), or
on the assistant turns of each record's conversation, formatted by the model's chat template.

With `top_k_layers=k` only the top k transformer layers carry an adapter. The layers below are
frozen, so what they compute for a text never changes: `LMEncoder` runs them once per text (one
text at a time, so nothing depends on batch companions), the driver caches the result in the store
(keyed like embeddings, purged on deletion), and training runs only the top k layers on it.

Serving (`sisa.serving.LMScorer`) loads the base once with every shard's adapter as a named adapter
and computes all shards in one mixed-adapter batch; the adapter construction is `sisa.adapters`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sisa.adapters import adapter_tensors, load_adapter, lora_config, with_adapter
from sisa.config import CausalLMConfig
from sisa.errors import ConfigError, InputKindError, RecordError
from sisa.models import PACKAGED_GGUF, fix_tokenizer, model_fingerprint, quiet_transformers, resolve_model
from sisa.records import Input, conversation, parse_conversation
from sisa.tasks import PROMPT_SEPARATOR, ModelSpec, format_prompt
from sisa.training.encoder import torch_threads
from sisa.training.optim import AdamW
from sisa.training.protocol import State
from sisa.training.state import export_state, import_state

ADAPTER_DIR = "adapter"
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
    # Per token, whether it is learned, where that is not "every token from `start`" (a
    # conversation: its assistant turns only); None for a text.
    learned: np.ndarray | None = None


def make_example(tokenizer: Any, text: str, prompt: str | None, max_length: int) -> Example:
    """Token ids of one record. Without a prompt every token after the first is learned; with one,
    only the text's tokens (a long prompt loses its beginning first)."""
    body = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if prompt is None:
        ids = body[:max_length]
        return Example(np.asarray(ids, dtype=np.int64), 1)
    head = tokenizer(format_prompt(prompt), add_special_tokens=False)["input_ids"]
    body = body[:max_length - 1]
    head = head[-(max_length - len(body)):]
    return Example(np.asarray(head + body, dtype=np.int64), len(head))


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], model: str,
                generation_prompt: bool = False) -> str:
    """A conversation as the model's chat template writes it (`generation_prompt`: followed by
    the opening of the assistant's turn, as generation asks for one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model {model!r} has no chat template (its tokenizer sets none), so it "
                          "cannot format conversations: train on a text column instead "
                          "(--text-column, with --prompt-column for what each text answers), or "
                          "use a model with a chat template")
    try:
        text: str = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja's TemplateError: a template that refuses the conversation
        raise RecordError(f"the chat template of model {model!r} refuses a conversation: "
                          f"{type(exc).__name__}: {exc}") from exc
    return text


_MARK = "SISA-CHAT-MARK"  # stands for a message's content, to find where the template writes it


def format_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]],
                model: str) -> tuple[str, list[tuple[int, int]]]:
    """A conversation as the chat template writes it, and the character spans of its assistant
    turns: each message's content and the end-of-turn marker after it (TRL's assistant-only
    loss), not the header that opens the turn, which a prompt supplies at generation. Found by
    rendering prefixes: messages[:i] and the assistant's message with a mark for its content
    (where the content starts), then messages[:i + 1] (where the turn ends)."""
    text = render_chat(tokenizer, messages, model)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        marked = render_chat(tokenizer, [*messages[:i], {"role": "assistant", "content": _MARK}], model)
        turn = render_chat(tokenizer, messages[:i + 1], model)
        head = marked.split(_MARK, 1)[0]
        if _MARK not in marked or not (turn.startswith(head) and text.startswith(turn)):
            raise RecordError(f"the chat template of model {model!r} does not write the "
                              "conversation's first turns as a prefix of it (it rewrites earlier "
                              "turns), so the assistant's tokens cannot be told apart")
        # The whitespace after the end-of-turn marker (ChatML's newline) opens the next turn.
        spans.append((len(head), max(len(head), len(turn.rstrip()))))
    return text, spans


def make_chat_example(tokenizer: Any, messages: Sequence[Mapping[str, str]], max_length: int,
                      model: str) -> Example:
    """Token ids of one conversation, the whole rendered text tokenised at once (as
    `apply_chat_template(tokenize=True)` does); a token is learned when it starts inside an
    assistant turn. A conversation longer than `max_length` keeps its first tokens (TRL's
    default), the mask cut alike: a turn past the cut is not learned."""
    text, spans = format_chat(tokenizer, messages, model)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ConfigError(f"the tokenizer of model {model!r} gives no character offsets (it is "
                          "not a fast tokenizer), which conversations need") from None
    ids = encoded["input_ids"][:max_length]
    learned = np.asarray([any(a <= start < b for a, b in spans)
                          for start, _ in encoded["offset_mapping"][:max_length]], dtype=bool)
    first = np.flatnonzero(learned)
    return Example(np.asarray(ids, dtype=np.int64), int(first[0]) if len(first) else len(ids),
                   learned)


def chat_prompt(tokenizer: Any, prompt: str, model: str) -> str:
    """A prompt as a store trained on conversations is asked it: a user message, then the
    opening of the assistant's turn."""
    return render_chat(tokenizer, [{"role": "user", "content": prompt}], model, generation_prompt=True)


def end_of_turn(tokenizer: Any, model: str) -> str:
    """What the chat template writes after an assistant message (ChatML's '<|im_end|>'), '' if
    nothing: generation stops there."""
    text = render_chat(tokenizer, [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": _MARK}], model)
    return text.split(_MARK, 1)[1].strip() if _MARK in text else ""


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
        if e.learned is not None:  # position t predicts token t + 1: learned where it is
            learned[row, :n - 1] = torch.from_numpy(e.learned[1:n])
        else:
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


def adapted_layers(n_layers: int, top_k: int) -> list[int] | None:
    """The layers that carry an adapter (None: all of them)."""
    first = split_layers(n_layers, top_k)
    return list(range(first, n_layers)) if first else None


# Decoders whose forward adds nothing between the embeddings and the first layer (no scaling of
# inputs_embeds), so the top layers fed cached activations compute what the full model computes.
TOP_K_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def split_layers(n_layers: int, top_k: int) -> int:
    """Index of the first adapted layer (0: every layer is adapted)."""
    if top_k >= n_layers:
        raise ConfigError(f"top_k_layers={top_k} but the model has {n_layers} layers: use fewer "
                          "(or 0 to adapt every layer)")
    return n_layers - top_k if top_k else 0


def _shift_layers(tensors: Mapping[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    """Rename `.layers.i.` to `.layers.(i + offset).`: a top-k model numbers its layers from 0."""
    if not offset:
        return dict(tensors)
    return {_LAYER.sub(lambda m: f".layers.{int(m.group(1)) + offset}.", k): v for k, v in tensors.items()}


class LMEncoder:
    """Tokenises records and, with top-k adaptation, runs the frozen lower layers once per text.
    `chat`: the records are conversations (canonical JSON, see `sisa.records.conversation`),
    formatted by the chat template with the loss on the assistant turns."""

    per_token = True

    def __init__(self, config: CausalLMConfig, chat: bool = False) -> None:
        self.config = config
        self.chat = chat
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
        return split_layers(len(self.model.model.layers), self.config.top_k_layers)

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
        if self.chat:  # the chat template's files enter the model's digest
            settings += "/chat"
        return hashlib.blake2b(f"{model_fingerprint(c.model, self.chat)}/{settings}".encode(),
                               digest_size=16).hexdigest()

    def conversations(self, texts: Sequence[Any]) -> list[list[dict[str, str]]]:
        """Conversations given as canonical JSON (what the store holds) or as lists of messages,
        each checked (`sisa.records.conversation`)."""
        out = []
        for i, t in enumerate(texts):
            canonical, problem = conversation(t)
            if canonical is None:
                raise RecordError(f"conversation {i}: {problem}")
            out.append(parse_conversation(canonical))
        return out

    def check_conversations(self, texts: Sequence[str]) -> list[tuple[int, str]]:
        """(position, problem) of each conversation the chat template cannot format (one that
        refuses, say, two user turns in a row); checked as records are read, before any is
        written. Only the template runs, no tokenizer."""
        problems = []
        for i, messages in enumerate(self.conversations(texts)):
            try:
                format_chat(self.tokenizer, messages, self.config.model)
            except RecordError as exc:
                cause = exc.__cause__
                problems.append((i, f"{type(cause).__name__}: {cause}" if cause is not None else
                                 "its first turns do not render as a prefix of it"))
        return problems

    def examples(self, texts: Sequence[Any], prompts: Sequence[str | None] | None = None) -> list[Example]:
        if self.chat:
            if prompts is not None and any(p is not None for p in prompts):
                raise InputKindError("this store learns conversations: their user turns are the "
                                     "prompts, so give no separate prompts")
            return [make_chat_example(self.tokenizer, m, self.config.max_length, self.config.model)
                    for m in self.conversations(texts)]
        for t in texts:
            if isinstance(t, (list, tuple)):
                raise InputKindError("this store learns texts, not conversations: give texts (a "
                                     "store trained with a messages column takes conversations)")
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
        self.offset = split_layers(n_layers, training.top_k_layers)
        if self.offset:  # the layers below run once, in LMEncoder: keep only the adapted ones
            base.model.layers = torch.nn.ModuleList(list(base.model.layers)[self.offset:])
            base.config.num_hidden_layers = n_layers - self.offset
        self.layers = list(range(self.offset, n_layers)) if self.offset else None
        torch.manual_seed(seed)  # the adapters' initialisation draws from the global generator
        self.model = with_adapter(base, lora_config(training, "CAUSAL_LM"))
        self.model.to(device)
        self.optimizer = AdamW(
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
        return _shift_layers(adapter_tensors(self.model), self.offset)

    def load_adapter(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the adapter's weights with `tensors`, named as on the full model (`adapter`)."""
        load_adapter(self.model, _shift_layers(tensors, -self.offset))

    def state(self) -> State:
        return export_state(self.adapter(), self.optimizer)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        import_state(lambda weights: load_adapter(self.model, _shift_layers(weights, -self.offset)),
                     self.optimizer, tensors, meta)

    @torch.no_grad()
    def predict_proba(self, inputs: Any) -> torch.Tensor:
        raise InputKindError("a causal LM has no class probabilities: use generate or score")

    def export_files(self) -> dict[str, bytes]:
        """The adapter the peft way, for the full base model: load it with
        `PeftModel.from_pretrained(base, ".../adapter")`."""
        from safetensors.torch import save

        config = lora_config(self.training, "CAUSAL_LM", self.layers).to_dict()
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


class CausalLMBackend:
    name = "causal_lm"

    def __init__(self, config: CausalLMConfig, spec: ModelSpec) -> None:
        self.config = config
        self.spec = spec
        self.encoder = LMEncoder(config, chat=spec.chat)

    def validate(self) -> None:
        """Fail before a store is written: a model that is not a Llama-style decoder, or a top-k
        this model cannot take; for conversations, a model whose chat template is missing or
        does not let the assistant's tokens be told apart."""
        if self.spec.chat:
            probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"}]
            try:
                format_chat(self.tokenizer, probe, self.config.model)
            except RecordError as exc:
                raise ConfigError(f"{exc} (a plain user/assistant exchange); train on a text column "
                                  "instead (--text-column, with --prompt-column)") from exc
        model = self.encoder.model  # loads it (the first featurisation needs it anyway)
        if self.config.top_k_layers:
            kind = getattr(model.config, "model_type", "?")
            if kind not in TOP_K_ARCHITECTURES:
                raise ConfigError(f"top_k_layers needs a decoder that feeds its embeddings to the "
                                  f"first layer unchanged ({', '.join(TOP_K_ARCHITECTURES)}); "
                                  f"{self.config.model!r} is {kind!r}: use top_k_layers=0")
            split_layers(len(model.model.layers), self.config.top_k_layers)

    @property
    def tokenizer(self) -> Any:
        return self.encoder.tokenizer

    def fingerprint(self) -> str:
        return model_fingerprint(self.config.model, self.spec.chat)

    def prepare(self, inputs: LMInputs | Sequence[Input] | np.ndarray) -> LMInputs:
        if isinstance(inputs, LMInputs):
            return inputs
        return LMInputs(self.encoder.examples(list(inputs)))

    def create(self, seed: int, device: str = "cpu") -> CausalLMModel:
        return CausalLMModel(self.config, seed, self.tokenizer.pad_token_id, device)


