"""One writer per table: a lease with a heartbeat and an epoch.

Two runs writing one table at once break it in ways Lance's conflict detection does not
see: Lance rebases two Appends over each other (every row twice), and a resuming run's
orphan removal deletes the other run's written-but-uncommitted files (the table then
names files that are gone). So every writing run holds the table's lease:

- a second run fails at once, naming the holder's host, pid and start time, or with
  `wait` polls until the lease is free;
- a holder on this machine whose process has exited (a killed driver) is known dead at
  once (host name, boot id and pid), so its rerun goes ahead without waiting;
- the holder rewrites its heartbeat every `HEARTBEAT_S`; a lease whose heartbeat is
  older than `TIMEOUT_S` belongs to a dead run and can be taken over, which raises the
  epoch;
- a takeover of a silent holder fences the table (`fence`): it commits a `Restore` of
  the latest version
  and a config write of its epoch, which Lance's own conflict detection then holds
  against every late transaction of the old holder, so a run that stalled anywhere, even
  between its lease check and its commit, cannot commit once taken over;
- before each commit the holder also checks that the lease still names it at its epoch
  (`Lease.check`), so it learns early and says so;
- orphan files may be removed only under the lease, and after a takeover only those
  older than the dead holder's last heartbeat (`Lease.orphans_before`).

The lease is one small JSON object beside the table (`t.lance` → `.t.lance.lease.json`
on disk, `t.lance.quiver-lease.json` on S3), outside Lance's own folders. Each change is
a compare-and-swap: on a local or NFS disk under an `flock` of a lock file, on S3 by
conditional writes (`If-None-Match: *` to create, `If-Match: <etag>` to replace), which
S3 and S3-compatible servers enforce. Other object stores are refused for writing until
they have one (GCS's generation match is the same idea, not written yet).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from schemas.errors import ConcurrentWriteError, TableError

HEARTBEAT_S = 10.0
"""How often the holder rewrites its heartbeat."""
TIMEOUT_S = float(os.environ.get("QUIVER_LEASE_TIMEOUT_S", "60"))
"""A lease watched unchanged this long is a dead (or stalled) run's: six missed
heartbeats, long beyond a Python pause or a slow object-store write, short enough that a
crashed nightly run does not hold the next one back for long. `QUIVER_LEASE_TIMEOUT_S`
changes it (every run on a table must agree; `benchmarks/lease_stall.py` uses 5 s)."""
POLL_S = 1.0
"""How often a waiting run looks at the lease again."""


class LeaseHeldError(ConcurrentWriteError):
    """Another live run holds the table's lease."""


class LeaseLostError(ConcurrentWriteError):
    """This run's lease was taken over (it stalled past `TIMEOUT_S`): it must not commit."""


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object holds."""

    holder: str
    """A fresh id per run."""
    host: str
    pid: int
    started: float
    """When the holder took the lease (Unix seconds)."""
    heartbeat: float
    epoch: int
    """Raised by every acquisition; a commit checks it."""
    purpose: str = ""
    boot: str = ""
    """The holder machine's boot id: with the host name, what tells that a holder on this
    machine has exited (its pid is gone), so its lease goes at once."""
    pidns: str = ""
    """The holder's PID namespace (`/proc/self/ns/pid`): containers that share a host name
    and boot id do not share pids, so a pid is only looked up in the namespace it is in."""

    def exited(self) -> bool:
        """Whether the holder is known to be gone: it ran on this machine (same host
        name and boot id) in this PID namespace, and its pid no longer exists. A reused
        pid reads as alive, and a holder elsewhere (another machine, another container's
        namespace, or a record without one) is never known gone: it waits for the
        timeout."""
        if not self.holder or self.host != socket.gethostname() or self.boot != _boot_id() \
                or not self.pidns or self.pidns != _pid_namespace():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"pid {self.pid} on {self.host}, since {started} (epoch {self.epoch}, "
                f"last heartbeat {time.time() - self.heartbeat:.0f}s ago)")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


class _Conflict(Exception):
    """A compare-and-swap lost the race; read again."""


def try_file_lock(path: Path, *, block: bool = False) -> int | None:
    """An exclusive `flock` on `path` (created if missing; its folder too), across
    processes on a local or NFS disk: the open descriptor that holds it (close it to
    release), or None when another holds it and `block` is false. The kernel drops the
    lock when its holder dies, so there is no stale lock to detect or take over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` for the block (`try_file_lock`, waiting)."""
    fd = try_file_lock(path, block=True)
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


class _LocalStore:
    """The lease file beside a local table; swaps under an `flock` of a lock file."""

    def __init__(self, table: Path) -> None:
        self.path = table.parent / f".{table.name}.lease.json"
        self._lock = table.parent / f".{table.name}.lease-lock"

    def _locked(self):
        return file_lock(self._lock)

    def read(self) -> tuple[LeaseRecord | None, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        return LeaseRecord(**json.loads(raw)), raw

    def swap(self, record: LeaseRecord, token: Any) -> Any:
        """Write `record` if the lease is still what `token` says."""
        with self._locked():
            _, now = self.read()
            if now != token:
                raise _Conflict
            raw = json.dumps(asdict(record)).encode()
            tmp = self.path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            tmp.write_bytes(raw)
            os.replace(tmp, self.path)
            return raw


class _S3Store:
    """The lease object beside an S3 table, swapped with conditional writes."""

    def __init__(self, uri: str, options: Mapping[str, str]) -> None:
        import boto3
        from botocore.config import Config

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        self.bucket, self.key = bucket, key.rstrip("/") + ".quiver-lease.json"
        self.client = boto3.client(
            "s3", endpoint_url=options.get("aws_endpoint") or options.get("endpoint"),
            region_name=options.get("aws_region") or options.get("region") or "us-east-1",
            aws_access_key_id=options.get("aws_access_key_id"),
            aws_secret_access_key=options.get("aws_secret_access_key"),
            aws_session_token=options.get("aws_session_token"),
            config=Config(retries={"max_attempts": 3}))

    def read(self) -> tuple[LeaseRecord | None, Any]:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None, None
        return LeaseRecord(**json.loads(got["Body"].read())), got["ETag"]

    def swap(self, record: LeaseRecord, token: Any) -> Any:
        from botocore.exceptions import ClientError

        try:
            body = json.dumps(asdict(record)).encode()
            condition = {"IfMatch": token} if token is not None else {"IfNoneMatch": "*"}
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                          **condition)["ETag"]
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise _Conflict from None
            raise


def _store(uri: str, options: Mapping[str, str]):
    if uri.startswith("s3://"):
        return _S3Store(uri, options)
    if "://" in uri and not uri.startswith("file://"):
        raise TableError(f"{uri}: Quiver writes tables on local disks and S3 only, where a "
                         "run can hold the table's lease (conditional writes); "
                         f"{uri.split('://')[0]}:// has none yet")
    return _LocalStore(Path(uri.removeprefix("file://")).absolute())


EPOCH_KEY = "quiver.lease_epoch"
"""Table config key: the lease epoch of the last fence or config write."""


def fence(uri: str, storage_options: Mapping[str, str] | None, *, epoch: int) -> int | None:
    """Make Lance itself refuse every late commit of the holder just taken over.

    A takeover commits a `Restore` of the latest version, then an `UpdateConfig` of
    `EPOCH_KEY`. Lance then refuses, with `CommitConflictError`, any transaction read
    from an earlier version that could land on top: an `Append`, `Update`, `Delete`,
    `Rewrite` (compaction) or `Merge` conflicts with the `Restore`, and a config write
    that names `EPOCH_KEY` (Quiver's own: `operators.write.mark_finished`) with the
    `UpdateConfig`. No timing is involved: a holder that stalled anywhere, even between
    its lease check and its commit, cannot commit once fenced. Returns the version the
    fence ends at (None: there is no table yet, so nothing to fence).
    """
    import lance

    try:
        latest = lance.dataset(uri, storage_options=dict(storage_options or {}) or None)
    except ValueError:
        return None  # no table yet
    options = dict(storage_options or {}) or None
    version = latest.version
    ds = lance.LanceDataset.commit(uri, lance.LanceOperation.Restore(version),
                                   read_version=version, storage_options=options)
    update = lance.LanceOperation.UpdateConfig(
        config_updates=lance.LanceOperation.UpdateMap({EPOCH_KEY: str(epoch)}))
    ds = lance.LanceDataset.commit(uri, update, read_version=ds.version,
                                   storage_options=options)
    return ds.version


class Lease:
    """This run's hold on one table's lease (see the module docstring)."""

    def __init__(self, store, record: LeaseRecord, token: Any,
                 previous: LeaseRecord | None, *, gone: bool = False, fenced: bool = False,
                 heartbeat_s: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self._store, self.record, self._token = store, record, token
        self.previous = previous
        """The dead holder this lease was taken over from, if any."""
        self._previous_gone = gone
        self._fenced = fenced
        self._heartbeat_s, self._clock = heartbeat_s, clock
        self._lost: str | None = None
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeats, daemon=True,
                                      name="quiver-lease-heartbeat")
        self._beat.start()

    @classmethod
    def acquire(cls, uri: str, storage_options: Mapping[str, str] | None = None, *,
                purpose: str = "", wait: bool = False, timeout_s: float = TIMEOUT_S,
                heartbeat_s: float = HEARTBEAT_S,
                clock: Callable[[], float] = time.time) -> Lease:
        """Take the table's lease, taking over one whose holder stopped beating.

        Whether a holder stopped is decided on this run's own monotonic clock, never by
        comparing the holder's clock with ours: a lease is taken over only after this
        run has watched it stay unchanged for `timeout_s` (a live holder rewrites it
        every `heartbeat_s`). The heartbeat's age by `clock` (the holder's clock, written
        in the record) only decides whether to watch at all: a lease that looks fresh is
        refused at once (waited for with `wait`), one that looks stale is watched first.
        So a skewed clock can cost a wait, never the takeover of a live holder.

        Raises:
            LeaseHeldError: a live run holds it (and `wait` is off), naming that run.
        """
        store = _store(str(uri), storage_options or {})
        me = uuid.uuid4().hex
        said = False
        watched: tuple[Any, float] | None = None  # (token, when first seen unchanged)
        while True:
            held, token = store.read()
            exited = held is not None and held.exited()
            silent = beating = False
            if held is not None and held.holder and not exited:
                if watched is None or watched[0] != token:
                    beating = watched is not None  # it changed while we watched
                    watched = (token, time.monotonic())
                silent = time.monotonic() - watched[1] >= timeout_s
            if held is None or not held.holder or exited or silent:
                now = clock()
                record = LeaseRecord(me, socket.gethostname(), os.getpid(), now, now,
                                     (held.epoch if held else 0) + 1, purpose, _boot_id(),
                                     _pid_namespace())
                try:
                    new = store.swap(record, token)
                except _Conflict:
                    continue  # someone else moved first: look again
                fenced = None
                if held is not None and held.holder:
                    print(f"[quiver] took over the table's lease from a run that "
                          f"{'exited' if exited else 'stopped beating'}: {held.describe()}",
                          file=sys.stderr, flush=True)
                if held is not None and held.holder and not exited:
                    # A silent holder may only be stalled: fence it. One known to have
                    # exited (its pid gone, in this very PID namespace) commits nothing.
                    fenced = fence(str(uri), storage_options, epoch=record.epoch)
                return cls(store, record, new, held if held and held.holder else None,
                           gone=exited, fenced=fenced is not None, heartbeat_s=heartbeat_s,
                           clock=clock)
            looks_stale = clock() - held.heartbeat > timeout_s and not beating
            if not wait and not looks_stale:
                raise LeaseHeldError(
                    f"{uri} is being written by another run: {held.describe()}"
                    + (f", {held.purpose}" if held.purpose else "") + ". Wait for it (quiver "
                    "run --wait), or if that run is dead, run again once its heartbeat is "
                    f"{timeout_s:.0f}s old")
            if not said:
                doing = "watching a lease that looks abandoned" if looks_stale \
                    else "waiting for the table's lease"
                print(f"[quiver] {doing} ({timeout_s:.0f}s unchanged before taking it "
                      f"over): {held.describe()}", flush=True, file=sys.stderr)
                said = True
            time.sleep(min(POLL_S, max(timeout_s / 4, 0.01)))

    def _heartbeats(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            try:
                self._renew()
            except LeaseLostError as err:
                self._lost = str(err)
                return
            except Exception:  # noqa: BLE001 - a failed beat is retried at the next one
                continue

    def _renew(self) -> None:
        held, token = self._store.read()
        if not self._mine(held):
            raise LeaseLostError(self._lost_message(held))
        record = LeaseRecord(**{**asdict(self.record), "heartbeat": self._clock()})
        try:
            self._token = self._store.swap(record, token)
        except _Conflict:
            raise LeaseLostError(self._lost_message(self._store.read()[0])) from None
        self.record = record

    def _mine(self, held: LeaseRecord | None) -> bool:
        return held is not None and held.holder == self.record.holder \
            and held.epoch == self.record.epoch

    def _lost_message(self, held: LeaseRecord | None) -> str:
        who = held.describe() if held and held.holder else "nobody (it was freed)"
        return (f"this run's lease on the table (epoch {self.record.epoch}) was taken over; "
                f"it is now held by {who}. Nothing more is committed by this run")

    def check(self) -> None:
        """Before a commit: the lease still names this run at its epoch.

        Raises:
            LeaseLostError: it was taken over.
        """
        if self._lost:
            raise LeaseLostError(self._lost)
        held, _ = self._store.read()
        if not self._mine(held):
            self._lost = self._lost_message(held)
            raise LeaseLostError(self._lost)

    def orphans_before(self) -> float:
        """Files older than this may be removed as orphans: everything when the lease
        was free (its last holder released it), its holder is known to have exited, or
        the takeover fenced the table (no late commit of the old holder can land, so
        nothing it wrote can become referenced); after a takeover of a table not yet
        created (nothing to fence), only what the silent holder wrote before its last
        heartbeat."""
        if self.previous is None or self._previous_gone or self._fenced:
            return time.time()
        return self.previous.heartbeat

    def release(self) -> None:
        """Stop beating and free the lease if it is still this run's."""
        self._stop.set()
        self._beat.join(timeout=self._heartbeat_s)
        if self._lost:
            return
        with contextlib.suppress(_Conflict):  # freed, epoch kept: epochs only ever rise
            held, token = self._store.read()
            if held is not None and held.holder == self.record.holder:
                self._store.swap(LeaseRecord("", "", 0, 0.0, 0.0, self.record.epoch), token)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
