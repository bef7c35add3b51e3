"""The scheduler with an injected clock: cron slots fire once, missed slots run once at
start-up, a schedule never overlaps itself, state survives a restart, and a real job runs
from a schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lance
import pytest
from conftest import write_jsonl

from jobs.schedule import Scheduler, ScheduleStore, default_runner, due_slot
from schemas.errors import SpecError

T0 = datetime(2026, 11, 24, 1, 30, tzinfo=UTC)


class Clock:
    def __init__(self, t: datetime) -> None:
        self.t = t

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text("kind: embed\nsource: {uri: docs.jsonl, id_field: id}\ntable: t.lance\n")
    return path


def test_slots_fire_once_and_missed_runs_collapse(tmp_path, spec) -> None:
    store = ScheduleStore(tmp_path / "wh")
    store.add("nightly", "0 2 * * *", spec, now=T0)
    clock, ran = Clock(T0), []
    sched = Scheduler(store, lambda s: ran.append(s.name) or {"ok": 1}, clock)
    assert sched.tick() == []                       # 01:30, nothing due
    clock.t = T0 + timedelta(minutes=31)            # 02:01
    assert sched.tick() == ["nightly"]
    sched.wait()
    assert sched.tick() == []                       # the same slot never fires twice
    # The scheduler was down for three nights: on restart the schedule runs once.
    clock.t = T0 + timedelta(days=3, hours=1)
    restarted = Scheduler(ScheduleStore(tmp_path / "wh"), lambda s: ran.append(s.name) or {},
                          clock)
    assert restarted.tick() == ["nightly"]
    restarted.wait()
    assert restarted.tick() == [] and ran == ["nightly", "nightly"]
    history = store.history("nightly")
    assert [h["status"] for h in history] == ["succeeded", "succeeded"]
    assert history[1]["slot"] == "2026-11-27T02:00:00+00:00"  # the latest missed slot


def test_a_running_schedule_is_not_started_again(tmp_path, spec) -> None:
    store = ScheduleStore(tmp_path / "wh")
    store.add("often", "*/5 * * * *", spec, now=T0)
    release = threading.Event()
    clock = Clock(T0 + timedelta(minutes=5))
    sched = Scheduler(store, lambda s: release.wait(30) and {}, clock)
    assert sched.tick() == ["often"]
    clock.t += timedelta(minutes=5)
    assert sched.tick() == []                       # still running: skipped, recorded
    assert [h["status"] for h in store.history("often")] == ["started",
                                                             "skipped (table busy)"]
    release.set()
    sched.wait()
    statuses = [h["status"] for h in store.history("often")]
    assert statuses == ["skipped (table busy)", "succeeded"]
    clock.t += timedelta(minutes=5)
    assert sched.tick() == ["often"]                # the lock was released
    sched.wait()


def test_failures_are_history_and_stale_locks_are_taken_over(tmp_path, spec) -> None:
    store = ScheduleStore(tmp_path / "wh")
    store.add("flaky", "0 * * * *", spec, now=T0)
    (store.root / f"{store.load()['flaky'].lock_name()}.lock").write_text("999999999")
    clock = Clock(T0 + timedelta(hours=1))

    def boom(_):
        raise RuntimeError("source unreachable")

    sched = Scheduler(store, boom, clock)
    assert sched.tick() == ["flaky"]
    sched.wait()
    (entry,) = store.history("flaky")
    assert entry["status"] == "failed" and "source unreachable" in entry["error"]


def test_bad_input_is_refused(tmp_path, spec) -> None:
    store = ScheduleStore(tmp_path / "wh")
    with pytest.raises(SpecError, match="not a 5-field cron"):
        store.add("x", "every night", spec)
    with pytest.raises(SpecError, match="spec file not found"):
        store.add("x", "0 2 * * *", tmp_path / "absent.yaml")
    with pytest.raises(SpecError, match="schedule name"):
        store.add("../x", "0 2 * * *", spec)
    store.add("x", "0 2 * * *", spec)
    with pytest.raises(SpecError, match="exists"):
        store.add("x", "0 3 * * *", spec)
    store.remove("x")
    assert store.load() == {}


def test_due_slot_uses_cron_semantics(tmp_path, spec) -> None:
    store = ScheduleStore(tmp_path / "wh")
    s = store.add("weekday", "30 6 * * 1-5", spec, now=datetime(2026, 11, 27, 7, tzinfo=UTC))
    saturday = datetime(2026, 11, 28, 12, tzinfo=UTC)
    assert due_slot(s, saturday) is None            # Friday 06:30 passed before creation
    monday = datetime(2026, 11, 30, 6, 31, tzinfo=UTC)
    assert due_slot(s, monday) == datetime(2026, 11, 30, 6, 30, tzinfo=UTC)


def test_a_schedule_runs_a_real_job_in_the_schedulers_own_ray(tmp_path, stdlib_docs,
                                                              tiny_model) -> None:
    """A warm scheduler (the default) starts its Ray before the first local run and
    keeps it: a run's process joins that Ray (the same node as the scheduler's own
    driver, at the address it hands over) instead of starting one, a real job run that
    way succeeds, and later runs reuse its kept run process, even after a failed job."""
    import ray

    from jobs.schedule import WarmRay

    write_jsonl(tmp_path / "docs.jsonl",
                [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[330:336]])
    (tmp_path / "spec.yaml").write_text(
        "kind: embed\nsource: {uri: docs.jsonl, id_field: id}\ntable: out/t.lance\n"
        f"model: {{name: {tiny_model}}}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)

    assert cli("schedule", "add", "docs", "spec.yaml", "--cron", "* * * * *",
               "--warehouse", "wh").returncode == 0
    store = ScheduleStore(tmp_path / "wh")
    warm = WarmRay(tmp_path / "logs")
    from conftest import REPO

    probe = (f"import json, os, sys; sys.path.insert(0, {str(REPO)!r}); import ray; "
             "from jobs._ray import ensure_ray; ensure_ray(); print(json.dumps({'address': "
             "os.environ['RAY_ADDRESS'], 'node': ray.get_runtime_context().get_node_id()}))")
    store.mark_fired("docs", datetime.now(UTC) - timedelta(minutes=2))  # one slot is due
    probing = Scheduler(store, default_runner(
        command=lambda _: [sys.executable, "-c", probe], warm=warm), warm=warm)
    assert probing.tick() == ["docs"]
    probing.wait()
    joined = store.history("docs")[-1]["summary"]
    assert joined == {"address": warm.address,
                      "node": ray.get_runtime_context().get_node_id()}

    store.mark_fired("docs", datetime.now(UTC) - timedelta(minutes=2))
    sched = Scheduler(store, default_runner(warm=warm), warm=warm)  # in `add`'s directory
    assert sched.tick() == ["docs"]
    sched.wait()
    entry = store.history("docs")[-1]
    assert entry["status"] == "succeeded", (entry.get("error"), entry.get("traceback"))
    assert entry["summary"]["chunks"] == lance.dataset(str(tmp_path / "out/t.lance")).count_rows()
    assert entry["summary"]["runner"]["run"] == 1  # on a kept run process

    # the next runs find that process: a job that fails leaves it serving the one after
    (tmp_path / "docs.jsonl").rename(tmp_path / "away.jsonl")
    store.mark_fired("docs", datetime.now(UTC) - timedelta(minutes=2))
    assert sched.tick() == ["docs"]
    sched.wait()
    failed = store.history("docs")[-1]
    assert failed["status"] == "failed" and "docs.jsonl" in failed["error"]
    (tmp_path / "away.jsonl").rename(tmp_path / "docs.jsonl")
    store.mark_fired("docs", datetime.now(UTC) - timedelta(minutes=2))
    assert sched.tick() == ["docs"]
    sched.wait()
    again = store.history("docs")[-1]
    assert again["status"] == "succeeded", again.get("error")
    assert again["summary"]["runner"] == {"pid": entry["summary"]["runner"]["pid"], "run": 3}
    assert again["summary"]["chunks"] == entry["summary"]["chunks"]
    warm.close()
    listed = json.loads(cli("schedule", "history", "docs", "--warehouse", "wh", "--json").stdout)
    assert [h["status"] for h in listed] == ["succeeded", "succeeded", "failed", "succeeded"]
    from jobs._embed_service import NAMESPACE

    for actor in ray.util.list_named_actors(all_namespaces=True):  # the run's kept model
        if actor["namespace"] == NAMESPACE:  # stays with this Ray: not left to later tests
            ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE))


def test_a_scheduler_killed_as_a_run_starts_runs_that_slot_after_restart(tmp_path,
                                                                          spec) -> None:
    """The scheduler process is SIGKILLed at the moment its run starts (after the slot
    was marked): the restarted scheduler records the run as interrupted and runs the
    slot again, taking over the dead process's lock."""
    from conftest import REPO

    store = ScheduleStore(tmp_path / "wh")
    store.add("nightly", "0 2 * * *", spec, now=T0)
    due = T0 + timedelta(minutes=31)
    script = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from datetime import datetime\n"
        "from pathlib import Path\n"
        "from jobs.schedule import Scheduler, ScheduleStore\n"
        f"store = ScheduleStore(Path({str(tmp_path / 'wh')!r}))\n"
        "def die(_):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"sched = Scheduler(store, die, lambda: datetime.fromisoformat({due.isoformat()!r}))\n"
        "sched.tick(); sched.wait()\n")
    killed = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert killed.returncode == -9
    assert [h["status"] for h in store.history("nightly")] == ["started"]
    ran = []
    restarted = Scheduler(ScheduleStore(tmp_path / "wh"),
                          lambda s: ran.append(s.name) or {"ok": 1}, Clock(due))
    assert restarted.tick() == ["nightly"]
    restarted.wait()
    assert ran == ["nightly"]
    assert [h["status"] for h in store.history("nightly")] == ["interrupted", "succeeded"]
    assert restarted.tick() == []  # and only once


def test_a_run_past_its_timeout_is_stopped_and_the_next_slot_runs(tmp_path, spec) -> None:
    """A run that hangs is killed at the schedule's timeout and recorded as timed out; the
    table's lock is free again, so the next slot runs."""
    store = ScheduleStore(tmp_path / "wh")
    store.add("hourly", "0 * * * *", spec, now=T0, timeout_s=1.0)
    hang = [sys.executable, "-c", "import time; time.sleep(120)"]
    quick = [sys.executable, "-c", "print('{\"ok\": 1}')"]
    commands = iter([hang, quick])
    clock = Clock(T0 + timedelta(hours=1))
    sched = Scheduler(store, default_runner(command=lambda s: next(commands)), clock)
    started = datetime.now(UTC)
    assert sched.tick() == ["hourly"]
    sched.wait(60)
    assert (datetime.now(UTC) - started).total_seconds() < 30
    clock.t += timedelta(hours=1)
    assert sched.tick() == ["hourly"]  # not "skipped": the hung run's lock was freed
    sched.wait(60)
    history = store.history("hourly")
    assert [h["status"] for h in history] == ["timed out", "succeeded"]
    assert "timeout of 1s" in history[0]["error"] and history[1]["summary"] == {"ok": 1}


def test_two_schedules_of_one_table_never_overlap(tmp_path, spec) -> None:
    """The run lock is per table: a second schedule writing the same table skips its slot
    while the first one runs."""
    store = ScheduleStore(tmp_path / "wh")
    store.add("a", "*/5 * * * *", spec, now=T0)
    store.add("b", "*/5 * * * *", spec, now=T0)
    release = threading.Event()
    sched = Scheduler(store, lambda s: release.wait(30) and {}, Clock(T0 + timedelta(minutes=5)))
    assert len(sched.tick()) == 1
    release.set()
    sched.wait()
    statuses = sorted(h["status"] for h in store.history())
    assert statuses == ["skipped (table busy)", "succeeded"]


def test_the_run_lock_is_held_by_one_store_and_freed_by_closing(tmp_path, spec) -> None:
    """The run lock is an flock: a second store (another scheduler on the same warehouse)
    cannot take it while the first holds it, whatever the file says (an empty file, the
    moment before a pid file had its pid, read as stale by the old lock); released, it is
    free at once."""
    first, second = ScheduleStore(tmp_path / "wh"), ScheduleStore(tmp_path / "wh")
    first.add("one", "0 * * * *", spec, now=T0)
    name = first.load()["one"].lock_name()
    assert first.try_lock(name)
    (first.root / f"{name}.lock").write_text("")  # what a reader of the old lock saw
    assert not second.try_lock(name) and not first.try_lock(name)
    first.unlock(name)
    assert second.try_lock(name)
    second.unlock(name)


def test_the_scheduler_counts_its_runs_by_outcome_for_prometheus(tmp_path, spec) -> None:
    """Runs by outcome, the last success (also from the history a restarted scheduler
    reads), durations, runs going now, and the cost a run's summary priced."""
    from prometheus_client.parser import text_string_to_metric_families

    from jobs._metrics import SchedulerMetrics

    store = ScheduleStore(tmp_path / "wh")
    store.add("nightly", "0 * * * *", spec, now=T0)
    outcomes = iter([{"documents": 3, "cost": {"total": 0.25, "currency": "EUR"},
                      "node_hours": {"cpu2": 0.5}}, RuntimeError("source gone"), {}])

    def runner(_):
        out = next(outcomes)
        if isinstance(out, Exception):
            raise out
        clock.t += timedelta(seconds=90)  # the run takes 90 s
        return out

    clock = Clock(T0 + timedelta(hours=1))
    metrics = SchedulerMetrics(store.history())
    sched = Scheduler(store, runner, clock, metrics=metrics)
    for _ in range(3):
        assert sched.tick() == ["nightly"]
        sched.wait()
        clock.t += timedelta(hours=1)
    history = store.history("nightly")
    assert [h["status"] for h in history] == ["succeeded", "failed", "succeeded"]
    assert history[0]["cost"] == {"total": 0.25, "currency": "EUR"}
    assert history[0]["node_hours"] == {"cpu2": 0.5} and "cost" not in history[2]

    def samples(m: SchedulerMetrics) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(m.text().decode()) for s in f.samples}

    got = samples(metrics)
    runs = {dict(k[1])["outcome"]: v for k, v in got.items()
            if k[0] == "quiver_schedule_runs_total"}
    assert runs == {"succeeded": 2.0, "failed": 1.0}
    last_end = datetime.fromisoformat(history[2]["ended"]).timestamp()
    key = (("schedule", "nightly"),)
    assert got[("quiver_schedule_last_success_timestamp_seconds", key)] == last_end
    assert got[("quiver_schedule_run_duration_seconds_count", key)] == 3.0
    assert got[("quiver_schedule_run_duration_seconds_sum", key)] == 180.0
    assert got[("quiver_schedule_running", key)] == 0.0
    assert got[("quiver_schedule_cost_total", (("currency", "EUR"), ("schedule", "nightly")))] \
        == 0.25
    # a restarted scheduler knows the last success from the history alone
    again = samples(SchedulerMetrics(ScheduleStore(tmp_path / "wh").history()))
    assert again[("quiver_schedule_last_success_timestamp_seconds", key)] == last_end
