"""The container deployment (compose.yml, Dockerfile, deploy/), checked without a container engine.

- compose.yml validates against the Compose Specification's JSON schema (tests/compose-spec.json,
  see tests/compose-spec.LICENSE for where it comes from);
- every environment variable compose.yml gives a Barber service is a field of that
  service's settings class, and every setting that has no default, or whose default only
  fits the local stack (127.0.0.1, .stack/), is set;
- its topology matches the local stack's, both read from stack/topology.py and
  stack/services.py;
- the bootstrap scripts run for real: the replica script makes a streaming replica of the
  test stack's primary, the cluster script makes a Redis Cluster of six empty local
  nodes, the init script sets up a scratch primary, the key and .env generators write
  what they should and never overwrite;
- the Dockerfile passes hadolint, the deploy scripts shellcheck.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import psycopg
import pytest
import redis
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic_settings import BaseSettings

from authen.settings import AuthenSettings
from chat.settings import ChatSettings
from coordinator.settings import CoordinatorSettings
from deploy.keygen import KeySettings
from discovery.settings import DiscoverySettings
from elk.settings import ElkSettings
from etl.settings import EtlSettings
from gateway.settings import GatewaySettings
from stack import datatier, topology
from stack.layout import BASE_PORTS, Layout, service_env
from stack.services import SERVICES
from tests.stackproc import StackProcess
from tests.util import free_port, wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yml").read_text())
SVC: dict[str, dict[str, Any]] = COMPOSE["services"]
BARBER_IMAGE_PREFIX = "${BARBER_IMAGE"

# Which settings classes read the environment of each compose service built from our image.
SETTINGS: dict[str, tuple[type[BaseSettings], ...]] = {
    "discovery": (DiscoverySettings,),
    "authen": (AuthenSettings,),
    "chat": (ChatSettings,),
    # The gateway mounts the coordinator, which reads its own settings.
    "gateway": (GatewaySettings, CoordinatorSettings),
    "etl": (EtlSettings,),
    "migrate": (AuthenSettings, CoordinatorSettings, EtlSettings),
    "keygen": (KeySettings,),
    "elk-setup": (ElkSettings,),
}
# Settings classes a service reads only a few fields of (etl: the indexer's credentials).
PARTLY: dict[str, dict[type[BaseSettings], set[str]]] = {
    "etl": {
        ElkSettings: {
            "elasticsearch_api_key",
            "elasticsearch_username",
            "elasticsearch_password",
            "elasticsearch_ca_certs",
        }
    },
}
# The image sets HOST (0.0.0.0) and deploy/entrypoint.sh derives ADVERTISE_HOST.
SET_BY_IMAGE = {"host", "advertise_host"}
# One-shot jobs read only some of their settings classes' fields; these must be set.
JOB_NEEDS: dict[str, set[str]] = {
    "migrate": {"authen_database_url", "coordinator_database_url", "warehouse_database_url", "redis_url"},
    "elk-setup": {"elasticsearch_url", "kibana_url"},
    "keygen": set(),
}


def interpolate(value: str) -> str:
    """A value as Compose would interpolate it from an .env of example secrets."""

    def one(m: re.Match[str]) -> str:
        op, arg = m.group(2) or "", m.group(3) or ""
        return arg if op in (":-", "-") else f"example-{m.group(1).lower()}"

    return re.sub(r"\$\{(\w+)(:?[-?])?([^}]*)\}", one, value)


def env_of(service: str) -> dict[str, str]:
    env = SVC[service].get("environment") or {}
    assert isinstance(env, dict), f"{service}: environment must be a mapping"
    return {str(k): str(v) for k, v in env.items()}


def command_of(service: str) -> list[str]:
    cmd = SVC[service].get("command") or []
    return cmd if isinstance(cmd, list) else ["sh", "-c", cmd]


def is_barber(service: str) -> bool:
    return str(SVC[service].get("image", "")).startswith(BARBER_IMAGE_PREFIX)


def served_module(service: str) -> str | None:
    """``X`` when the service runs ``python -m X`` (a server, not a one-shot job)."""
    cmd = command_of(service)
    one_shot = SVC[service].get("restart") == "no"
    if is_barber(service) and not one_shot and len(cmd) == 3 and cmd[:2] == ["python", "-m"]:
        return cmd[2]
    return None


def run_as_pg_user() -> dict[str, Any]:
    """subprocess arguments that drop root the way stack/datatier.py does for PostgreSQL."""
    user = datatier.pg_run_user()
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def chown_to_pg_user(path: Path) -> None:
    user = datatier.pg_run_user()
    if user is not None:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# == the file itself ======================================================================
@pytest.mark.unit
def test_compose_validates_against_the_compose_specification() -> None:
    schema = json.loads((ROOT / "tests" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(COMPOSE), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    assert "version" not in COMPOSE, "the Compose Specification has no version key"
    # The schema is really applied: a misspelt key is refused.
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["gateway"]["depends_onn"] = broken["services"]["gateway"].pop("depends_on")
    assert list(validator.iter_errors(broken))


@pytest.mark.unit
def test_every_variable_is_read_by_the_services_settings_and_every_needed_one_is_set() -> None:
    barber = {name for name in SVC if is_barber(name)}
    assert barber == set(SETTINGS), "every compose service built from our image needs its settings classes here"
    assert {n for n in barber if not served_module(n)} == set(JOB_NEEDS)
    for service, classes in SETTINGS.items():
        env = {k.lower() for k in env_of(service)}
        fields = {name: field for cls in classes for name, field in cls.model_fields.items()}
        for cls, names in PARTLY.get(service, {}).items():
            fields.update({name: cls.model_fields[name] for name in names})
        unknown = env - set(fields)
        assert not unknown, f"{service}: {sorted(unknown)} are read by none of {[c.__name__ for c in classes]}"
        for name, field in fields.items():
            if name in SET_BY_IMAGE:
                assert name not in env, f"{service}: {name.upper()} is derived in the container; do not fix it"
                continue
            default = "" if field.is_required() else str(field.get_default(call_default_factory=True))
            local_only = "127.0.0.1" in default or "localhost" in default or default.startswith(".stack")
            if service in JOB_NEEDS:
                local_only = name in JOB_NEEDS[service]
            if field.is_required() or local_only:
                assert name in env, (
                    f"{service}: {name.upper()} must be set (default {default!r} fits the local stack only)"
                )


@pytest.mark.unit
def test_script_services_set_only_variables_their_scripts_or_images_read() -> None:
    image_vars = {
        "postgres-primary": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
        "mongo": {"MONGO_INITDB_ROOT_USERNAME", "MONGO_INITDB_ROOT_PASSWORD"},
        "elasticsearch": {
            "discovery.type",
            "ELASTIC_PASSWORD",
            "xpack.security.enabled",
            "xpack.security.http.ssl.enabled",
            "xpack.security.transport.ssl.enabled",
            "ingest.geoip.downloader.enabled",
            "ES_JAVA_OPTS",
        },
        "kibana": {"ELASTICSEARCH_HOSTS", "ELASTICSEARCH_USERNAME", "ELASTICSEARCH_PASSWORD"},
    }
    scripts = {
        "postgres-primary": DEPLOY / "postgres" / "init-primary.sh",
        "redis-cluster-init": DEPLOY / "redis" / "cluster-create.sh",
        "kibana-password": DEPLOY / "elastic" / "kibana-password.sh",
        "filebeat": ROOT / "elk" / "filebeat.yml",
        **{name: DEPLOY / "postgres" / "replica.sh" for name in SVC if name.startswith("postgres-replica-")},
    }
    checked = set()
    for service in SVC:
        if is_barber(service) or not env_of(service):
            continue
        text = scripts[service].read_text() if service in scripts else ""
        for var in env_of(service):
            read = re.search(r"\$\{?" + re.escape(var) + r"\b", text) is not None
            assert read or var in image_vars.get(service, set()), f"{service}: nothing reads {var}"
        checked.add(service)
    assert {"postgres-primary", "redis-cluster-init", "kibana-password", "filebeat"} <= checked


# == one topology ===========================================================================
@pytest.mark.unit
def test_postgres_topology_matches_the_local_stack() -> None:
    replicas = sorted(n for n in SVC if n.startswith("postgres-replica-"))
    assert replicas == [f"postgres-replica-{i}" for i in range(1, topology.PG_REPLICAS + 1)]
    assert len(BASE_PORTS["postgres"]) == 1 + topology.PG_REPLICAS
    primary = env_of("postgres-primary")
    assert primary["POSTGRES_USER"] == topology.PG_USER
    assert primary["BARBER_DATABASES"].split(",") == list(topology.DATABASES)
    settings = [f"{k}={v}" for k, v in topology.PG_SETTINGS.items()]
    for name in ["postgres-primary", *replicas]:
        cmd = command_of(name)
        assert all(s in cmd for s in settings), f"{name}: {set(settings) - set(cmd)} missing"
        assert any(v.endswith(":/var/lib/postgresql/data") for v in SVC[name]["volumes"]), f"{name}: no data volume"
    for i, name in enumerate(replicas, start=1):
        env = env_of(name)
        assert env["REPLICATION_SLOT"] == topology.replica_slot(i)
        assert env["PRIMARY_HOST"] == "postgres-primary"
        assert env["REPLICATION_USER"] == primary["REPLICATION_USER"]
        assert SVC[name]["entrypoint"] == ["/deploy/postgres/replica.sh"]
        assert "./deploy:/deploy:ro" in SVC[name]["volumes"]
        assert SVC[name]["depends_on"]["postgres-primary"]["condition"] == "service_healthy"

    # The same major version as the servers the local stack runs.
    out = subprocess.run(
        [str(datatier.postgres_bindir() / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    local_major = re.search(r"\(PostgreSQL\) (\d+)", out).group(1)  # type: ignore[union-attr]
    for name in ["postgres-primary", *replicas]:
        assert SVC[name]["image"].split(":")[1].split(".")[0] == local_major, f"{name}: not PostgreSQL {local_major}"


def _pg_target(url: str) -> tuple[str, str]:
    """(role, database) of a PostgreSQL URL: role is primary or replica<i>."""
    parts = urlsplit(url)
    db = parts.path.lstrip("/")
    host = parts.hostname or ""
    if host == "postgres-primary":
        return "primary", db
    if m := re.fullmatch(r"postgres-replica-(\d+)", host):
        return f"replica{m.group(1)}", db
    index = BASE_PORTS["postgres"].index(parts.port)  # the local stack: offset 0
    return ("primary" if index == 0 else f"replica{index}"), db


@pytest.mark.unit
def test_database_urls_point_at_the_same_databases_and_roles_as_the_local_stack() -> None:
    local = service_env(Layout(Path(".stack")))
    seen = 0
    for service in SVC:
        for var, value in env_of(service).items():
            if not (var.endswith(("_DATABASE_URL", "_REPLICA_URLS"))):
                continue
            mine = [_pg_target(u) for u in interpolate(value).split(",")]
            theirs = [_pg_target(u) for u in local[var].split(",")]
            assert mine == theirs, f"{service} {var}: {mine} != local {theirs}"
            seen += 1
    assert seen >= 8


@pytest.mark.unit
def test_redis_topology_matches_the_local_stack() -> None:
    nodes = sorted(n for n in SVC if re.fullmatch(r"redis-cluster-\d+", n))
    assert len(nodes) == topology.CLUSTER_NODES == len(BASE_PORTS["redis_cluster"])
    for name in nodes:
        cmd = command_of(name)
        for key, value in topology.CLUSTER_SETTINGS.items():
            assert cmd[cmd.index(f"--{key}") + 1] == value, f"{name}: --{key}"
        assert cmd[cmd.index("--cluster-announce-hostname") + 1] == name
        assert SVC[name]["volumes"] == [f"{name}:/data"]
    init = env_of("redis-cluster-init")
    addresses = [f"{n}:6379" for n in nodes]
    assert init["CLUSTER_NODES"].split(",") == addresses
    assert init["CLUSTER_REPLICAS"] == str(topology.CLUSTER_REPLICAS_PER_MASTER)
    assert env_of("chat")["REDIS_CLUSTER_NODES"].split(",") == addresses
    assert SVC["chat"]["depends_on"]["redis-cluster-init"]["condition"] == "service_completed_successfully"
    standalone = command_of("redis")
    for key, value in topology.REDIS_SETTINGS.items():
        assert standalone[standalone.index(f"--{key}") + 1] == value
    assert env_of("chat")["CHAT_MONGO_DB"] == env_of("etl")["CHAT_MONGO_DB"] == topology.CHAT_MONGO_DB


@pytest.mark.unit
def test_services_match_the_local_stack() -> None:
    served = {served_module(n): n for n in SVC if served_module(n)}
    assert set(served) == {spec.module for spec in SERVICES}
    for spec in SERVICES:
        service = SVC[served[spec.module]]
        local_instances = len(Layout(Path(".stack")).ports(spec.port_key))
        assert service.get("deploy", {}).get("replicas", 1) == local_instances, spec.name
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "deploy.healthcheck", spec.health_path]
        assert env_of(served[spec.module])["PORT"] == str(Layout(Path(".stack")).port(spec.port_key))
        signs = "JWT_PRIVATE_KEY_FILE" in env_of(served[spec.module])
        mounts_private = any(str(v).startswith("signing-key:") for v in service.get("volumes", []))
        assert signs == mounts_private == spec.signs_tokens, f"{spec.name}: only token signers get the private key"
        for step in spec.setup:
            assert f"python -m {spec.module} {' '.join(step)}" in " ".join(command_of("migrate")), step
    # Every Alembic tree is migrated by the one-shot job, before the services.
    trees = {p.parent.parent.name for p in ROOT.glob("*/migrations/env.py")}
    assert trees == set(topology.MIGRATED_MODULES)
    job = " ".join(command_of("migrate"))
    assert all(f"python -m {m} migrate" in job for m in topology.MIGRATED_MODULES)
    for name in served.values():
        deps = SVC[name]["depends_on"]
        # Keys before every service; migrations before every service with a database.
        assert deps["keygen"]["condition"] == "service_completed_successfully", name
        assert "keys:/var/lib/barber/keys:ro" in SVC[name]["volumes"], name
        uses_db = any(f.endswith("_database_url") for cls in SETTINGS[name] for f in cls.model_fields)
        assert ("migrate" in deps) == uses_db, f"{name}: waits for migrations iff it has a database"


@pytest.mark.unit
def test_scaled_services_have_no_fixed_names_or_ports_and_only_the_gateway_is_public() -> None:
    for name, service in SVC.items():
        assert "container_name" not in service, name
        if service.get("deploy", {}).get("replicas", 1) > 1:
            assert "ports" not in service, name
    published = {name: service["ports"] for name, service in SVC.items() if "ports" in service}
    assert set(published) == {"gateway", "kibana"}
    assert published["gateway"][0].endswith(":8000") and published["kibana"][0].endswith(":5601")
    assert COMPOSE["networks"]["backend"]["internal"] is True
    for name, service in SVC.items():
        if name not in published and service.get("network_mode") != "none":
            assert service["networks"] == ["backend"], name


@pytest.mark.unit
def test_start_order_is_health_based_and_data_lives_in_named_volumes() -> None:
    declared = set(COMPOSE["volumes"])
    for name, service in SVC.items():
        for target, dep in service.get("depends_on", {}).items():
            assert target in SVC, f"{name} depends on unknown {target}"
            if dep["condition"] == "service_healthy":
                assert "healthcheck" in SVC[target] or is_barber(target), f"{target} has no health check"
            else:
                assert dep["condition"] == "service_completed_successfully"
                assert SVC[target]["restart"] == "no", f"{target} is a one-shot job"
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith(("./", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"
        assert "sleep" not in " ".join(command_of(name)), f"{name}: waits by sleeping"
        if not is_barber(name) and service.get("restart") != "no":
            named = [v for v in service.get("volumes", []) if str(v).split(":")[0] in declared]
            assert named, f"{name}: a data server keeps its data in a named volume"
    # Elasticsearch runs with security on (no anonymous access to the logs).
    assert env_of("elasticsearch")["xpack.security.enabled"] == "true"
    assert SVC["kibana"]["depends_on"]["kibana-password"]["condition"] == "service_completed_successfully"
    text = (ROOT / "compose.yml").read_text()
    assert not re.search(r"^\s*\w*PASSWORD\w*:\s*(?!\$\{)\S", text, re.MULTILINE), (
        "a password is written in compose.yml"
    )
    assert not re.search(r"://[^:/\s]+:(?!\$\{)[^@\s]+@", text), "a URL holds a literal password"


# == the image ==============================================================================
@pytest.mark.unit
def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


@pytest.mark.unit
def test_deploy_scripts_pass_shellcheck() -> None:
    scripts = sorted(str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*.sh"))
    assert len(scripts) >= 7
    shellcheck = Path(sys.executable).parent / "shellcheck"
    result = subprocess.run([str(shellcheck), "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.unit
def test_dockerfile_structure() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    instr = [ln for ln in lines if ln and not ln.startswith("#")]
    base = next(ln for ln in instr if ln.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"ARG PYTHON_IMAGE=python:\d+\.\d+\.\d+-slim-\w+", base), "a pinned slim Python base"
    froms = [ln for ln in instr if ln.startswith("FROM ")]
    assert len(froms) == 2 and froms[0].endswith(" AS build"), "two stages: build, run"
    final = instr[instr.index(froms[1]) :]
    assert not any(re.search(r"apt-get|gcc|build-essential", ln) for ln in final), "no build tools in the final stage"
    user = next(ln for ln in final if ln.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert any(ln.startswith("HEALTHCHECK ") for ln in final)
    assert any(ln.startswith('CMD ["python", "-m", "deploy.healthcheck"]') for ln in lines)
    for kind in ("ENTRYPOINT", "CMD"):
        line = [ln for ln in final if ln.startswith(kind + " ")][-1]
        assert json.loads(line[len(kind) + 1 :]), f"{kind} in exec form"
    assert "-c constraints.txt" in (ROOT / "Dockerfile").read_text()


@pytest.mark.unit
def test_constraints_pin_every_dependency_of_the_project() -> None:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for raw in deps:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt (python -m deploy.constraints)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} outside {req.specifier}"
    assert "psycopg-binary" in pins, "extras' dependencies are pinned too"


# == the scripts, run for real ================================================================
@pytest.mark.unit
def test_entrypoint_advertises_the_container_address_and_execs() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ADVERTISE_HOST"}
    probe = "import os; print(os.environ['ADVERTISE_HOST'], os.getpid(), os.getppid())"
    proc = subprocess.Popen(
        ["/bin/sh", str(DEPLOY / "entrypoint.sh"), sys.executable, "-c", probe],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, _ = proc.communicate(timeout=30)
    host, pid, _ = out.split()
    assert host == socket.gethostbyname(socket.gethostname())
    assert int(pid) == proc.pid, "the command replaces the shell (it gets SIGTERM itself)"
    out = subprocess.run(
        ["/bin/sh", str(DEPLOY / "entrypoint.sh"), sys.executable, "-c", probe],
        env={**env, "ADVERTISE_HOST": "10.9.8.7"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split()[0] == "10.9.8.7"


def test_healthcheck_against_the_stacks_services(stack: StackProcess) -> None:
    def check(port: int, *paths: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "deploy.healthcheck", *paths],
            cwd=ROOT,
            env={**os.environ, "PORT": str(port)},
            timeout=30,
        ).returncode

    authen, discovery = stack.layout.port("authen"), stack.layout.port("discovery")
    assert check(authen, "/utilities/status") == 0
    assert check(discovery, "/status") == 0
    assert check(discovery) == 0 and check(authen) == 0, "the image's default tries every status path"
    assert check(authen, "/status") == 1, "a 404 is not healthy"
    assert check(free_port(), "/status") == 1


def test_migrate_job_runs_against_the_stacks_primary(stack: StackProcess) -> None:
    """The one-shot job's very command, with the test stack's URLs for the ones it is given."""
    env = {
        **os.environ,
        **{k: stack.env[k] for k in env_of("migrate") if k in stack.env},
        "BARBER_ADMIN_PASSWORD": "",
        # As in the image, whose virtualenv comes first on PATH.
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    assert {"AUTHEN_DATABASE_URL", "COORDINATOR_DATABASE_URL", "WAREHOUSE_DATABASE_URL"} <= set(env_of("migrate"))
    result = subprocess.run(command_of("migrate"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for module in topology.MIGRATED_MODULES:
        assert f"{module} migrate: database at head" in result.stdout
    assert "no admin account created" in result.stdout


def _keygen(folder: Path) -> tuple[KeySettings, str]:
    env = {
        "JWT_PRIVATE_KEY_FILE": str(folder / "signing" / "jwt.pem"),
        "JWT_PUBLIC_KEY_FILE": str(folder / "keys" / "jwt.pub"),
        "SERVICE_SECRET_FILE": str(folder / "keys" / "service_secret"),
    }
    out = subprocess.run(
        [sys.executable, "-m", "deploy.keygen"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return KeySettings(**{k.lower(): v for k, v in env.items()}), out


@pytest.mark.unit
def test_keygen_makes_keys_with_the_right_modes_and_never_overwrites(tmp_path: Path) -> None:
    from common import tokens

    keys, out = _keygen(tmp_path)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(keys.jwt_private_key_file) == 0o600 and mode(keys.jwt_private_key_file.parent) == 0o700
    assert mode(keys.service_secret_file) == 0o600
    assert mode(keys.jwt_public_key_file) == 0o644
    assert "created" in out and keys.jwt_private_key_file.read_bytes() not in out.encode()
    # The pair works together.
    token = tokens.TokenSigner.from_file(keys.jwt_private_key_file, 60).issue(7, "customer")
    assert tokens.TokenVerifier.from_file(keys.jwt_public_key_file).verify(token).user_id == 7

    before = {
        p: p.read_bytes() for p in (keys.jwt_private_key_file, keys.jwt_public_key_file, keys.service_secret_file)
    }
    _, out = _keygen(tmp_path)
    assert "nothing to do" in out
    assert {p: p.read_bytes() for p in before} == before

    # A lost public key is derived again from the private key, which stays.
    keys.jwt_public_key_file.unlink()
    _keygen(tmp_path)
    assert keys.jwt_private_key_file.read_bytes() == before[keys.jwt_private_key_file]
    assert keys.jwt_public_key_file.read_bytes() == before[keys.jwt_public_key_file]


@pytest.mark.unit
def test_init_env_generates_secrets_once(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    subprocess.run(["/bin/sh", str(DEPLOY / "init-env.sh"), str(target)], check=True, capture_output=True)
    values = dict(
        line.split("=", 1) for line in target.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    generated = [k for k, v in example.items() if v == "generate"]
    assert {
        "POSTGRES_PASSWORD",
        "REPLICATION_PASSWORD",
        "MONGO_PASSWORD",
        "ELASTIC_PASSWORD",
        "KIBANA_PASSWORD",
    } <= set(generated)
    assert all(re.fullmatch(r"[0-9a-f]{48}", values[k]) for k in generated)
    assert len({values[k] for k in generated}) == len(generated)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    before = target.read_text()
    subprocess.run(["/bin/sh", str(DEPLOY / "init-env.sh"), str(target)], check=True, capture_output=True)
    assert target.read_text() == before
    # Every variable compose.yml interpolates is in the example.
    used = set(re.findall(r"\$\{([A-Z_]+)", (ROOT / "compose.yml").read_text()))
    assert used <= set(example), used - set(example)


@pytest.fixture
def pg_scratch() -> Iterator[Path]:
    """A temporary folder the PostgreSQL user (when dropping root) may write to."""
    folder = Path(tempfile.mkdtemp(prefix="barber-compose-pg-"))
    folder.chmod(0o755)
    chown_to_pg_user(folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pg_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{datatier.postgres_bindir()}:{os.environ['PATH']}", **extra}


def _server_args(port: int) -> list[str]:
    args = [
        "-c",
        f"port={port}",
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "unix_socket_directories=",
        "-c",
        "shared_buffers=16MB",
        "-c",
        "logging_collector=off",
    ]
    for key, value in topology.PG_SETTINGS.items():
        args += ["-c", f"{key}={value}"]
    return args


def test_replica_script_makes_a_streaming_replica_of_the_stacks_primary(stack: StackProcess, pg_scratch: Path) -> None:
    primary_port = stack.layout.port("postgres", 0)
    slot = f"compose_test_{uuid.uuid4().hex[:8]}"
    port = free_port()
    data = pg_scratch / "data"
    env = _pg_env(
        PGDATA=str(data),
        PRIMARY_HOST="127.0.0.1",
        PRIMARY_PORT=str(primary_port),
        REPLICATION_USER=topology.PG_USER,
        REPLICATION_SLOT=slot,
    )
    log = pg_scratch / "replica.log"
    probe = f"compose_probe_{uuid.uuid4().hex[:8]}"
    primary_dsn = stack.layout.pg_dsn("postgres")
    replica_dsn = f"postgresql://{topology.PG_USER}@127.0.0.1:{port}/postgres"

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                ["/bin/sh", str(DEPLOY / "postgres" / "replica.sh"), *_server_args(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **run_as_pg_user(),
            )

    def in_recovery() -> bool:
        with psycopg.connect(replica_dsn, connect_timeout=2) as conn:
            return conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True  # type: ignore[index]

    proc = start()
    try:
        wait_until_sync(
            lambda: proc.poll() is not None or in_recovery(),
            timeout=180,
            poll_interval=0.2,
            message="the replica to accept connections as a standby",
        )
        assert proc.poll() is None, log.read_text()
        assert (data / "standby.signal").exists()
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
            assert row is not None, "the script created its replication slot"
            conn.execute(f"CREATE TABLE {probe} (v text)")
            conn.execute(f"INSERT INTO {probe} VALUES (%s)", (slot,))

        def replicated() -> bool:
            with psycopg.connect(replica_dsn, connect_timeout=2) as conn:
                return conn.execute(f"SELECT v FROM {probe}").fetchone() == (slot,)

        wait_until_sync(replicated, timeout=60, message="the write to stream to the replica")
        with psycopg.connect(primary_dsn) as conn:
            assert conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone() == (
                True,
            )
            assert conn.execute(
                "SELECT state FROM pg_stat_replication WHERE application_name = %s", (slot,)
            ).fetchone() == ("streaming",)

        # A restart keeps the data folder (no second base backup).
        stop_process(proc)
        marker = data / "compose-test-marker"
        marker.write_text("kept")
        chown_to_pg_user(marker)
        proc = start()
        wait_until_sync(
            lambda: proc.poll() is not None or in_recovery(),
            timeout=120,
            poll_interval=0.2,
            message="the replica to come back",
        )
        assert proc.poll() is None, log.read_text()
        assert marker.exists() and "standby data present" in log.read_text()
        wait_until_sync(replicated, timeout=30, message="the restarted replica to serve the data")
    finally:
        stop_process(proc)
        with psycopg.connect(primary_dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {probe}")

            def slot_dropped() -> bool:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE slot_name = %s AND NOT active",
                    (slot,),
                )
                return (
                    conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone() is None
                )

            wait_until_sync(slot_dropped, timeout=30, message="the test's slot to be dropped")


def test_init_primary_script_creates_databases_and_the_replication_role(pg_scratch: Path) -> None:
    data, sockets = pg_scratch / "data", pg_scratch / "sockets"
    sockets.mkdir()
    chown_to_pg_user(sockets)
    bindir = datatier.postgres_bindir()
    subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            topology.PG_USER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ],
        check=True,
        capture_output=True,
        **run_as_pg_user(),
    )
    port = free_port()
    server = subprocess.Popen(
        [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-c",
            f"port={port}",
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={sockets}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **run_as_pg_user(),
    )
    dsn = f"postgresql://{topology.PG_USER}@127.0.0.1:{port}/postgres"
    try:
        wait_until_sync(
            lambda: psycopg.connect(dsn, connect_timeout=1).close() is None, timeout=60, message="the scratch primary"
        )
        env = _pg_env(
            PGDATA=str(data),
            POSTGRES_USER=topology.PG_USER,
            PGHOST=str(sockets),
            PGPORT=str(port),
            BARBER_DATABASES=",".join(topology.DATABASES),
            REPLICATION_USER="replicator",
            REPLICATION_PASSWORD="it's a secret",
        )
        for _ in range(2):  # a second run changes nothing and does not fail
            result = subprocess.run(
                ["/bin/sh", str(DEPLOY / "postgres" / "init-primary.sh")],
                env=env,
                capture_output=True,
                text=True,
                **run_as_pg_user(),
            )
            assert result.returncode == 0, result.stdout + result.stderr
        with psycopg.connect(dsn) as conn:
            dbs = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
            assert set(topology.DATABASES) <= dbs
            role = conn.execute(
                "SELECT rolreplication, rolcanlogin, rolpassword LIKE 'SCRAM-SHA-256$%' "
                "FROM pg_authid WHERE rolname = 'replicator'"
            ).fetchone()
            assert role == (True, True, True)
        hba = (data / "pg_hba.conf").read_text().splitlines()
        assert hba.count("host replication replicator all scram-sha-256") == 1
    finally:
        stop_process(server)


@pytest.fixture
def redis_nodes(tmp_path: Path) -> Iterator[list[int]]:
    """Six empty cluster-enabled redis-server processes on free ports (and free bus ports)."""
    binary = datatier.redis_bindir() / "redis-server"
    ports: list[int] = []
    while len(ports) < topology.CLUSTER_NODES:
        p = free_port()
        if p + 10000 < 65536 and p not in ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p + 10000))
                except OSError:
                    continue
            ports.append(p)
    procs = []
    for p in ports:
        (tmp_path / str(p)).mkdir()
        args = [
            str(binary),
            "--port",
            str(p),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path / str(p)),
            "--cluster-config-file",
            "nodes.conf",
            "--protected-mode",
            "no",
        ]
        for key, value in topology.CLUSTER_SETTINGS.items():
            args += [f"--{key}", value]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for p in ports:
            wait_until_sync(lambda p=p: redis.Redis(port=p).ping(), timeout=30, message=f"redis on {p}")
        yield ports
    finally:
        for proc in procs:
            stop_process(proc, signal.SIGTERM, timeout=20)


def _run_cluster_script(ports: list[int]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{datatier.redis_bindir()}:{os.environ['PATH']}",
        "CLUSTER_NODES": ",".join(f"127.0.0.1:{p}" for p in ports),
        "CLUSTER_REPLICAS": str(topology.CLUSTER_REPLICAS_PER_MASTER),
        "CLUSTER_WAIT_S": "60",
    }
    return subprocess.run(
        ["/bin/sh", str(DEPLOY / "redis" / "cluster-create.sh")], env=env, capture_output=True, text=True, timeout=180
    )


def _cluster_shape(port: int) -> dict[str, tuple[str, str]]:
    """node id -> (role, its master's id or -) as the node on ``port`` sees the cluster."""
    raw = redis.Redis(port=port, decode_responses=True).execute_command("CLUSTER", "NODES")
    shape = {}
    for line in str(raw).splitlines():
        fields = line.split()
        shape[fields[0]] = ("master" if "master" in fields[2] else "replica", fields[3])
    return shape


def _myself(port: int) -> str:
    return str(redis.Redis(port=port, decode_responses=True).execute_command("CLUSTER", "MYID"))


def _cluster_info(port: int) -> dict[str, str]:
    raw = redis.Redis(port=port, decode_responses=True).execute_command("CLUSTER", "INFO")
    return dict(line.split(":", 1) for line in str(raw).splitlines() if ":" in line)


def test_cluster_script_creates_the_cluster_once(redis_nodes: list[int]) -> None:
    result = _run_cluster_script(redis_nodes)
    assert result.returncode == 0, result.stdout + result.stderr
    for p in redis_nodes:
        info = _cluster_info(p)
        assert info["cluster_state"] == "ok" and info["cluster_slots_ok"] == "16384"
    shape = _cluster_shape(redis_nodes[0])
    roles = [role for role, _ in shape.values()]
    assert roles.count("master") == topology.CLUSTER_MASTERS
    assert roles.count("replica") == topology.CLUSTER_MASTERS * topology.CLUSTER_REPLICAS_PER_MASTER
    # It serves: a key written through the cluster client reads back.
    client = redis.RedisCluster(host="127.0.0.1", port=redis_nodes[0])
    try:
        client.set("compose:probe", "1")
        assert client.get("compose:probe") == b"1"
    finally:
        client.close()

    again = _run_cluster_script(redis_nodes)
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr
    assert _cluster_shape(redis_nodes[0]) == shape

    # A node that lost its state is for an operator: the job fails and changes nothing.
    lost = next(p for p in redis_nodes if shape[_myself(p)][0] == "replica")
    redis.Redis(port=lost).execute_command("CLUSTER", "RESET", "HARD")
    broken = _run_cluster_script(redis_nodes)
    assert broken.returncode == 1 and "by hand" in broken.stderr, broken.stderr
    assert _cluster_info(lost)["cluster_known_nodes"] == "1"


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str | None, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server API)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append((self.command, self.path, self.headers.get("Authorization"), body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.unit
def test_kibana_password_script_sets_the_kibana_system_password() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.requests = []
    env = {
        **os.environ,
        "ELASTICSEARCH_HOST": f"http://127.0.0.1:{server.server_address[1]}",
        "ELASTIC_PASSWORD": "el-pass_1",
        "KIBANA_PASSWORD": "kb-pass_2",
    }
    try:
        script = ["/bin/sh", str(DEPLOY / "elastic" / "kibana-password.sh")]
        assert subprocess.run(script, env=env, capture_output=True, timeout=30).returncode == 0
        [(method, path, auth, body)] = _Recorder.requests
        assert (method, path) == ("POST", "/_security/user/kibana_system/_password")
        assert auth == "Basic " + base64.b64encode(b"elastic:el-pass_1").decode()
        assert json.loads(body) == {"password": "kb-pass_2"}
        bad = subprocess.run(script, env={**env, "KIBANA_PASSWORD": 'a"b'}, capture_output=True, timeout=30)
        assert bad.returncode == 2 and len(_Recorder.requests) == 1
    finally:
        server.shutdown()
        server.server_close()
