"""Kept run processes for the warm scheduler: imported, joined to its Ray, and reused.

A warm scheduled run used to be a fresh `quiver run` process. Even on a kept Ray with a
kept model actor, each one paid about 2 s of imports (torch, transformers, Ray, Lance)
and, because every new driver is a new Ray job, fresh worker processes for its read,
chunk and write tasks, which import transformers and load the tokenizer again: the 1%
SciFact reindex took 10 s, of which its forward was 3.5 s. Runs of one driver share
their worker processes, so a process that outlives its run makes the next run's tasks
start warm.

A `RunnerPool` keeps such processes (`python -m jobs._warm_runner`): each imports
Quiver, joins the scheduler's Ray, says it is ready, then runs one spec at a time as
`quiver run` would (in the schedule's working folder, with the kept model actor
allowed) and answers with the summary or the error. The isolation of a process per run
stays where it matters:
- a run past its timeout has its runner's process group killed, as a run process's was,
  and the pool starts a fresh runner in the background;
- a runner that dies (a crash, the kernel's OOM killer) fails only the run it held;
- a runner is retired after `MAX_RUNS` runs, so nothing it holds grows without end;
- a runner reads its requests on stdin, so it exits when the scheduler does.

Requests go in on the runner's stdin and answers come back on a pipe of their own, so
nothing a job prints can be mistaken for an answer; the runners' own output (Quiver's
progress lines and Ray's logs) goes to one log file per runner.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

MAX_RUNS = 50
"""Runs one process serves before it is retired and replaced."""
KEEP_IDLE = 2
"""Idle runners a pool keeps ready (two schedules firing in the same minute both start
warm)."""
KILL_GRACE_S = 30.0
"""Seconds between SIGTERM and SIGKILL for a runner stopped at a timeout."""
LOG_ENV = "QUIVER_RUNNER_LOG"
"""The runner's log file, where Ray's loggers are sent too."""
TARGET = "jobs._warm_runner:run_spec"
"""What a runner calls for each request, in the request's working folder:
`module:function(spec) -> dict`."""


def run_spec(spec: str) -> dict:
    """One run, as `quiver run SPEC --json` would do it (from the schedule's working
    folder: the runner has made it the current one)."""
    from jobs import api

    return json.loads(json.dumps(api.run(api.load_spec(spec)).to_dict(), default=str))


class RunnerError(RuntimeError):
    """The runner failed the run (the job raised, or the process died)."""


class Runner:
    """One kept run process, as the scheduler sees it."""

    def __init__(self, *, address: str, log_dir: Path, target: str = TARGET,
                 env: dict[str, str] | None = None) -> None:
        from jobs._embed_service import KEEP_ENV

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = log_dir / f"runner-{time.strftime('%Y%m%d-%H%M%S')}-{id(self):x}.log"
        answers, child_end = os.pipe()
        child_env = {**os.environ, **(env or {}), "RAY_ADDRESS": address, KEEP_ENV: "1",
                     LOG_ENV: str(self.log_file)}
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jobs._warm_runner", str(child_end), target],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=(child_end,), start_new_session=True, env=child_env)
        os.close(child_end)
        self._answers = os.fdopen(answers, "rb")
        self._buffer = b""
        self.ready = False
        self.runs = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _answer(self, deadline: float | None) -> dict:
        """The next answer line (TimeoutError past `deadline`; RunnerError when the
        process has died)."""
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._answers], [], [], wait)
            if not ready:
                raise TimeoutError
            data = os.read(self._answers.fileno(), 1 << 16)
            if not data:
                code = self.proc.wait()
                raise RunnerError(f"the run's process died (exit code {code}); its output "
                                  f"is in {self.log_file}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, spec: str, workdir: str, timeout_s: float | None) -> dict:
        """Run one spec; returns its summary.

        Raises:
            TimeoutError: the run (with the runner's start, when it was not ready yet)
                went past `timeout_s`; the runner has been killed.
            RunnerError: the job failed (its message) or the process died.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            if not self.ready:
                self._answer(deadline)  # {"ready": pid}
                self.ready = True
            self.proc.stdin.write((json.dumps({"spec": spec, "workdir": workdir}) + "\n")
                                  .encode())
            self.proc.stdin.flush()
            answer = self._answer(deadline)
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"ran past its timeout of {timeout_s:g}s; stopped") from None
        except (BrokenPipeError, RunnerError) as err:
            self.kill()
            raise RunnerError(str(err) if isinstance(err, RunnerError) else
                              f"the run's process died; its output is in {self.log_file}"
                              ) from None
        self.runs += 1
        if "error" in answer:
            raise RunnerError(answer["error"])
        return answer["summary"]

    def kill(self) -> None:
        """Stop the runner and everything it started (its process group)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.close()

    def close(self) -> None:
        """Let the runner finish and exit (end of its stdin)."""
        for stream in (self.proc.stdin, self._answers):
            with contextlib.suppress(OSError):
                stream.close()


class RunnerPool:
    """Runners for a warm scheduler's local runs: taken per run, given back after."""

    def __init__(self, address: str, log_dir: Path, *, target: str = TARGET,
                 env: dict[str, str] | None = None) -> None:
        self.address, self.log_dir, self.target, self.env = address, log_dir, target, env
        self._idle: list[Runner] = []
        self._lock = threading.Lock()

    def _new(self) -> Runner:
        return Runner(address=self.address, log_dir=self.log_dir, target=self.target,
                      env=self.env)

    def prestart(self) -> None:
        """Start one runner now, so the first run finds it imported."""
        with self._lock:
            if not self._idle:
                self._idle.append(self._new())

    def take(self) -> Runner:
        """An idle live runner, or a new one."""
        with self._lock:
            while self._idle:
                runner = self._idle.pop()
                if runner.alive():
                    return runner
                runner.close()
        return self._new()

    def give(self, runner: Runner) -> None:
        """Back after a run: kept while alive, young and needed; a replacement is started
        for one that was killed or retired, so the next run starts warm."""
        keep = runner.alive() and runner.runs < MAX_RUNS
        if not keep:
            runner.kill()
        with self._lock:
            if keep and len(self._idle) < KEEP_IDLE:
                self._idle.append(runner)
                return
            if not keep and not self._idle:
                self._idle.append(self._new())
        if keep:
            runner.close()  # enough idle ones already

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for runner in idle:
            runner.close()


def _serve(answers_fd: int, target: str) -> None:
    """The runner process: import, join Ray, then answer one request per stdin line."""
    import importlib

    answers = os.fdopen(answers_fd, "w", buffering=1)
    module, function = target.split(":")
    call = getattr(importlib.import_module(module), function)
    from jobs import api  # noqa: F401  (imports what a run needs, ahead of it)
    from jobs._progress import quiet_ray_logs
    from jobs._ray import ensure_ray
    from schemas.errors import QuiverError

    quiet_ray_logs(Path(os.environ[LOG_ENV]))
    ensure_ray()
    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["workdir"]:  # relative paths in the spec resolve as at `schedule add`
                os.chdir(request["workdir"])
            answer = {"summary": call(request["spec"])}
        except QuiverError as err:
            answer = {"error": str(err)}
        except Exception as err:  # noqa: BLE001 - a failed run is an answer, not a crash
            traceback.print_exc()
            answer = {"error": f"{type(err).__name__}: {err}"}
        answers.write(json.dumps(answer, default=str) + "\n")


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
