"""cluster.yaml is a cluster-launcher config that Ray's own validation accepts."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from conftest import REPO
from ray.autoscaler._private.util import prepare_config, validate_config


@pytest.fixture()
def config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_validates_cluster_yaml(config: dict) -> None:
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    # and CPU-only workers for the read/tokenize tasks that feed the GPUs
    assert any(not t["resources"].get("GPU") and t["resources"].get("CPU", 0) >= 16
               for name, t in types.items() if name != config["head_node_type"])


def test_dashboard_binds_loopback_only(config: dict) -> None:
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_validation_is_real(config: dict) -> None:
    config["available_node_types"]["gpu_worker"]["resourcez"] = {"GPU": 1}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_only_ssh_is_open_to_the_outside(config: dict) -> None:
    """The cluster's security group adds no inbound rule beyond the launcher's own (SSH
    and traffic between the group's nodes), so no Ray port is reachable from outside."""
    group = config["provider"]["security_group"]
    assert group["GroupName"]
    extra = group.get("IpPermissions", [])
    assert all(rule.get("FromPort") == rule.get("ToPort") == 22 for rule in extra)
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in head and "--node-ip-address=0.0.0.0" not in head
