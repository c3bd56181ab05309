"""Shared pieces of the benchmark suite: data sets, configs, sizes per mode, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sisa import DataSpec, ExecutionConfig, MLPConfig, PartitionConfig, Sisa, SisaConfig
from sisa.schedule import derive_seed
from sisa.training.shard_trainer import init_seed

FEATURES = 20
SYN_SPEC = DataSpec(id_column="id", label_column="label",
                    feature_columns=tuple(f"f{i}" for i in range(FEATURES)),
                    group_column="user", prior_column="prior")
NO_GROUP_SPEC = DataSpec(id_column="id", label_column="label",
                         feature_columns=SYN_SPEC.feature_columns, prior_column="prior")


@dataclass(frozen=True)
class Mode:
    """Sizes of one run of the suite."""

    name: str
    synthetic_rows: int  # rows of the synthetic numeric data (retrain cost, overhead)
    stream_rows: int  # rows for the deletion streams and placement
    grid_shards: tuple[int, ...]
    grid_slices: tuple[int, ...]
    deletion_rounds: int  # rounds per (S, R): a warm and a cold deletion per slice index, a scratch retrain
    stream_length: int  # deletions per stream
    batch_sizes: tuple[int, ...]  # K for batched against one-at-a-time
    text_train: int | None  # Rotten Tomatoes training records for `head` (None: all)
    lora_train: int | None  # Rotten Tomatoes training records for `lora` (0: skip)
    lora_shards: tuple[int, ...]
    accuracy_shards: tuple[int, ...]
    overhead_repeats: int = 3  # paired runs of SISA S=1 R=1 and the plain loop; the median counts


MODES = {
    "full": Mode("full", 200_000, 50_000, (1, 2, 4, 8, 16), (1, 2, 4, 8), 2, 100,
                 (1, 2, 4, 8, 16, 32, 64), None, 1500, (1, 2, 4), (1, 2, 4, 8, 16)),
    "quick": Mode("quick", 20_000, 10_000, (1, 2, 4, 8, 16), (1, 2, 4, 8), 3, 100,
                  (1, 2, 4, 8, 16, 32, 64), 1000, 160, (1, 2), (1, 2, 4, 8, 16)),
    # For the smoke test: every code path, seconds of work, numbers meaningless.
    "tiny": Mode("tiny", 1_200, 600, (1, 2), (1, 2), 1, 4, (1, 2), 0, 0, (1,), (1, 2), 1),
}


def synthetic_rows(n: int, seed: int = 0, prefix: str = "syn") -> list[dict[str, Any]]:
    """A numeric binary task from a fixed random teacher (10% label noise), 10 records a user,
    and a Pareto prior per user (how likely that user is to ask for deletion)."""
    teacher = np.random.default_rng(12345).normal(size=FEATURES)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES))
    logits = x @ teacher + 0.5 * np.sin(3 * x[:, 0])
    y = (logits > 0).astype(int)
    flip = rng.random(n) < 0.1
    y[flip] = 1 - y[flip]
    users = np.arange(n) // 10
    prior_of_user = rng.pareto(1.5, size=users.max() + 1)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"{prefix}-{i:07d}", "label": int(y[i]),
                               "user": f"{prefix}-u{users[i]:06d}",
                               "prior": float(prior_of_user[users[i]])}
        row.update({f"f{j}": float(v) for j, v in enumerate(x[i])})
        rows.append(row)
    return rows


def mlp_config(shards: int, slices: int, epochs: int = 2, seed: int = 0, **partition: Any) -> SisaConfig:
    return SisaConfig(
        partition=PartitionConfig(shards=shards, slices=slices, seed=seed, **partition),
        training=MLPConfig(epochs_per_slice=epochs, batch_size=128, learning_rate=3e-3,
                           hidden_sizes=(64,)),
        execution=ExecutionConfig(progress=False),
    )


def warm_up(work: Path) -> None:
    """Train and forget once on a little synthetic data, so that no timed run pays torch's
    one-off costs (lazy initialisation, first kernels, the allocator's first pages)."""
    sisa = Sisa.train(work, synthetic_rows(2000, prefix="warm"), mlp_config(2, 2), SYN_SPEC)
    sisa.forget(["warm-0000000"])
    sisa.close()


def expected_shards_hit(shards: int, k: int) -> float:
    return shards * (1 - (1 - 1 / shards) ** k)


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    box: dict[str, float] = {}
    started = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - started


GPU_ENV = "SISA_BENCH_GPUS_PER_SHARD"  # set by benchmarks/gpu.py: shards train on the GPU


def execution() -> ExecutionConfig:
    """The benchmarks' execution config: in this process, no progress bars; on the GPU (this
    share of it per shard) when the GPU script sets SISA_BENCH_GPUS_PER_SHARD."""
    return ExecutionConfig(progress=False, gpus_per_shard=float(os.environ.get(GPU_ENV, "0")))


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}{gpu}")


def save_figure(fig: Any, out: Path, name: str) -> Path:
    """Write a matplotlib figure as `out/name` and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))


def plain_torch_loop(sisa: Sisa) -> tuple[float, int]:
    """The same optimizer steps as the store's training, with no store, hashing or checkpoints."""
    config = sisa.config
    t, p = config.training, config.partition
    if not isinstance(t, MLPConfig):
        raise TypeError(f"the plain loop mirrors the mlp backend, not {t.backend!r}")
    schedules = sisa.schedules()
    shard_data = sisa.shard_data()
    # Data preparation is outside the timed region, as it is for a hand-written loop.
    data = []
    for shard, sched in schedules.items():
        x = torch.tensor(shard_data[shard].inputs, dtype=torch.float32)
        y = torch.as_tensor(shard_data[shard].targets)
        data.append((shard, x, y, sched.cumulative_counts()))
    torch.set_num_threads(t.torch_threads)
    steps = 0
    started = time.perf_counter()
    for shard, x, y, sizes in data:
        torch.manual_seed(init_seed(p.seed, shard))
        layers: list[nn.Module] = []
        width = x.shape[1]
        for h in t.hidden_sizes:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        net = nn.Sequential(*layers, nn.Linear(width, len(sisa.classes_)))
        opt = torch.optim.AdamW(net.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
        for k, n in enumerate(sizes):
            for epoch in range(t.epochs_per_slice):
                order = torch.randperm(n, generator=torch.Generator().manual_seed(
                    derive_seed(p.seed, shard, k, epoch)))
                for batch in order.split(t.batch_size):
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
                    opt.step()
                    steps += 1
    return time.perf_counter() - started, steps


def seconds_per_token(scorer: Any, prompt: list[int], combine: Any, tokens: int,
                      repeats: int = 1) -> float:
    """Median seconds per generated token of greedy decoding from `prompt` under `combine`,
    after a warm-up (which also builds a merged adapter once)."""
    from sisa.serving.generation import decode

    decode(scorer, prompt, 2, combine)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        made = decode(scorer, prompt, tokens, combine, stop=())
        times.append((time.perf_counter() - started) / max(1, len(made)))
    return sorted(times)[len(times) // 2]


def _yes_no(text: str) -> bool:
    """A yes/no option's value (yes, no, true, false, 1, 0)."""
    value = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise ValueError(text)  # argparse: "invalid _yes_no value"
    return value


def lm_benchmark_main(doc: str | None, full: Any, tiny: Any, run: Any, summary: Any, prefix: str,
                      options: Sequence[str] = ()) -> None:
    """The command line the causal-LM benchmarks share: --out, --tiny (with --model DIR, a small
    causal LM), --model, and an option for each setting field in `options` (`per_user`:
    --per-user, of the field's type; given, it replaces the field of the full or tiny setting);
    runs `run(setting, out, work)` in a temporary directory and prints `summary(result)`."""
    import argparse
    import dataclasses
    import tempfile

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="seconds of work: every code path")
    parser.add_argument("--model", help="causal LM directory (default: the packaged SmolLM2)")
    for name in options:
        default = getattr(full, name)
        kind = _yes_no if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, dest=name,
                            help=f"the setting's {name} (default {default})")
    args = parser.parse_args()
    setting = tiny if args.tiny else full
    if args.model:
        setting = dataclasses.replace(setting, model=args.model)
    given = {name: getattr(args, name) for name in options if getattr(args, name) is not None}
    if given:
        setting = dataclasses.replace(setting, **given)
    if not setting.model:
        parser.error("--tiny needs --model DIR (a small causal LM)")
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        result = run(setting, args.out, Path(tmp))
    print(summary(result))
    print(json.dumps({"out": str(args.out)}))
