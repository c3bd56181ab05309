"""Approximate unlearning baselines (gradient ascent, gradient difference, NPO, SimNPO, RMU), trained and
scheduled as OpenUnlearning does, on a copy of a monolithic causal-LM store's adapter (the store is never
changed), for comparison with SISA's exact deletion; `sweep` runs a grid, `select` gates and picks."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import torch
import torch.nn.functional as F

from sisa.api import Sisa
from sisa.errors import ConfigError
from sisa.schedule import derive_seed
from sisa.training.causal_lm import CausalLMModel, LMInputs, make_batch
from sisa.training.encoder import torch_threads

Method = Literal["gradient_ascent", "gradient_difference", "npo", "simnpo", "rmu"]
METHODS: tuple[Method, ...] = ("gradient_ascent", "gradient_difference", "npo", "simnpo", "rmu")
Schedule = Literal["linear", "constant"]
SCHEDULES: tuple[Schedule, ...] = ("linear", "constant")

# Source: OpenUnlearning (github.com/locuslab/open-unlearning at d3d7cf9): the losses are those of
# src/trainer/unlearn/{grad_ascent,grad_diff,npo,simnpo,rmu}.py and src/trainer/utils.py; the method
# defaults, configs/trainer/*.yaml; the schedule, configs/trainer/finetune.yaml and
# configs/experiment/unlearn/tofu/default.yaml over transformers' Trainer (warm-up epochs turned into
# steps in src/trainer/__init__.py); the retain draws, src/data/unlearn.py (ForgetRetainDataset).

# The schedule, as OpenUnlearning's TOFU unlearning experiment sets it (HF Trainer defaults below).
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "epochs": 10,  # passes over the forget set (num_train_epochs)
    "learning_rate": 1e-5,  # the peak rate, reached after warm-up
    "batch_size": 8,  # forget records per forward pass (per_device_train_batch_size)
    "accumulation": 4,  # forward passes per optimizer step (gradient_accumulation_steps): 32 records
    "warmup_epochs": 1.0,  # the rate rises linearly from 0 over this many epochs' steps
    "weight_decay": 0.01,  # AdamW's decoupled decay
    "seed": 0,  # the forget order, the retain draws, RMU's control vector, dropout
    "schedule": "linear",  # after warm-up: "linear" decay to 0 (HF's default), or "constant"
    "max_grad_norm": 1.0,  # gradient clipping (HF's default); None: none
    "max_steps": None,  # optimizer steps to take instead of `epochs` (HF's max_steps); None: epochs
}

# Each method's hyper-parameters with OpenUnlearning's defaults (configs/trainer/<Method>.yaml).
# A method with a retain term minimises gamma * forget loss + alpha * retain loss.
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "gradient_ascent": {},  # GradAscent: minus the forget set's NLL
    "gradient_difference": {"gamma": 1.0, "alpha": 1.0},  # GradDiff: retain loss NLL
    "npo": {"beta": 0.1, "gamma": 1.0, "alpha": 1.0},  # NPO: retain loss NLL
    # SimNPO: beta 4.5, delta 0 (the paper's gamma), gamma 0.125 (its npo_coeff); retain loss NLL.
    # Tuned on memorised TOFU answers (token NLL well below 1): where the forget set's token NLL is
    # high, beta * (NLL - delta) saturates the sigmoid and the forget term's gradient vanishes;
    # a delta near that NLL brings it back.
    "simnpo": {"beta": 4.5, "delta": 0.0, "gamma": 0.125, "alpha": 1.0},
    # RMU: steering_coeff scales the random unit control vector; layer: the decoder layer whose
    # output is steered (OpenUnlearning names a module, model.layers.7; None here: the lowest layer
    # the adapter changes); retain loss: activations kept near the model's before unlearning.
    "rmu": {"steering_coeff": 2.0, "gamma": 1.0, "alpha": 1.0, "layer": None},
}
RETAIN_METHODS: frozenset[Method] = frozenset(m for m in METHODS if m != "gradient_ascent")


def _grid() -> tuple[dict[str, Any], ...]:
    points: list[dict[str, Any]] = [{"epochs": 10, "learning_rate": 1e-5}]
    points += [{"epochs": e, "learning_rate": lr} for lr in (5e-5, 1e-4, 5e-4) for e in (2, 5, 10)]
    return tuple(points)


# The points `sweep` runs by default, the same for every method at its default hyper-parameters:
# OpenUnlearning's default (10 epochs at 1e-5, tuned for full fine-tuning of 1B+ models on TOFU)
# and, as LoRA adapters usually train at 10-100x full fine-tuning's rate, larger rates (5e-5,
# 1e-4, 5e-4) at 2, 5 and 10 epochs: ten runs per method.
DEFAULT_GRID: dict[str, tuple[dict[str, Any], ...]] = {m: _grid() for m in METHODS}


@dataclass(frozen=True)
class Unlearned:
    """One approximate-unlearning run: what ran, what it cost, and the adapter it left."""

    method: str
    hyperparameters: dict[str, Any]  # every setting of the run, defaults filled in, rmu's layer resolved
    steps: int  # optimizer steps taken
    forget_samples: int  # forget records through a training forward pass (one pass per epoch)
    retain_samples: int  # retain records drawn alongside them (0 for gradient ascent)
    reference_samples: int  # records through the model before unlearning, once, without grad
    seconds: float  # reference passes and optimizer steps (not loading the model or the records)
    learning_rates: tuple[float, ...]  # the rate each optimizer step used
    adapter: dict[str, torch.Tensor] = field(repr=False)

    @property
    def learning_rate(self) -> float:
        return float(self.hyperparameters["learning_rate"])

    @property
    def epochs(self) -> int:
        return int(self.hyperparameters["epochs"])

    def summary(self) -> dict[str, Any]:
        """The run's figures without the adapter (JSON-ready)."""
        return {"method": self.method, "hyperparameters": dict(self.hyperparameters),
                "steps": self.steps, "forget_samples": self.forget_samples,
                "retain_samples": self.retain_samples, "reference_samples": self.reference_samples,
                "seconds": self.seconds}


@dataclass(frozen=True)
class _Run:
    method: Method
    settings: dict[str, Any]  # SCHEDULE_DEFAULTS' keys, validated
    method_args: dict[str, Any]  # HYPERPARAMETERS[method]'s keys, validated


@dataclass(frozen=True)
class _Step:
    """One optimizer step: its forward passes (forget positions, the retain positions drawn with
    them: empty without a retain term) and the epoch it belongs to."""

    forget: list[list[int]]
    retain: list[list[int]]
    epoch: int


def _resolve(method: str, given: Mapping[str, Any]) -> _Run:
    """Validated settings, defaults filled in; every bad value is reported at once."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {list(METHODS)}, got {method!r}")
    allowed = {**SCHEDULE_DEFAULTS, **HYPERPARAMETERS[method]}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{method} takes no {', '.join(map(repr, unknown))}: its settings are "
                          f"{sorted(allowed)}")
    s = {**allowed, **given}
    errors: list[str] = []

    def integer(name: str, low: int, optional: bool = False) -> None:
        v = s[name]
        if not (optional and v is None) and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            errors.append(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {v!r}")

    def number(name: str, positive: bool, optional: bool = False) -> None:
        v = s[name]
        if optional and v is None:
            return
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (v <= 0 if positive else v < 0):
            errors.append(f"{name} must be a finite number {'> 0' if positive else '>= 0'}"
                          f"{' or None' if optional else ''}, got {v!r}")

    for name in ("epochs", "batch_size", "accumulation"):
        integer(name, 1)
    integer("max_steps", 1, optional=True)
    integer("seed", 0)
    number("learning_rate", positive=True)
    number("warmup_epochs", positive=False)
    number("weight_decay", positive=False)
    number("max_grad_norm", positive=True, optional=True)
    if s["schedule"] not in SCHEDULES:
        errors.append(f"schedule must be one of {list(SCHEDULES)}, got {s['schedule']!r}")
    for name in ("beta", "steering_coeff"):
        if name in s:
            number(name, positive=True)
    for name in ("gamma", "alpha", "delta"):
        if name in s and not (isinstance(s[name], int | float) and math.isfinite(s[name])):
            errors.append(f"{name} must be a finite number, got {s[name]!r}")
    if "layer" in s:
        integer("layer", 0, optional=True)
    if errors:
        raise ConfigError(f"{method}: " + "; ".join(errors))
    return _Run(cast(Method, method), {k: s[k] for k in SCHEDULE_DEFAULTS},
                {k: s[k] for k in HYPERPARAMETERS[method]})


def lr_schedule(steps: int, warmup_steps: int, learning_rate: float, schedule: Schedule) -> list[float]:
    """The rate of each optimizer step, as transformers' linear (and constant) schedule with
    warm-up: step s < warmup_steps uses learning_rate * s / warmup_steps (so the first step's rate
    is 0); then "linear" falls to 0 at `steps`, "constant" stays at learning_rate."""
    rates = []
    for s in range(steps):
        if s < warmup_steps:
            rates.append(learning_rate * s / warmup_steps)
        elif schedule == "constant":
            rates.append(learning_rate)
        else:
            rates.append(learning_rate * max(0.0, (steps - s) / max(1, steps - warmup_steps)))
    return rates


def _plan(n_forget: int, n_retain: int, settings: Mapping[str, Any]) -> tuple[list[_Step], int]:
    """Each optimizer step's forward passes, and the warm-up's length in steps. An epoch is one
    pass over the forget set in a seeded order; each forget record draws one retain record
    uniformly (with replacement), as OpenUnlearning's ForgetRetainDataset does. An epoch's last
    step may accumulate fewer passes (HF steps at an epoch's end)."""
    batch, accumulation = settings["batch_size"], settings["accumulation"]
    per_epoch = math.ceil(math.ceil(n_forget / batch) / accumulation)
    total = settings["max_steps"] or settings["epochs"] * per_epoch
    # OpenUnlearning takes int(warmup_epochs * records // effective batch), which is 0 for a forget
    # set smaller than one effective batch; counting the steps an epoch takes keeps it >= 1 there.
    warmup = min(total, int(settings["warmup_epochs"] * per_epoch))
    steps: list[_Step] = []
    epoch = 0
    while len(steps) < total:
        generator = torch.Generator().manual_seed(derive_seed(settings["seed"], "unlearn", epoch))
        order = torch.randperm(n_forget, generator=generator).tolist()
        drawn = torch.randint(n_retain, (n_forget,), generator=generator).tolist() if n_retain else []
        starts = list(range(0, n_forget, batch))
        for first in range(0, len(starts), accumulation):
            group = starts[first:first + accumulation]
            steps.append(_Step([order[a:a + batch] for a in group],
                               [drawn[a:a + batch] for a in group] if n_retain else [[] for _ in group],
                               epoch))
            if len(steps) == total:
                break
        epoch += 1
    return steps, warmup


def _inputs(sisa: Sisa, ids: Sequence[str]) -> Any:
    found = sisa.texts(ids)
    live = [found[i] for i in dict.fromkeys(ids) if i in found]
    prompts = [p for _, p in live] if sisa.data_spec.prompt_column else None
    return sisa.model_inputs([t for t, _ in live], prompts)


def monolith_model(sisa: Sisa) -> CausalLMModel:
    """The trained adapter of a one-shard causal-LM store, restored with its optimizer state."""
    if sisa.config.partition.shards != 1 or sisa.config.training.backend != "causal_lm":
        raise ConfigError("the approximate baselines run on a monolithic causal_lm store "
                          "(--shards 1 --backend causal_lm)")
    model = sisa.shard_model(0)
    if not isinstance(model, CausalLMModel):
        raise ConfigError("the approximate baselines need a causal_lm store's model")
    return model


def unlearn(sisa: Sisa, forget_ids: Sequence[str], retain_ids: Sequence[str], method: Method,
            epochs: int = 10, learning_rate: float = 1e-5, batch_size: int = 8, accumulation: int = 4,
            warmup_epochs: float = 1.0, weight_decay: float = 0.01, seed: int = 0, *,
            schedule: Schedule = "linear", max_grad_norm: float | None = 1.0,
            max_steps: int | None = None, **hyperparameters: Any) -> Unlearned:
    """Run `method` on a copy of the monolith's adapter (`monolith_model`) with OpenUnlearning's
    method and schedule (NPO, SimNPO and RMU with their retain terms; see HYPERPARAMETERS): AdamW
    (weight decay `weight_decay`), `epochs` passes over the forget set in a seeded order,
    `batch_size` records a forward pass, `accumulation` passes an optimizer step, the rate rising
    linearly from 0 over `warmup_epochs` and then falling linearly to 0 (`schedule="constant"`:
    staying), gradients clipped to norm `max_grad_norm`. `hyperparameters`: the method's (see
    HYPERPARAMETERS, whose defaults are OpenUnlearning's). Deterministic for a seed."""
    settings = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size,
                "accumulation": accumulation, "warmup_epochs": warmup_epochs,
                "weight_decay": weight_decay, "seed": seed, "schedule": schedule,
                "max_grad_norm": max_grad_norm, "max_steps": max_steps, **hyperparameters}
    return sweep(sisa, forget_ids, retain_ids, method, [settings])[0]


def sweep(sisa: Sisa, forget_ids: Sequence[str], retain_ids: Sequence[str], method: Method,
          grid: Sequence[Mapping[str, Any]] | None = None, **common: Any) -> list[Unlearned]:
    """`unlearn` at each point of `grid` (each a dict of its keyword arguments, over `common`;
    default: DEFAULT_GRID[method]), each from the monolith as trained. Every point is validated
    before any runs; the model and the records are loaded once."""
    _resolve(method, common)
    points = DEFAULT_GRID[method] if grid is None else grid
    runs = [_resolve(method, {**common, **point}) for point in points]
    if not runs:
        return []
    model = monolith_model(sisa)
    forget = _inputs(sisa, forget_ids)
    if not len(forget):
        raise ConfigError("nothing to unlearn: none of the forget records is live")
    retain = None
    if method in RETAIN_METHODS:
        retain = _inputs(sisa, retain_ids)
        if not len(retain):
            raise ConfigError(f"{method} has a retain term: give it live retain records (none of the "
                              f"{len(retain_ids)} retain ids is live)")
    last = len(runs) - 1
    return [_unlearn(model if i == last else copy.deepcopy(model), forget, retain, run)
            for i, run in enumerate(runs)]


def _unlearn(model: CausalLMModel, forget: LMInputs, retain: LMInputs | None, run: _Run) -> Unlearned:
    s = run.settings
    started = time.perf_counter()
    steps, warmup = _plan(len(forget), len(retain) if retain is not None else 0, s)
    rates = lr_schedule(len(steps), warmup, s["learning_rate"], s["schedule"])
    params = [p for p in model.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["learning_rate"], weight_decay=s["weight_decay"])
    cuda = model.device.startswith("cuda")
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []), \
            torch_threads(model.training.torch_threads):
        model.model.eval()  # the reference passes: the model before unlearning, without dropout
        loss_of, method_args, reference_samples = _objective(model, forget, retain, run, steps)
        model.model.train()
        epoch = -1
        for step, rate in zip(steps, rates, strict=True):
            if step.epoch != epoch:  # dropout draws, per epoch (seeding CUDA only where it runs)
                epoch = step.epoch
                seed = derive_seed(s["seed"], "unlearn", "dropout", epoch)
                if cuda:
                    torch.manual_seed(seed)
                else:
                    torch.default_generator.manual_seed(seed)
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad(set_to_none=True)
            for f, r in zip(step.forget, step.retain, strict=True):
                (loss_of(f, r) / len(step.forget)).backward()  # the mean over the accumulated passes
            if s["max_grad_norm"] is not None:
                torch.nn.utils.clip_grad_norm_(params, s["max_grad_norm"])
            optimizer.step()
        model.model.eval()
    seconds = time.perf_counter() - started
    return Unlearned(
        run.method, {**s, **method_args}, len(steps),
        forget_samples=sum(len(f) for step in steps for f in step.forget),
        retain_samples=sum(len(r) for step in steps for r in step.retain),
        reference_samples=reference_samples, seconds=seconds, learning_rates=tuple(rates),
        adapter={k: v.detach().clone() for k, v in model.adapter().items()})


Loss = Callable[[list[int], list[int]], torch.Tensor]


def _objective(model: CausalLMModel, forget: LMInputs, retain: LMInputs | None, run: _Run,
               steps: Sequence[_Step]) -> tuple[Loss, dict[str, Any], int]:
    """The loss of one forward pass (forget positions, retain positions), the method's
    hyper-parameters as resolved, and how many records the reference passes ran."""
    a = dict(run.method_args)
    if run.method == "rmu":
        if retain is None:
            raise ConfigError("rmu has a retain term: give it live retain records")
        return _rmu(model, forget, retain, run, steps)
    batch = run.settings["batch_size"]
    reference = torch.zeros(0)
    if run.method == "npo":  # the forget set's log-probabilities under the model before unlearning
        with torch.no_grad():
            reference = torch.cat([model.sequence_logprobs(forget, b.tolist())[0]
                                   for b in torch.arange(len(forget)).split(batch)])

    def loss(f: list[int], r: list[int]) -> torch.Tensor:
        logp, counts = model.sequence_logprobs(forget, f)
        if run.method in ("gradient_ascent", "gradient_difference"):
            forget_loss = logp.sum() / counts.sum().clamp(min=1)  # minus the mean token NLL
        elif run.method == "npo":  # compute_dpo_loss with only a losing side
            ratio = logp - reference[f]
            forget_loss = -(2 / a["beta"]) * F.logsigmoid(-a["beta"] * ratio).mean()
        else:  # simnpo: the length-normalised NLL, no reference
            nll = -logp / counts.clamp(min=1) - a["delta"]
            forget_loss = -(2 / a["beta"]) * F.logsigmoid(a["beta"] * nll).mean()
        if retain is None:
            return forget_loss
        r_logp, r_counts = model.sequence_logprobs(retain, r)
        retain_nll = -r_logp.sum() / r_counts.sum().clamp(min=1)
        return a["gamma"] * forget_loss + a["alpha"] * retain_nll

    return loss, a, len(forget) if run.method == "npo" else 0


class _Stop(Exception):
    pass


def _decoder_layers(model: CausalLMModel) -> Any:
    """The decoder layers the model runs (with top-k, only the adapted ones, numbered from 0)."""
    base: Any = model.model.get_base_model()
    return base.model.layers


def _activations(model: CausalLMModel, inputs: LMInputs, positions: Sequence[int],
                 index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of decoder layer `index` (the model's own numbering) for a batch, with grad
    where grad is on, and the mask of positions holding learned tokens (OpenUnlearning's
    labels != -100). The layers above it are not run."""
    batch = make_batch(inputs, positions, model.pad_id)
    captured: list[torch.Tensor] = []

    def grab(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = _decoder_layers(model)[index].register_forward_hook(grab)
    try:
        with suppress(_Stop):
            model.logits(batch)
    finally:
        handle.remove()
    mask = torch.zeros(batch.attention_mask.shape, dtype=torch.bool)
    mask[:, 1:] = batch.learned
    hidden = captured[0].float()
    return hidden, mask.to(hidden.device)


def _activation_loss(acts: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's compute_activation_loss: squared error, averaged over the hidden size, summed over
    the masked positions, divided by their count, averaged over the batch."""
    squared = F.mse_loss(acts, target, reduction="none")
    per_row = (squared * mask.unsqueeze(-1)).mean(dim=2).sum(dim=1)
    return (per_row / mask.sum(-1).clamp(min=1)).mean()


def _rmu(model: CausalLMModel, forget: LMInputs, retain: LMInputs, run: _Run,
         steps: Sequence[_Step]) -> tuple[Loss, dict[str, Any], int]:
    """RMU: steer the chosen layer's output on forget records toward a random unit vector scaled
    by steering_coeff (drawn once, uniform in [0, 1) before normalising, as OpenUnlearning's
    get_control_vector) and keep it on retain records where the model before unlearning put it."""
    a = dict(run.method_args)
    layers = _decoder_layers(model)
    first, last = model.offset, model.offset + len(layers) - 1
    layer = first if a["layer"] is None else a["layer"]
    if not first <= layer <= last:
        raise ConfigError(f"rmu steers a layer the adapter changes ({first}..{last} on this store), "
                          f"got layer={layer!r}")
    a["layer"] = layer
    index = layer - first
    base: Any = model.model.get_base_model()
    dim = int(base.config.hidden_size)
    generator = torch.Generator().manual_seed(derive_seed(run.settings["seed"], "unlearn", "rmu"))
    control = torch.rand(1, 1, dim, generator=generator)
    control = control / control.norm() * a["steering_coeff"]
    # The retain records the plan draws, through the model before unlearning, once.
    drawn = sorted({i for step in steps for r in step.retain for i in r})
    reference: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for start in range(0, len(drawn), run.settings["batch_size"]):
            chunk = drawn[start:start + run.settings["batch_size"]]
            acts, _ = _activations(model, retain, chunk, index)
            for row, i in enumerate(chunk):
                reference[i] = acts[row, :len(retain.examples[i].tokens)].clone()

    def loss(f: list[int], r: list[int]) -> torch.Tensor:
        acts, mask = _activations(model, forget, f, index)
        forget_loss = _activation_loss(acts, control.to(acts).expand_as(acts), mask)
        r_acts, r_mask = _activations(model, retain, r, index)
        target = torch.zeros_like(r_acts)
        for row, i in enumerate(r):
            target[row, :len(reference[i])] = reference[i]
        return a["gamma"] * forget_loss + a["alpha"] * _activation_loss(r_acts, target, r_mask)

    return loss, a, len(drawn)


P = TypeVar("P")


def select(points: Sequence[P], utility: float, gate: float = 1.05, *,
           perplexity: str | Callable[[P], Any] = "perplexity",
           forgetting: str | Callable[[P], Any] = "forgetting") -> P | None:
    """The point that forgets most among those whose held-out perplexity is at most `gate` times
    `utility` (the held-out perplexity of the model before forgetting); None when none passes.
    `perplexity`, `forgetting`: each point's figures, as a key (of a dict, or an attribute) or a
    function; a larger `forgetting` is more forgotten (pass e.g. `lambda p: -p["exposure"]`).
    A point missing a figure (None, NaN) is never chosen; ties go to the lower perplexity, then to
    the earlier point."""
    if not (isinstance(utility, int | float) and math.isfinite(utility) and utility > 0):
        raise ConfigError(f"utility must be a finite perplexity > 0, got {utility!r}")
    if not (isinstance(gate, int | float) and math.isfinite(gate) and gate > 0):
        raise ConfigError(f"gate must be a finite factor > 0 (e.g. 1.05), got {gate!r}")

    def figure(point: P, key: str | Callable[[P], Any]) -> float:
        value = key(point) if callable(key) else (
            point[key] if isinstance(point, Mapping) else getattr(point, key))
        return float(value) if value is not None else math.nan

    best: tuple[float, float] | None = None
    chosen: P | None = None
    for point in points:
        ppl, forgot = figure(point, perplexity), figure(point, forgetting)
        if not (math.isfinite(ppl) and math.isfinite(forgot)) or ppl > gate * utility:
            continue
        if best is None or (forgot, -ppl) > best:
            best, chosen = (forgot, -ppl), point
    return chosen


def scorer_for(sisa: Sisa, adapter: dict[str, torch.Tensor]) -> Any:
    """A one-adapter scorer (its one shard is the ensemble) for an unlearned adapter."""
    return sisa.language_model({0: adapter})
