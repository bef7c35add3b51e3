"""Scheduled jobs: cron schedules and their run history, kept in the warehouse.

State lives in `<warehouse>/.quiver/`: `schedules.json` (name -> cron, spec, address, the
last slot fired) and `history.jsonl` (one line per run). Writes go through a temporary
file and `os.replace`, so a crash never leaves half a file; both survive a restart of
the scheduler.

Policy:
- Cron expressions are parsed by `croniter` (5 fields, the scheduler's local time zone
  is not used: times are UTC).
- One table is never written by two schedules at once: a run holds its table's lock
  (an `flock` of `table-<hash of the table path>.lock`), so a schedule whose table is
  busy, its own earlier run or another schedule's, records the slot as
  `skipped (table busy)`. The kernel frees the lock of a process that died. (Each
  run also holds the table's lease, `operators.lease`, against runs from elsewhere.)
- A slot is marked fired only once its run has started (a `started` line in the
  history), and recorded done only with its outcome: a scheduler that dies before the
  run starts runs that slot after its restart; one that dies mid-run leaves a `started`
  line that the restart records as `interrupted`, and that slot runs again (a job
  resumes exactly, so a second run of a slot is safe).
- `timeout_s` (per schedule): a run still going then is stopped (its process group
  killed, or the Ray job stopped), recorded as `timed out`, and the table's lock is
  freed, so the next slot runs.
- Missed runs: when the scheduler starts (or wakes) and one or more slots passed since the
  last one fired, the schedule runs once, not once per missed slot.
- Warm runs: a local run runs in a process of its own, not the scheduler's (so a timeout
  can kill it and a crash cannot take the scheduler down), but that process is kept
  between runs (`jobs._warm_runner`: imported ahead of the run and joined to the
  scheduler's own Ray, `WarmRay`, a private Ray on 127.0.0.1 that the scheduler starts
  once, before its first local run, and keeps), so its runs reuse Ray's worker
  processes, and a small run embeds on a model actor that Ray keeps loaded between runs
  (`jobs._embed_service`): most of a cold run's fixed start-up. A run past its timeout
  has its process killed and replaced. `--cold` gives each run its own `quiver run`
  process and Ray, as `quiver run` alone does.
"""

from __future__ import annotations

import json
import os
import re
import threading
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from operators.lease import try_file_lock
from schemas.errors import SpecError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
Runner = Callable[["Schedule"], dict]
"""Runs a schedule's job and returns its summary (raises on failure)."""
RUN_FIGURES = ("documents", "chunks", "tokens", "seconds", "node_hours", "cost")
"""What a remote run's history keeps of the summary its job printed."""


@dataclass
class Schedule:
    """One named, recurring job."""

    name: str
    cron: str
    spec: str
    """Absolute path of the spec file."""
    address: str | None = None
    """Ray Jobs API address; None runs the job locally."""
    created: str = ""
    last_slot: str | None = None
    """ISO time of the last cron slot that fired (None: never)."""
    workdir: str = ""
    """Where `schedule add` ran: relative paths inside the spec resolve against it."""
    timeout_s: float | None = None
    """Stop a run still going after this many seconds (None: no limit)."""
    table: str = ""
    """The spec's table, absolute: what the run lock is taken on."""

    def lock_name(self) -> str:
        """The run lock's name: per table, so two schedules of one table never overlap."""
        import hashlib

        if not self.table:
            return self.name
        return "table-" + hashlib.sha256(self.table.encode()).hexdigest()[:16]


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="seconds")


def check_cron(expr: str) -> str:
    """Validate a cron expression with croniter; returns it unchanged.

    Raises:
        SpecError: naming the expression.
    """
    from croniter import croniter

    if not croniter.is_valid(expr) or len(expr.split()) != 5:
        raise SpecError(f"--cron {expr!r} is not a 5-field cron expression "
                        "(minute hour day-of-month month day-of-week), e.g. '0 2 * * *'")
    return expr


class ScheduleStore:
    """Schedules and history under `<warehouse>/.quiver/`."""

    def __init__(self, warehouse: Path) -> None:
        self.root = Path(warehouse) / ".quiver"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # run lock name -> the descriptor holding its flock

    @property
    def _schedules_path(self) -> Path:
        return self.root / "schedules.json"

    def load(self) -> dict[str, Schedule]:
        if not self._schedules_path.is_file():
            return {}
        data = json.loads(self._schedules_path.read_text(encoding="utf-8"))
        return {name: Schedule(**entry) for name, entry in data.items()}

    def _save(self, schedules: dict[str, Schedule]) -> None:
        tmp = self._schedules_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({n: asdict(s) for n, s in schedules.items()}, indent=2),
                       encoding="utf-8")
        os.replace(tmp, self._schedules_path)

    def add(self, name: str, cron: str, spec: Path, *, address: str | None = None,
            now: datetime | None = None, timeout_s: float | None = None) -> Schedule:
        if not NAME.match(name):
            raise SpecError(f"schedule name {name!r}: use letters, digits, '.', '_', '-'")
        if not spec.is_file():
            raise SpecError(f"{spec}: spec file not found")
        from schemas.spec import load_spec

        table = load_spec(spec).table  # a bad spec fails now, not at 2 a.m.
        if "://" not in table:
            table = str((Path.cwd() / table).resolve())
        if timeout_s is not None and timeout_s <= 0:
            raise SpecError(f"--timeout {timeout_s}: must be a positive number of seconds")
        with self._lock:
            schedules = self.load()
            if name in schedules:
                raise SpecError(f"schedule {name!r} exists; remove it first")
            created = _iso(now or _now())
            schedules[name] = Schedule(name, check_cron(cron), str(spec.resolve()), address,
                                       created=created, last_slot=created,
                                       workdir=os.getcwd(), timeout_s=timeout_s, table=table)
            self._save(schedules)
            return schedules[name]

    def remove(self, name: str) -> None:
        with self._lock:
            schedules = self.load()
            if name not in schedules:
                raise SpecError(f"no schedule named {name!r}")
            del schedules[name]
            self._save(schedules)

    def mark_fired(self, name: str, slot: datetime) -> None:
        with self._lock:
            schedules = self.load()
            if name in schedules:
                schedules[name].last_slot = _iso(slot)
                self._save(schedules)

    def record(self, entry: dict) -> None:
        with self._lock, (self.root / "history.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def history(self, name: str | None = None) -> list[dict]:
        path = self.root / "history.jsonl"
        if not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        # A run writes a `started` line, then its outcome; once the outcome is there, the
        # run is that one line (a `started` line alone is a run still going, or cut off).
        done = {(r["schedule"], r["slot"], r.get("pid")) for r in rows
                if r.get("status") != "started"}
        rows = [r for r in rows if r.get("status") != "started"
                or (r["schedule"], r["slot"], r.get("pid")) not in done]
        return [r for r in rows if name is None or r["schedule"] == name]

    # -- the per-schedule run lock --------------------------------------------------------

    def _lock_path(self, name: str) -> Path:
        return self.root / f"{name}.lock"

    def try_lock(self, name: str) -> bool:
        """Take the schedule's run lock; False when a live run holds it.

        An `flock` (`operators.lease.try_file_lock`), not a pid file: the kernel frees it
        when its holder dies, so no reader can mistake a live holder for a stale one."""
        fd = try_file_lock(self._lock_path(name))
        if fd is None:
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())  # for people looking at the folder
        with self._lock:
            self._held[name] = fd
        return True

    def unlock(self, name: str) -> None:
        with self._lock:
            fd = self._held.pop(name, None)
        if fd is not None:
            os.close(fd)  # releases the flock; the file stays, unlinking it would race


def due_slot(schedule: Schedule, now: datetime) -> datetime | None:
    """The latest cron slot after the last fired one and not after `now` (None: not due).

    Several missed slots collapse into the latest one: a missed run runs once.
    """
    from croniter import croniter

    start = datetime.fromisoformat(schedule.last_slot or schedule.created)
    it = croniter(schedule.cron, start)
    slot = None
    while True:
        nxt = it.get_next(datetime)
        if nxt > now:
            return slot
        slot = nxt


class Scheduler:
    """Fires due schedules; `clock` and `runner` are injectable for tests.

    Each run happens in its own thread (so a long job does not delay other schedules),
    under the schedule's lock, and is written to the history with its outcome.
    """

    def __init__(self, store: ScheduleStore, runner: Runner,
                 clock: Callable[[], datetime] = _now, metrics=None,
                 warm: WarmRay | None = None, default_address: str | None = None) -> None:
        self.store = store
        self.runner = runner
        self.clock = clock
        self.metrics = metrics
        """A `jobs._metrics.SchedulerMetrics` to count outcomes in, or None."""
        self.warm = warm
        """The Ray local runs join (started here, in the ticking thread, before the first
        local run), or None: each run starts its own."""
        self.default_address = default_address
        self.threads: list[threading.Thread] = []
        self._recovered = False

    def tick(self) -> list[str]:
        """Start every due schedule; returns the names started."""
        now = self.clock()
        started = []
        if not self._recovered:
            self._record_interrupted()
        for schedule in self.store.load().values():
            slot = due_slot(schedule, now)
            if slot is None:
                continue
            if self.warm is not None and not (schedule.address or self.default_address):
                self.warm.start()  # here: `ray.init` wants the main thread
            if not self.store.try_lock(schedule.lock_name()):
                self.store.mark_fired(schedule.name, slot)  # this slot is over: skipped
                skipped = {"schedule": schedule.name, "slot": _iso(slot),
                           "started": _iso(now), "status": "skipped (table busy)"}
                self.store.record(skipped)
                if self.metrics is not None:
                    self.metrics.finished(skipped, ran=False)
                continue
            thread = threading.Thread(target=self._run, args=(schedule, slot), daemon=True)
            self.threads.append(thread)
            try:
                thread.start()
            except BaseException:
                self.store.unlock(schedule.lock_name())  # not started: the slot stays due
                raise
            started.append(schedule.name)
        return started

    def _record_interrupted(self) -> None:
        """Runs a previous scheduler process started but never finished (it died): their
        `started` lines get an `interrupted` outcome, once."""
        self._recovered = True
        for h in self.store.history():  # `started` lines left have no outcome
            if h.get("status") == "started" and h.get("pid") != os.getpid():
                interrupted = {**h, "status": "interrupted",
                               "error": "the scheduler stopped while this run was going; "
                                        "its slot runs again"}
                self.store.record(interrupted)
                if self.metrics is not None:
                    self.metrics.finished(interrupted, ran=False)
                # due again: the job resumes exactly, so running the slot once more is safe
                self.store.mark_fired(h["schedule"], datetime.fromisoformat(h["slot"])
                                      - timedelta(seconds=1))

    def _run(self, schedule: Schedule, slot: datetime) -> None:
        entry = {"schedule": schedule.name, "slot": _iso(slot), "started": _iso(self.clock()),
                 "pid": os.getpid()}
        if self.metrics is not None:
            self.metrics.started(schedule.name)
        try:
            self.store.record({**entry, "status": "started"})
            self.store.mark_fired(schedule.name, slot)  # only now that the run has begun
            entry["summary"] = self.runner(schedule)
            entry["status"] = "succeeded"
            if isinstance(entry["summary"], dict):  # a local run's summary: what it cost
                for key in ("node_hours", "cost"):
                    if entry["summary"].get(key):
                        entry[key] = entry["summary"][key]
        except TimeoutError as err:
            entry["status"] = "timed out"
            entry["error"] = str(err)
        except Exception as err:  # noqa: BLE001 - a failed run is history, not a crash
            entry["status"] = "failed"
            entry["error"] = f"{type(err).__name__}: {err}"
            entry["traceback"] = traceback.format_exc(limit=5)
        finally:
            entry["ended"] = _iso(self.clock())
            self.store.record(entry)
            self.store.unlock(schedule.lock_name())
            if self.metrics is not None:
                self.metrics.finished(entry)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the runs started so far (tests, and a clean shutdown)."""
        for thread in self.threads:
            thread.join(timeout)
        self.threads = [t for t in self.threads if t.is_alive()]

    def serve(self, *, poll_s: float = 20.0, stop: threading.Event | None = None) -> None:
        """Tick until `stop` is set (or forever)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            self.tick()
            stop.wait(poll_s)


class WarmRay:
    """The scheduler's own Ray for its local runs: started once, in the scheduler's
    process and main thread (`ray.init` off it lost its connection here), on 127.0.0.1
    only, as `quiver run` starts its private one. Local runs go to kept run processes
    joined to it (`jobs._warm_runner.RunnerPool`, started with the Ray), whose log files
    are kept in `log_dir`."""

    def __init__(self, log_dir: Path | None = None) -> None:
        self.address: str | None = None
        self.log_dir = log_dir or Path.home() / ".cache" / "quiver" / "logs"
        self.pool = None
        """The `RunnerPool` of local runs, once started."""

    def start(self) -> str:
        """The running Ray's address, starting it (and a first runner) on the first call."""
        if self.address is None:
            import ray

            from jobs._ray import ensure_ray
            from jobs._warm_runner import RunnerPool

            ensure_ray()
            self.address = ray.get_runtime_context().gcs_address
            self.pool = RunnerPool(self.address, self.log_dir)
            self.pool.prestart()  # imports while the scheduler waits for the first slot
        return self.address

    def close(self) -> None:
        """Let the idle run processes exit (they also exit with the scheduler)."""
        if self.pool is not None:
            self.pool.close()


def default_runner(default_address: str | None = None, *,
                   command: Callable[[Schedule], list[str]] | None = None,
                   warm: WarmRay | None = None) -> Runner:
    """Run locally in a subprocess (`quiver run`), or submit to the schedule's address.
    `command` replaces the local command line (tests: a run that hangs); with `warm`
    (started by the scheduler before it runs anything: `Scheduler.tick`), local runs
    join that Ray instead of starting their own."""
    import subprocess
    import sys

    def run(schedule: Schedule) -> dict:
        address = schedule.address or default_address
        limit = schedule.timeout_s
        if address:
            import time

            from jobs import submit as sub

            job_id = sub.submit(schedule.spec, address=address,
                                base=Path(schedule.workdir) if schedule.workdir else None)
            deadline = None if limit is None else time.monotonic() + limit
            for _ in sub.follow(address, job_id, poll_s=5.0):
                if deadline is not None and time.monotonic() > deadline:
                    sub.stop(address, job_id)
                    raise TimeoutError(f"job {job_id} ran past its timeout of {limit:g}s; "
                                       "stopped")
            status = sub.status(address, job_id)
            if status["status"] != "SUCCEEDED":
                raise RuntimeError(f"job {job_id} ended {status['status']}: "
                                   f"{status['message']}")
            # the job's own summary, from its logs: its counts, node-hours and cost
            summary = sub.summary_from_logs(sub.logs(address, job_id)) or {}
            return {**status, **{k: summary[k] for k in RUN_FIGURES if k in summary}}
        if warm is not None and warm.pool is not None and command is None:
            return _run_warm(warm.pool, schedule)
        import signal

        argv = command(schedule) if command else [sys.executable, "-m", "jobs.cli", "run",
                                                   schedule.spec, "--json"]
        env = None
        if warm is not None and warm.address is not None:
            from jobs._embed_service import KEEP_ENV

            env = {**os.environ, "RAY_ADDRESS": warm.address, KEEP_ENV: "1"}
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=schedule.workdir or None,
                                start_new_session=True, env=env)
        try:
            stdout, stderr = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the run and the Ray it started
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            raise TimeoutError(f"ran past its timeout of {limit:g}s; stopped") from None
        if proc.returncode != 0:
            raise RuntimeError(stderr.strip().splitlines()[-1] if stderr.strip()
                               else f"exit code {proc.returncode}")
        return json.loads(stdout)

    return run


def _run_warm(pool, schedule: Schedule) -> dict:
    """A local run on one of the warm scheduler's kept run processes; the summary says
    which process ran it and how many runs it has served."""
    runner = pool.take()
    try:
        summary = runner.run(schedule.spec, schedule.workdir or os.getcwd(),
                             schedule.timeout_s)
    finally:
        pool.give(runner)
    return {**summary, "runner": {"pid": runner.pid, "run": runner.runs}}
