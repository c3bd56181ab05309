"""CLI options generated from the config dataclasses' fields: one source for names, types, help and
defaults. `sisa.cli` attaches them to its commands; `markdown_table()` is the README's option table.

A training option belongs to the backends whose config class has the field; its default is that
class's default (shown per backend), and giving it for another backend is an error.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import typer

from sisa.config import (
    TRAINING_CONFIGS,
    DataSpec,
    ExecutionConfig,
    PartitionConfig,
    ServiceConfig,
    SisaConfig,
    StoreConfig,
    TrainingConfig,
    training_config,
)
from sisa.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

# The option groups, and the config class whose fields make each one.
GROUPS: dict[str, type] = {"data": DataSpec, "partition": PartitionConfig, "training": TrainingConfig,
                           "execution": ExecutionConfig, "serving": SisaConfig,
                           "service": ServiceConfig, "store": StoreConfig}
# The groups of the README's option table (the service's options are in docs/cli.md).
TABLE_GROUPS = ("data", "partition", "execution", "serving", "training")
# The help panels of a command's generated options, in the order `--help` shows them (after the
# command's own options); a training option that only some backends take gets a panel named after
# them, as the README's table does.
PANELS = {"data": "Data", "partition": "Partition", "service": "Service", "execution": "Execution",
          "serving": "Serving", "training": "Training", "store": "Key and witness"}


@dataclass(frozen=True)
class ConfigOption:
    group: str
    field: str  # the dataclass field
    name: str  # the command's parameter (and, with dashes, its flag)
    kind: str  # "int", "float", "str", "bool", "ints" or "strs" (comma-separated lists)
    help: str
    defaults: dict[str, Any]  # backend -> default for training options; {"": default} otherwise
    negate: bool = False  # a flag that sets the (default True) field to False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def default(self) -> Any:
        """The command's default: None where it depends on the backend (or on the data)."""
        if self.group == "data" or (self.group == "training" and self.field != "backend"):
            return None
        return False if self.negate else self.defaults[""]

    def parse(self, value: Any) -> Any:
        """A typed value from what the command line gave."""
        if self.negate:
            return not value
        if value is None or self.kind not in ("ints", "strs"):
            return value
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if self.kind == "strs":
            return tuple(parts)
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ConfigError(f"{self.flag} takes comma-separated integers, got {value!r}") from None

    def annotation(self) -> Any:
        base = {"int": int, "float": float, "str": str, "bool": bool}.get(self.kind, str)
        optional = self.default is None
        # Where the command's default is None (it depends on the backend, or on a built-in data
        # set), the help still shows the default that applies: the README's text for it.
        shown: bool | str = True
        if optional:
            shown = self.default_text() if self.default_text() != "-" else False
        return Annotated[base | None if optional else base,
                         typer.Option(self.flag, help=self.help, show_default=shown,
                                      rich_help_panel=self.panel)]

    def backends(self) -> list[str]:
        return [b for b in self.defaults if b]

    @property
    def where(self) -> str:
        """What the option is for, as the README's table says: its group, or for a training
        option that only some backends take, those backends."""
        if self.group == "training" and self.field != "backend" \
                and len(self.backends()) < len(TRAINING_CONFIGS):
            return ", ".join(self.backends())
        return self.group

    @property
    def panel(self) -> str:
        """The panel of `--help` that lists it."""
        if self.where != self.group:
            return f"{PANELS['training']}: {self.where}"
        return PANELS[self.group]

    def panel_order(self) -> tuple[int, int, int]:
        """Sorts options into PANELS' order; the backends' panels follow the training one, by
        their first backend (the widest first)."""
        rank = list(PANELS).index(self.group)
        if self.where == self.group:
            return rank, 0, 0
        backends = list(TRAINING_CONFIGS)
        return rank, 1 + min(backends.index(b) for b in self.backends()), -len(self.backends())

    def default_text(self) -> str:
        """The default as the docs show it: one value, or one per backend."""
        if self.group == "data":
            return _show(self.defaults[""]) if self.defaults[""] else "-"
        shown = {b: _show(v) for b, v in self.defaults.items()}
        if len(set(shown.values())) == 1:
            return next(iter(shown.values()))
        return ", ".join(f"{b} {v}" for b, v in shown.items())


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return '""' if not value else ",".join(map(str, value))
    return str(value)


def _kind(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return "ints" if args and args[0] is int else "strs"
    if origin in (types.UnionType, typing.Union) and len(args) == 1:
        return _kind(args[0])
    if origin is typing.Literal:
        return "str"
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(annotation, "str")


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)
            if f.metadata.get("cli", False)]


def _collect() -> list[ConfigOption]:
    out: list[ConfigOption] = []
    for group, cls in GROUPS.items():
        if group == "training":
            continue
        for f, annotation in _fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            out.append(ConfigOption(group, f.name, f.metadata["flag"] or f.name, _kind(annotation),
                                    f.metadata["help"], {"": default}, f.metadata.get("negate", False)))
    training: dict[str, ConfigOption] = {}
    for backend, cls in TRAINING_CONFIGS.items():
        for f, annotation in _fields(cls):
            known = training.get(f.name)
            defaults = {**(known.defaults if known else {}), backend: f.default}
            training[f.name] = ConfigOption("training", f.name, f.metadata["flag"] or f.name,
                                            _kind(annotation), f.metadata["help"], defaults)
    backend_option = ConfigOption(
        "training", "backend", "backend", "str",
        "; ".join(f"{b}: {c.summary}" for b, c in TRAINING_CONFIGS.items()) + ".", {"": "mlp"})
    return [*out, backend_option, *training.values()]


OPTIONS: list[ConfigOption] = _collect()
# A field's name in a config error, as the command line spells it (`no_auth` -> `--no-auth`;
# `epochs_per_slice` -> `--epochs`). A negated field's flag says the opposite: left alone.
_FLAGS = {o.field: o.flag for o in OPTIONS if not o.negate}
# Not inside a path or a file name (`/srv/top_k_layers/m`, `model.key_file`): those are values.
_FIELD = re.compile(r"(?<![\w'\"/\\.-])(" + "|".join(sorted(map(re.escape, _FLAGS), key=len, reverse=True))
                    + r")(?![\w'\"/\\.-])")


def in_flags(message: str) -> str:
    """A config error's message naming options, not fields: a name with an underscore wherever it
    stands (unquoted: a quoted one is a value), a one-word name where it is the subject of
    "must" (`port must be ...`), since as a plain word (`seed`, `model`) it may mean the thing."""

    def flag(match: re.Match[str]) -> str:
        name = match.group(1)
        if "_" in name or message.startswith(" must", match.end()):
            return _FLAGS[name]
        return name

    return _FIELD.sub(flag, message)


def _naming_flags(build: F) -> F:
    """`build` with the config errors it raises naming the options that set the bad values."""

    @functools.wraps(build)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return build(*args, **kwargs)
        except ConfigError as exc:
            exc.args = (in_flags(str(exc)), *exc.args[1:])
            raise

    return wrapper  # type: ignore[return-value]


def options(*groups: str) -> list[ConfigOption]:
    return [o for o in OPTIONS if o.group in groups]


def with_options(*groups: str, exclude: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Give a typer command the options of these groups (but those named in `exclude`). The
    command takes them as `**values` (keyword arguments named after the options) and passes them
    to `build_*` below."""
    generated = sorted((o for o in options(*groups) if o.name not in exclude),
                       key=ConfigOption.panel_order)  # a stable sort: the fields' order within

    def decorate(func: F) -> F:
        hints = typing.get_type_hints(func, include_extras=True)
        signature = inspect.signature(func)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                                   annotation=o.annotation()) for o in generated]
        func.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        func.__annotations__ = {**{p.name: p.annotation for p in own},
                                **{p.name: p.annotation for p in extra}}
        return func

    return decorate


def _values(group: str, values: Mapping[str, Any], skip_none: bool) -> dict[str, Any]:
    out = {}
    for o in options(group):
        if o.name in values and not (skip_none and values[o.name] is None):
            out[o.field] = o.parse(values[o.name])
    return out


@_naming_flags
def build_execution(values: Mapping[str, Any], progress: bool = True) -> ExecutionConfig:
    return ExecutionConfig(**_values("execution", values, skip_none=False), progress=progress)


@_naming_flags
def build_training(values: Mapping[str, Any]) -> TrainingConfig:
    given = _values("training", values, skip_none=True)
    backend = given.pop("backend", "mlp")
    cls = TRAINING_CONFIGS.get(backend)
    if cls is not None:
        known = {f.name for f in dataclasses.fields(cls)}
        foreign = [o.flag for o in options("training") if o.field in given and o.field not in known]
        if foreign:
            raise ConfigError(f"{', '.join(foreign)} do(es) not apply to --backend {backend}")
    return training_config(backend, **given)


@_naming_flags
def build_config(values: Mapping[str, Any], progress: bool = True) -> SisaConfig:
    """The store's config from a command's generated options."""
    return SisaConfig(
        partition=PartitionConfig(**_values("partition", values, skip_none=False)),
        training=build_training(values),
        execution=build_execution(values, progress),
        **_values("serving", values, skip_none=False),
    )


@_naming_flags
def build_service(values: Mapping[str, Any], token: str | None) -> ServiceConfig:
    """The service's settings from `sisa serve`'s generated options and its token."""
    return ServiceConfig(**_values("service", values, skip_none=False), token=token)


@_naming_flags
def build_store(values: Mapping[str, Any]) -> StoreConfig:
    """Where the store's key and witness are kept, from a command's generated options (or, for
    each not given, the environment)."""
    return StoreConfig(**_values("store", values, skip_none=False)).resolved()


@_naming_flags
def build_spec(values: Mapping[str, Any]) -> DataSpec | None:
    """The data's columns, or None where no column option was given (a built-in data set)."""
    given = _values("data", values, skip_none=True)
    return DataSpec(**given) if given else None


def markdown_table() -> str:
    """The README's table of configuration options."""
    lines = ["| option | for | default | what it sets |", "| --- | --- | --- | --- |"]
    for o in options(*TABLE_GROUPS):
        lines.append(f"| `{o.flag}` | {o.where} | {o.default_text()} | {o.help.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m sisa.options: the README's option table
    print(markdown_table(), end="")
