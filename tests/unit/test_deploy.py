"""The Kubernetes manifests in deploy/kubernetes agree with each other and with the code.

.ci/check validates each manifest against the Kubernetes schemas; these tests check what no
schema knows: that kustomize applies every file, that the probes name the health services the
server publishes, that the ConfigMap and Secret hold valid settings, and that the pod's grace
period outlasts the server's drain.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.paths import REPO_ROOT
from users_grpc.bootstrap import SERVICE_NAME
from users_grpc.config import Settings
from users_grpc.domain.errors import ConfigError
from users_grpc.grpc_api.health import LIVENESS

DEPLOY = REPO_ROOT / "deploy/kubernetes"


def kind(kind: str) -> dict[str, Any]:
    found: dict[str, Any]
    [found] = [
        document
        for path in DEPLOY.rglob("*.yaml")
        if path.name != "kustomization.yaml"
        for document in yaml.safe_load_all(path.read_text())
        if document["kind"] == kind
    ]
    return found


def configured_environment(key_encryption_key: str | None = None) -> dict[str, str]:
    """The USERS_* variables a server pod gets: the ConfigMap and the Secret, as envFrom merges them."""
    environment = {**kind("ConfigMap")["data"], **kind("Secret")["stringData"]}
    if key_encryption_key is not None:
        environment["USERS_KEY_ENCRYPTION_KEY"] = key_encryption_key
    return environment


def server_container() -> dict[str, Any]:
    container: dict[str, Any]
    [container] = kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("folder", sorted({path.parent for path in DEPLOY.rglob("*.yaml")}), ids=str)
def test_each_kustomization_lists_every_manifest_beside_it(folder: Path) -> None:
    """A manifest left out of kustomization.yaml would be validated by CI yet never applied."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    manifests = {path.name for path in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)


def test_probes_name_the_health_services_the_server_publishes() -> None:
    container = server_container()
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME  # follows the database
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS  # does not: no restarts in an outage
    assert container["startupProbe"]["grpc"]["service"] == LIVENESS  # answers before the database is ready
    port = int(configured_environment()["USERS_GRPC_ADDRESS"].rpartition(":")[2])
    assert [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"] == [port]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == port


def test_prometheus_scrapes_the_http_port_the_server_listens_on() -> None:
    port = int(configured_environment()["USERS_HTTP_ADDRESS"].rpartition(":")[2])
    assert [p["containerPort"] for p in server_container()["ports"] if p["name"] == "http"] == [port]
    annotations = kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"]) == ("true", str(port))
    allowed = [p["port"] for rule in kind("NetworkPolicy")["spec"]["ingress"] for p in rule["ports"]]
    assert port in allowed
    assert {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"} in kind(
        "Service"
    )["spec"]["ports"]


def test_the_pod_outlasts_the_drain() -> None:
    """SIGKILL comes terminationGracePeriodSeconds after SIGTERM: after the delay, the grace for
    calls in flight and the wait for a mail in delivery, not in the middle of them."""
    settings = Settings.from_env(configured_environment(base64.b64encode(os.urandom(32)).decode()))
    drain = settings.shutdown_delay_seconds + settings.shutdown_grace_seconds + settings.smtp_timeout_seconds + 1
    assert settings.shutdown_delay_seconds > 0  # endpoints drop the pod before it stops taking calls
    assert kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_the_configured_settings_are_valid_and_documented() -> None:
    environment = configured_environment(base64.b64encode(os.urandom(32)).decode())
    example = (REPO_ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^(USERS_[A-Z_]+)=", example, flags=re.MULTILINE))
    assert set(environment) <= documented
    settings = Settings.from_env(environment)
    assert settings.grpc_address.startswith("[::]:")  # reachable from the Service and the kubelet
    assert not settings.reflection
    assert settings.smtp_host is not None  # a read-only root filesystem has no mail directory


def test_the_placeholder_key_stops_start_up_naming_the_variable() -> None:
    """Applied unchanged, the Secret's placeholder never becomes a key anyone could read in git."""
    with pytest.raises(ConfigError, match="USERS_KEY_ENCRYPTION_KEY"):
        Settings.from_env(configured_environment())


def test_the_first_admin_job_is_never_behind_the_service() -> None:
    selector = kind("Service")["spec"]["selector"]
    job_labels = kind("Job")["spec"]["template"]["metadata"]["labels"]
    server_labels = kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= server_labels.items()
    assert not selector.items() <= job_labels.items()
    assert kind("Job")["spec"]["template"]["spec"]["containers"][0]["args"][0] == "create-admin"
