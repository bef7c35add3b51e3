"""The warm scheduler's kept run processes (`jobs._warm_runner`): one process serves
run after run, a failed job leaves it serving, and a run past its timeout or a process
that dies is stopped, reported and replaced."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from jobs._warm_runner import RunnerError, RunnerPool

TARGET = '''
import os, time

def run(spec):
    if spec == "hang":
        time.sleep(600)
    if spec == "fail":
        raise ValueError("the job said no")
    return {"pid": os.getpid(), "spec": spec, "cwd": os.getcwd()}
'''


@pytest.fixture
def pool(tmp_path, ray_local):
    """A pool whose runners call `fake_job.run` instead of a real job."""
    import ray

    (tmp_path / "fake_job.py").write_text(TARGET)
    pool = RunnerPool(ray.get_runtime_context().gcs_address, tmp_path / "logs",
                      target="fake_job:run",
                      env={"PYTHONPATH": os.pathsep.join([str(tmp_path),
                                                          os.environ.get("PYTHONPATH", "")])})
    yield pool
    pool.close()


def _gone(pid: int, within_s: float = 30.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_one_kept_process_serves_run_after_run_and_survives_a_failed_job(pool,
                                                                         tmp_path) -> None:
    pool.prestart()
    runner = pool.take()
    first = runner.run("a.yaml", str(tmp_path), 120)
    with pytest.raises(RunnerError, match="ValueError: the job said no"):
        runner.run("fail", str(tmp_path), 120)
    pool.give(runner)
    again = pool.take()
    second = again.run("b.yaml", str(tmp_path), 120)
    assert again is runner and first["pid"] == second["pid"] == runner.pid
    assert (first["spec"], second["spec"]) == ("a.yaml", "b.yaml")
    assert second["cwd"] == str(tmp_path) and runner.runs == 3
    pool.give(again)


def test_a_run_past_its_timeout_kills_its_process_and_a_fresh_one_takes_over(pool,
                                                                             tmp_path) -> None:
    runner = pool.take()
    runner.run("warm-up", str(tmp_path), 120)  # ready: the timeout covers the run alone
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timeout of 2s"):
        runner.run("hang", str(tmp_path), 2)
    # stopped at its timeout (plus the kill), not after the 600 s the job would sleep
    assert time.monotonic() - started < 90 and _gone(runner.pid)
    pool.give(runner)  # dead: a replacement starts now
    fresh = pool.take()
    assert fresh is not runner
    assert fresh.run("next.yaml", str(tmp_path), 120)["pid"] == fresh.pid != runner.pid
    pool.give(fresh)


def test_a_process_that_dies_mid_run_fails_only_that_run(pool, tmp_path) -> None:
    runner = pool.take()
    runner.run("warm-up", str(tmp_path), 120)
    threading.Timer(1.0, os.kill, (runner.pid, signal.SIGKILL)).start()
    with pytest.raises(RunnerError, match=r"process died \(exit code -9\).*runner-.*\.log"):
        runner.run("hang", str(tmp_path), 120)
    pool.give(runner)
    fresh = pool.take()
    assert fresh.alive() and fresh.run("next.yaml", str(tmp_path), 120)["pid"] == fresh.pid
    pool.give(fresh)
