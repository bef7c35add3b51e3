"""A local Quiver run opens no port beyond loopback: every socket that its Ray (GCS,
raylet, workers, agents) listens on is bound to 127.0.0.1, checked on the real processes."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

# Runs in a fresh interpreter so that it starts its own Ray, as `quiver run` does.
PROBE = """
import json, psutil, ray
from jobs._ray import ensure_ray
ensure_ray()
assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker process is up too
tree = [psutil.Process()] + psutil.Process().children(recursive=True)
found = []
for proc in tree:
    try:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.append([proc.name(), conn.laddr.ip, conn.laddr.port])
    except psutil.NoSuchProcess:
        pass
print(json.dumps(found))
ray.shutdown()
"""


def test_local_ray_listens_on_loopback_only() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                         text=True, timeout=180, check=True)
    listening = json.loads(out.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in listening}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names)
    exposed = [entry for entry in listening
               if entry[1] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
