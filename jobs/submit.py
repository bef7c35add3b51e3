"""Submit jobs to a Ray cluster through the Ray Jobs API, and manage them.

`quiver submit SPEC --address http://HOST:8265` resolves the spec's local paths against
the directory it is run from (a job runs in its own unpacked working directory on the
cluster, where a relative path would point somewhere else), writes the resolved spec into
a fresh working directory, and submits `python -m jobs.cli run spec.yaml` with that
directory as the runtime environment. Local absolute paths suit a cluster on one machine
or on a shared filesystem; object-store URIs suit any cluster.

Without an address (and without RAY_ADDRESS) the job runs here, in-process, like
`quiver run`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import yaml

from jobs._net import is_loopback
from schemas.errors import QuiverError, SpecError
from schemas.spec import STORAGE_OPTIONS_ENV, JobSpec, load_spec, with_absolute_paths

ENTRYPOINT = "{python} -m jobs.cli run spec.yaml --json"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 60.0


def resolved_spec(spec: JobSpec, *, base: Path) -> dict:
    """The spec as a mapping, with local source and table paths made absolute."""
    return with_absolute_paths(spec, base=base).model_dump(mode="json", exclude_unset=False)


def dashboard_address(address: str | None) -> str | None:
    """The Jobs API address from the flag or RAY_ADDRESS (an http:// dashboard URL)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and not address.startswith(("http://", "https://")):
        raise SpecError(f"--address {address!r}: the Jobs API needs the dashboard URL, "
                        "e.g. http://127.0.0.1:8265")
    return address


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise QuiverError(f"cannot reach the Ray Jobs API at {address}: {err}") from None


def entry_python(address: str, python: str | None = None) -> str:
    """The interpreter the job runs with on the cluster.

    A cluster on this machine shares this environment, so it gets this interpreter; a
    remote one gets `python` from its own PATH (install Quiver there, see cluster.yaml).
    """
    if python:
        return python
    host = urlparse(address).hostname or ""
    return sys.executable if is_loopback(host) else "python"


def submit(spec_path: str | Path, *, address: str, submission_id: str | None = None,
           python: str | None = None, base: Path | None = None) -> str:
    """Submit a spec; returns the job's submission id. Relative source and table paths
    resolve against `base` (a schedule's workdir), else this process's directory."""
    spec = load_spec(spec_path)
    data, secrets = without_storage_options(resolved_spec(spec, base=base or Path.cwd()))
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if secrets:  # into the job's environment, never into a file it ships or leaves
        env[STORAGE_OPTIONS_ENV] = json.dumps(secrets)
    workdir = Path(tempfile.mkdtemp(prefix="quiver-submit-"))
    try:
        (workdir / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False),
                                           encoding="utf-8")
        runtime_env = {"working_dir": str(workdir), "env_vars": env}
        client = _client(address)
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                entrypoint = ENTRYPOINT.format(python=shlex.quote(entry_python(address,
                                                                               python)))
                return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                         submission_id=submission_id,
                                         metadata={"quiver_spec": str(spec_path),
                                                   "table": data["table"]})
            except RuntimeError as err:  # a just-started head has no job agent for a moment
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise QuiverError(f"{address} refused the job: {err}") from None
                time.sleep(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # uploaded by submit_job: not needed


def without_storage_options(data: dict) -> tuple[dict, dict]:
    """The resolved spec without its storage options (credentials, often), and those
    options as `STORAGE_OPTIONS_ENV` carries them (empty when there are none)."""
    data = {**data}
    secrets = {}
    for section in ("source", "write"):
        part = dict(data.get(section) or {})
        if options := part.pop("storage_options", None):
            secrets[section] = options
        data[section] = part
    return data, secrets


def list_jobs(address: str) -> list[dict]:
    """Jobs known to the cluster, newest first."""
    jobs = _client(address).list_jobs()
    rows = [{"id": j.submission_id or j.job_id, "status": str(j.status.value),
             "entrypoint": j.entrypoint, "table": (j.metadata or {}).get("table", ""),
             "start_time": j.start_time, "end_time": j.end_time} for j in jobs]
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def status(address: str, job_id: str) -> dict:
    """One job's status and message."""
    info = _client(address).get_job_info(job_id)
    return {"id": job_id, "status": str(info.status.value), "message": info.message,
            "table": (info.metadata or {}).get("table", ""),
            "start_time": info.start_time, "end_time": info.end_time}


def logs(address: str, job_id: str) -> str:
    """Everything the job has printed so far."""
    return _client(address).get_job_logs(job_id)


def summary_from_logs(text: str) -> dict | None:
    """The job summary `quiver run --json` printed (the last JSON object in the logs that
    has the summary's `chunks`), or None when there is none (a job that failed first)."""
    decoder = json.JSONDecoder()
    found = None
    for start in re.finditer(r"(?m)^\{", text):
        try:
            value, _ = decoder.raw_decode(text, start.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "chunks" in value:
            found = value
    return found


def follow(address: str, job_id: str, *, poll_s: float = 1.0) -> Iterator[str]:
    """New log text as it appears, until the job ends (polling; no websocket needed)."""
    client = _client(address)
    shown = 0
    while True:
        text = client.get_job_logs(job_id)
        if len(text) > shown:
            yield text[shown:]
            shown = len(text)
        if str(client.get_job_status(job_id).value) in TERMINAL:
            text = client.get_job_logs(job_id)
            if len(text) > shown:
                yield text[shown:]
            return
        time.sleep(poll_s)


def stop(address: str, job_id: str) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    return bool(_client(address).stop_job(job_id))
