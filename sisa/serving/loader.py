"""The one loader: where a registered checkpoint's bytes are read and verified, and where the live
checkpoints become a servable model.

`read_checkpoint` is the only reader of checkpoint files, for serving and for the parent a retrain
resumes from: each file's bytes are read once and checked against the sha256 the store recorded
(the bytes hashed are the bytes used). `Loader` turns a set of live checkpoints, named by shard
and weights sha256, into an `Ensemble`: each checkpoint is fetched once (from the store, or from
wherever `fetch` gets bytes by digest) and cached by shard and digest, so no cache can hand out a
pre-deletion model; an ensemble of fewer shards is a view of the loaded one (nothing reloads).
The library (`Sisa.ensemble`), the HTTP service and Ray Serve replicas all load through it; a
replica on a node without the store gets bytes by digest (`checkpoint_files` where the store is,
`received` where they arrive, verified at both ends).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from shard_store import CheckpointFileError, CheckpointRow, ShardStore
from sisa.checkpoint import MANIFEST, WEIGHTS, Checkpoint
from sisa.errors import CheckpointError, CheckpointMovedError, NoServableShardError
from sisa.features import Features
from sisa.serving.ensemble import Ensemble
from sisa.training.jobs import init_seed
from sisa.training.protocol import Backend

# fetch(shard, weights sha256) -> that checkpoint, verified; CheckpointMovedError if the shard's
# live checkpoint is no longer that one.
Fetch = Callable[[int, str], Checkpoint]


def read_checkpoint(store: ShardStore, row: CheckpointRow) -> Checkpoint:
    """A registered checkpoint's weights and manifest, verified: its registration against its
    seal (a keyed digest), each file's bytes (read once, never through a link) against the sha256
    registered, and the manifest against the registration. Anything else is CheckpointError."""
    blobs, where = _sealed_blobs(store, row)
    return Checkpoint.from_blobs(blobs, row.key, where)


def _sealed_blobs(store: ShardStore, row: CheckpointRow) -> tuple[dict[str, bytes], str]:
    """The weights' and manifest's bytes, the registration checked against its seal and each
    file against its registered sha256; and where they are (for messages)."""
    where = repr(str(store.root / row.path))
    if not store.sealed(row):
        raise CheckpointError(f"checkpoint {where} (shard {row.shard}, slice {row.slice}) fails its "
                              "seal: its registration (files and their sha256) was altered")
    try:
        return store.read_files(row, [WEIGHTS, MANIFEST]), where
    except CheckpointFileError as exc:
        raise CheckpointError(f"{exc} (shard {row.shard}, slice {row.slice})") from exc


def store_fetch(store: ShardStore) -> Fetch:
    """Fetch live checkpoints from the store on this machine. A checkpoint that a writer replaced
    (and whose files it may have removed) while it was read is `CheckpointMovedError`, not damage."""
    return _live(store, read_checkpoint)


T = TypeVar("T")


def _live(store: ShardStore, read: Callable[[ShardStore, CheckpointRow], T]) -> Callable[[int, str], T]:
    """fetch(shard, weights sha256) -> `read` of that live checkpoint; `CheckpointMovedError` if
    it is not (or stopped being, while read) the shard's live one."""

    def fetch(shard: int, sha256: str) -> T:
        row = store.live().get(shard)
        if row is None or row.sha256 != sha256:
            raise CheckpointMovedError(f"shard {shard}'s live checkpoint changed while it was read")
        try:
            return read(store, row)
        except CheckpointError:
            again = store.live().get(shard)
            if again is None or again.sha256 != sha256:
                raise CheckpointMovedError(f"shard {shard}'s live checkpoint changed while it was "
                                           "read") from None
            raise  # damage, not a writer that swapped it meanwhile

    return fetch


class Loader:
    """Servable models of one store's backend, for many threads at once (one reload at a time)."""

    def __init__(self, backend: Backend, features: Features, seed: int,
                 device: str | Callable[[], str], fetch: Fetch) -> None:
        """`device`: where the models run, or how to find out when the first one loads (asking
        whether there is a GPU imports torch, which a store opened for its audit never needs)."""
        self.backend = backend
        self.features = features
        self.seed = seed
        self._device = device
        self.fetch = fetch
        self.reads = 0  # checkpoints fetched since start (a reload fetches only what changed)
        # (shard, weights sha256) -> why that checkpoint failed verification: it never serves.
        self.damaged: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, str], Checkpoint] = {}  # (shard, weights sha256) -> checkpoint
        self._ensemble: Ensemble | None = None

    @functools.cached_property
    def device(self) -> str:
        return self._device() if callable(self._device) else self._device

    @property
    def loaded(self) -> dict[int, str]:
        """shard -> weights sha256 of the models the current ensemble holds."""
        current = self._ensemble
        return dict(current.shas) if current is not None else {}

    def unservable(self, wanted: Mapping[int, str]) -> dict[int, str]:
        """Which of these checkpoints failed verification when loaded, and why."""
        return {s: self.damaged[(s, sha)] for s, sha in wanted.items() if (s, sha) in self.damaged}

    def ensemble(self, wanted: Mapping[int, str], exact: bool = True) -> Ensemble:
        """The ensemble of these checkpoints (shard -> weights sha256), less any that fails its
        verification (it is remembered, and never served). Checkpoints already loaded are not
        read again; without `exact`, an ensemble holding more shards (with these very weights)
        will do, and the caller drops the extra shards' outputs."""
        wanted = {s: sha for s, sha in sorted(wanted.items()) if (s, sha) not in self.damaged}
        if not wanted:
            raise NoServableShardError("no shard can serve: every shard is empty, has a deletion "
                                       "pending, or failed its verification")
        with self._lock:
            current = self._ensemble
            if current is not None and all(current.shas.get(s) == sha for s, sha in wanted.items()):
                return current if not exact or current.shas == wanted else current.subset(wanted)
            keys = set(wanted.items())
            for key in sorted(keys - set(self._cache)):
                try:
                    self._cache[key] = self.fetch(*key)
                except CheckpointError as exc:  # damage (a moved checkpoint is another error)
                    self.damaged[key] = str(exc).splitlines()[0]
                    continue
                self.reads += 1
            keys = {k for k in keys if k in self._cache}
            wanted = dict(sorted(keys))
            if not wanted:
                raise NoServableShardError("no shard can serve: every servable shard's checkpoint "
                                           "failed its verification")
            for key in set(self._cache) - keys:
                del self._cache[key]
            checkpoints = {s: self._cache[(s, sha)] for s, sha in wanted.items()}
            from sisa.serving.scorers import build_scorer  # torch, now that a model loads
            from sisa.training.state import model_tensors

            weights = {s: model_tensors(c.tensors()) for s, c in checkpoints.items()}
            scorer = build_scorer(self.backend, weights, init_seed(self.seed, min(weights)), self.device)
            self._ensemble = Ensemble(self.backend, self.features, scorer,
                                      {s: c.sha256 for s, c in checkpoints.items()})
            return self._ensemble


@dataclass(frozen=True)
class CheckpointFiles:
    """A live checkpoint's files as they travel to a process that cannot read the store (a Ray
    Serve replica on another node): the bytes as read, and the sha256 its sealed registration
    gives each file. Bytes and digests, checked again on arrival (see `received`); Ray carries them
    between its processes as it carries everything (pickled), within the trusted cluster."""

    shard: int
    key: str
    blobs: dict[str, bytes]  # file name -> bytes: the weights and the manifest
    sha256: dict[str, str]  # file name -> sha256 registered for it (sealed)


def checkpoint_files(store: ShardStore, row: CheckpointRow) -> CheckpointFiles:
    """A registered checkpoint's weights and manifest as bytes, verified as `read_checkpoint`
    verifies them (seal, each file's sha256, the manifest against the registration), for a
    process that cannot read the store (which verifies them again on arrival)."""
    blobs, where = _sealed_blobs(store, row)
    Checkpoint.from_blobs(blobs, row.key, where)  # the manifest, checked where the store is too
    return CheckpointFiles(row.shard, row.key, blobs, {n: row.files[n] for n in blobs})


def store_files(store: ShardStore) -> Callable[[int, str], CheckpointFiles]:
    """`store_fetch`, as bytes to send: fetch(shard, weights sha256) -> that live checkpoint's
    files; `CheckpointMovedError` if it is no longer the shard's live one, CheckpointError if
    it is damaged."""

    return _live(store, checkpoint_files)


def received(files: CheckpointFiles, shard: int, sha256: str, where: str) -> Checkpoint:
    """Checkpoint bytes sent from elsewhere, verified on arrival as a read from the store is:
    they are the checkpoint asked for (shard, weights sha256), each file's bytes hash to the
    sha256 its registration gives, and the manifest is the one registered under its key.
    Anything else is CheckpointError (the checkpoint never serves here)."""
    if files.shard != shard or files.sha256.get(WEIGHTS) != sha256:
        raise CheckpointError(f"checkpoint {where}: asked for shard {shard} at weights sha256 "
                              f"{sha256[:16]}..., received another")
    for name in (WEIGHTS, MANIFEST):
        blob, registered = files.blobs.get(name), files.sha256.get(name)
        if blob is None or registered is None or hashlib.sha256(blob).hexdigest() != registered:
            raise CheckpointError(f"checkpoint {where} (shard {shard}): {name} does not match the "
                                  "sha256 registered for it (damaged in transit, or altered)")
    checkpoint = Checkpoint.from_blobs(files.blobs, files.key, where)
    if checkpoint.shard != shard:
        raise CheckpointError(f"checkpoint {where}: its manifest names shard {checkpoint.shard}, "
                              f"not {shard}")
    return checkpoint
