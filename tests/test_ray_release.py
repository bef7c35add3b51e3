"""`quiver` leaves its own Ray when a command succeeds (`jobs._ray.release_ray`), instead
of in Ray's exit hook, which sleeps 0.5 s first: the local Ray's processes must be gone
when it returns, and a command that never started Ray must not import it."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

# Fresh interpreters: each starts (or does not start) its own Ray, as `quiver run` does.
RELEASE = """
import json, psutil, ray
from jobs._ray import ensure_ray, release_ray
ensure_ray()
assert ray.get(ray.remote(lambda: 1).remote()) == 1
started = [p.pid for p in psutil.Process().children(recursive=True)]
release_ray()
gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in started
                                 if psutil.pid_exists(pid)], timeout=10)
print(json.dumps({"initialized": ray.is_initialized(), "started": len(started),
                  "alive": [" ".join(p.cmdline()[:2]) for p in alive]}))
"""
NO_RAY = """
import sys
from jobs._ray import release_ray
release_ray()
print("ray" in sys.modules)
"""


def test_release_ray_stops_the_local_ray_processes() -> None:
    out = subprocess.run([sys.executable, "-c", RELEASE], cwd=REPO, capture_output=True,
                         text=True, timeout=180, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["started"] >= 3  # gcs_server, raylet, a worker at least
    assert not got["initialized"]
    assert got["alive"] == []


def test_release_ray_without_ray_does_not_import_it() -> None:
    out = subprocess.run([sys.executable, "-c", NO_RAY], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
