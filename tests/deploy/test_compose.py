"""The Docker deployment: three brokers from deploy/docker-compose.yml elect a controller and serve.

Needs a Docker engine; where none runs (as on the CI machines) the test is skipped and says why.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.brokers import is_serving, wait_until

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
STARTUP_TIMEOUT_S = 180


def docker_engine_problem() -> str | None:
    """Why Docker cannot run containers here, or None when it can."""
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"no Docker engine answers `docker info`: {probe.stderr.strip().splitlines()[-1:]}"
    return None


problem = docker_engine_problem()
pytestmark = pytest.mark.skipif(problem is not None, reason=f"Docker deployment test skipped: {problem}")


def test_the_compose_cluster_elects_a_controller_and_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    from testcontainers.compose import DockerCompose

    monkeypatch.setenv("LOGBROKER_CLUSTER_SECRET", secrets.token_hex(32))  # compose refuses to start without one

    with DockerCompose(str(DEPLOY_DIR), compose_file_name="docker-compose.yml", build=True, wait=False):
        addresses = ["127.0.0.1:9092", "127.0.0.1:9093", "127.0.0.1:9094"]
        wait_until(lambda: all(is_serving(a) for a in addresses), STARTUP_TIMEOUT_S, "all three brokers to serve")
        from logbroker_client import Admin

        admin = Admin(addresses[0])
        admin.create_topic("compose-smoke", partitions=3, replication_factor=3)
        assert "compose-smoke" in admin.list_topics()
        cluster = admin.describe_cluster()
        assert sorted(b.node_id for b in cluster.brokers) == [1, 2, 3]
        assert cluster.controller_id in (1, 2, 3)
