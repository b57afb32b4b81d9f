"""The deployment files parse, hold together and name commands that exist: the compose
file (services, health checks, the ledger volume, secrets only from .env), the Kubernetes
manifests (selectors, Secret keys, the autoscaled Deployment) and the systemd units.

YAML is read with PyYAML when this interpreter has it, else with the first ``python3`` on
PATH that has it (Debian's python3-yaml), printed back as JSON; without either, the
structural checks are skipped, saying so, and the command checks read the files as text.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pocoflow.cli import main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
#: Commands of issue 8 written on another branch; empty this once they are merged.
PENDING_COMMANDS: set[str] = set()

_LOAD = "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"


def _yaml_loader() -> list[str] | None:
    if importlib.util.find_spec("yaml") is not None:
        return [sys.executable]
    for name in ("python3", "python"):
        found = shutil.which(name)
        if (
            found
            and subprocess.run([found, "-c", "import yaml"], capture_output=True).returncode == 0
        ):
            return [found]
    return None


LOADER = _yaml_loader()
needs_yaml = pytest.mark.skipif(LOADER is None, reason="no PyYAML in any python3 here")


def load_yaml(path: Path) -> list[Any]:
    assert LOADER is not None
    done = subprocess.run([*LOADER, "-c", _LOAD, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, f"{path.name} does not parse:\n{done.stderr}"
    return [doc for doc in json.loads(done.stdout) if doc is not None]


def commands_in(text: str) -> list[list[str]]:
    """Every ``pocoflow ...`` / ``celery ...`` command line a file names (exec-form JSON
    lists, shell strings in quotes, systemd ExecStart paths), as argv lists."""
    found = []
    string = r'"(?:[^"\\]|\\.)*"'
    for match in re.finditer(rf'\[\s*"(pocoflow|celery)"(?:\s*,\s*{string})*\s*\]', text):
        found.append(json.loads(match.group(0)))
    for match in re.finditer(r'(?:/bin/|")(pocoflow|celery)((?: +[-\w.@$:=/]+)+)', text):
        found.append([match.group(1), *shlex.split(match.group(2))])
    return found


def test_every_command_the_deployment_names_exists() -> None:
    files = [COMPOSE, *K8S, *UNITS, ROOT / "workers" / "Dockerfile"]
    named: set[str] = set()
    for path in files:
        for argv in commands_in(path.read_text()):
            if argv[0] == "pocoflow" and len(argv) > 1 and not argv[1].startswith("-"):
                named.add(argv[1])
                command = main.commands.get(argv[1])
                options = {o for p in command.params for o in p.opts} if command else set()
                for token in argv[2 : argv.index("--") if "--" in argv else None]:
                    if command and token.startswith("--"):
                        assert token.split("=")[0] in options, f"{path.name}: {argv}"
            if argv[0] == "celery":
                app = argv[argv.index("-A") + 1]
                assert importlib.util.find_spec(app) is not None, f"{path.name}: no module {app}"
    assert {"worker", "flower", "monitor", "submit"} <= named, named
    missing = named - set(main.commands)
    assert missing <= PENDING_COMMANDS, f"pocoflow has no command(s) {missing}"


@needs_yaml
def test_compose_runs_the_whole_stack_with_health_checks_and_a_ledger_volume() -> None:
    (compose,) = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"redis", "postgres", "worker", "flower", "monitor", "submit"} <= set(services)
    for name, service in services.items():
        if name != "submit":  # a one-shot job: it exits when its run ends
            assert "healthcheck" in service, f"{name} has no health check"
    assert "restart" in services["submit"] and services["submit"]["restart"] == "no"
    # `docker compose up --scale worker=4`: nothing that makes two workers clash.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert services["worker"]["command"][:2] == ["pocoflow", "worker"]
    # The ledger lives in a named volume, so `docker compose down` keeps it.
    assert "ledger" in compose["volumes"]
    assert any(v.startswith("ledger:") for v in services["postgres"]["volumes"])
    # Workers wait for healthy servers.
    assert services["worker"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_secrets_come_from_the_env_file_only() -> None:
    text = COMPOSE.read_text()
    # Literal passwords: a password key, or a URL with user:password@, holding no ${...}.
    literal = re.search(r"^\s*[\w-]*PASSWORD[\w-]*:\s*(?!\$\{)\S", text, re.M | re.I)
    assert not literal, f"a literal password in compose: {literal}"
    assert not re.search(r"://[^:/\s]+:(?!\$\{)[^@\s]+@", text), "a password in a URL"
    example = (ROOT / ".env.example").read_text()
    for var in set(re.findall(r"\$\{(\w+)", text)):
        assert re.search(rf"^{var}=", example, re.M), f"{var} not in .env.example"
    assert re.search(r"^\.env$", (ROOT / ".gitignore").read_text(), re.M)


@needs_yaml
def test_kubernetes_manifests_hold_together() -> None:
    docs = [doc for path in K8S for doc in load_yaml(path)]
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert doc.get("kind") == "Kustomization" or doc["metadata"]["name"]
    by_kind: dict[str, dict[str, Any]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc.get("metadata", {}).get("name")] = doc
    deployments = by_kind["Deployment"]
    assert {"pocoflow-worker", "pocoflow-flower", "pocoflow-monitor"} <= set(deployments)
    secret_keys = set(by_kind["Secret"]["pocoflow"]["stringData"])
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        for container in spec["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "pocoflow" and ref["key"] in secret_keys, (name, ref)
    for name, service in by_kind["Service"].items():
        selector = service["spec"]["selector"]
        assert any(
            selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments.values()
        ), f"Service {name} selects no Deployment"
    scaled = by_kind["ScaledObject"]["pocoflow-worker"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "pocoflow-worker"
    (trigger,) = scaled["triggers"]
    assert trigger["metadata"]["listName"] == "pocoflow"  # DEFAULT_QUEUE
    for ref in by_kind["TriggerAuthentication"]["pocoflow-redis"]["spec"]["secretTargetRef"]:
        assert ref["key"] in secret_keys
    listed = set(by_kind["Kustomization"][None]["resources"])
    assert listed == {p.name for p in K8S} - {"kustomization.yaml", "secret.example.yaml"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_run_a_pocoflow_command_with_settings_from_a_file(unit: Path) -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(unit.read_text())
    service = parser["Service"]
    assert service["EnvironmentFile"] == "/etc/pocoflow/env"
    binary, command, *_ = shlex.split(service["ExecStart"])
    assert binary.endswith("/bin/pocoflow")
    assert command in main.commands or command in PENDING_COMMANDS
    assert parser["Install"]["WantedBy"] == "multi-user.target"
