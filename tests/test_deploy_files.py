"""Static checks of the deployment files: Dockerfile, .dockerignore, docker-compose.yml, deploy/.

No Docker engine and no Compose CLI are needed (CI has neither). Compose files are
interpolated the way Compose does it (``${VAR:-default}``, ``${VAR:?error}``, ...), validated
against the official Compose Specification schema vendored in tests/data/compose-spec/, and
then checked for the properties this project relies on. The Dockerfile is parsed (stages,
ARGs, continuation lines) and checked the same way.

Each check returns a list of problems; the tests at the bottom feed deliberately broken copies
of the files to the same checks, so a check that could never fail would be caught.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "docker-compose.yml"
DEPLOY = REPO / "deploy"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec" / "compose-spec.json"

PREFIX = "SIMCLR_EMBED_"

# Values for the variables that the compose files require (``${VAR:?...}``).
TEST_ENV = {
    "SIMCLR_EMBED_API_KEYS": "test-key-1,test-key-2",
    "SIMCLR_EMBED_REDIS_PASSWORD": "0123456789abcdef",
    "SIMCLR_EMBED_POSTGRES_PASSWORD": "fedcba9876543210",
    "SIMCLR_EMBED_REDIS_PUBLISH_ADDR": "10.0.0.11",
    "SIMCLR_EMBED_NFS_SERVER": "10.0.0.2",
    "SIMCLR_EMBED_BROKER_URL": "redis://:0123456789abcdef@10.0.0.11:6379/0",
    "SIMCLR_EMBED_DATASETS_DIR": "/mnt/datasets",
}
# The single-machine stack needs only the API keys; anything else has a default.
MAIN_ENV = {"SIMCLR_EMBED_API_KEYS": "test-key"}


# ==========================================================================================
# Compose: YAML loading and interpolation
# ==========================================================================================


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus Compose's merge tags (``!reset``, ``!override``, Compose >= 2.24.4)."""


def _construct_tagged(loader: ComposeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", _construct_tagged)
ComposeLoader.add_constructor("!override", _construct_tagged)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ComposeLoader)


class InterpolationError(ValueError):
    pass


class MissingVariable(InterpolationError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {message}")
        self.name = name


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


def interpolate_string(text: str, env: dict[str, str], used: set[str]) -> str:
    """Compose's variable substitution (the compose-spec's interpolation section)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$":
            out.append(char)
            i += 1
            continue
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("${", i):
            depth, j = 0, i + 1
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            else:
                raise InterpolationError(f"unclosed '${{' in {text!r}")
            out.append(_expand(text[i + 2 : j], env, used, text))
            i = j + 1
            continue
        match = _NAME.match(text, i + 1)
        if not match:
            raise InterpolationError(f"invalid '$' in {text!r} (write '$$' for a literal dollar)")
        used.add(match.group())
        out.append(env.get(match.group(), ""))
        i = match.end()
    return "".join(out)


def _expand(body: str, env: dict[str, str], used: set[str], whole: str) -> str:
    match = _NAME.match(body)
    if not match:
        raise InterpolationError(f"invalid variable name in {whole!r}")
    name, rest = match.group(), body[match.end() :]
    used.add(name)
    value = env.get(name)
    if not rest:
        return value or ""
    op = next((o for o in _OPERATORS if rest.startswith(o)), None)
    if op is None:
        raise InterpolationError(f"unsupported substitution '${{{body}}}' in {whole!r}")
    arg = rest[len(op) :]
    if op == ":-":
        return value if value else interpolate_string(arg, env, used)
    if op == "-":
        return value if value is not None else interpolate_string(arg, env, used)
    if op == ":?":
        if not value:
            raise MissingVariable(name, arg)
        return value
    if op == "?":
        if value is None:
            raise MissingVariable(name, arg)
        return value
    if op == ":+":
        return interpolate_string(arg, env, used) if value else ""
    return interpolate_string(arg, env, used) if value is not None else ""  # "+"


def interpolate(node: Any, env: dict[str, str], used: set[str]) -> Any:
    """Substitute variables in every string value (Compose does not touch keys)."""
    if isinstance(node, dict):
        return {key: interpolate(value, env, used) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env, used) for value in node]
    if isinstance(node, str):
        return interpolate_string(node, env, used)
    return node


def variables_in(text: str) -> set[str]:
    """Every variable a compose file reads (defaults and nested ones included), whatever the environment."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            names.update(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", node.replace("$$", "")))

    walk(load_yaml(text))
    return names


@lru_cache(maxsize=1)
def compose_validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def schema_problems(config: Any) -> list[str]:
    errors = sorted(compose_validator().iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"schema: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def resolved(text: str, env: dict[str, str]) -> dict[str, Any]:
    config = interpolate(load_yaml(text), env, set())
    assert isinstance(config, dict), "a compose file is a mapping"
    return config


# ==========================================================================================
# Compose: the properties this project relies on
# ==========================================================================================

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value).strip())
    if not match:
        raise ValueError(f"not a size: {value!r}")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def image_problems(where: str, image: Any) -> list[str]:
    if not isinstance(image, str) or not image:
        return [f"{where}: no image"]
    if "@sha256:" in image:
        return []
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:
        return [f"{where}: image {image!r} has no tag (pin a version)"]
    if tag == "latest" or not re.search(r"\d", tag):
        return [f"{where}: image {image!r} is not pinned to a version"]
    return []


def env_map(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return dict(env)


def volume_mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Short and long volume syntax as dicts: source, target, read_only."""
    mounts = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            mounts.append(
                {"source": item.get("source"), "target": item.get("target"), "read_only": bool(item.get("read_only"))}
            )
            continue
        parts = item.split(":")
        if len(parts) == 1:
            mounts.append({"source": None, "target": parts[0], "read_only": False})
        else:
            mode = parts[2] if len(parts) > 2 else ""
            mounts.append({"source": parts[0], "target": parts[1], "read_only": "ro" in mode.split(",")})
    return mounts


def is_named_volume(source: str | None) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


def healthcheck_of(service: dict[str, Any]) -> dict[str, Any] | None:
    check = service.get("healthcheck")
    if not check or check.get("disable") in (True, "true"):
        return None
    test = check.get("test")
    if not test or (isinstance(test, list) and test[0] == "NONE"):
        return None
    return check


def healthcheck_text(check: dict[str, Any]) -> str:
    test = check["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def depends_on_healthy(service: dict[str, Any], target: str) -> bool:
    deps = service.get("depends_on") or {}
    return isinstance(deps, dict) and (deps.get(target) or {}).get("condition") == "service_healthy"


def gpu_reservation_problems(where: str, service: dict[str, Any]) -> list[str]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    for device in devices:
        if (
            device.get("driver") == "nvidia"
            and str(device.get("count")) == "all"
            and "gpu" in (device.get("capabilities") or [])
        ):
            return []
    return [
        f"{where}: no deploy.resources.reservations.devices entry with driver nvidia, count all, capabilities [gpu]"
    ]


def worker_runtime_problems(where: str, service: dict[str, Any]) -> list[str]:
    problems = gpu_reservation_problems(where, service)
    shm = service.get("shm_size")
    if shm is None or parse_size(shm) < 2 << 30:
        problems.append(f"{where}: shm_size {shm!r} is too small for DataLoader workers (>= 2gb)")
    datasets = [m for m in volume_mounts(service) if m["target"] == "/datasets"]
    if not datasets or not all(m["read_only"] for m in datasets):
        problems.append(f"{where}: the datasets folder must be mounted read-only at /datasets")
    return problems


def app_env_problems(where: str, service: dict[str, Any]) -> list[str]:
    return [
        f"{where}: environment variable {key} lacks the {PREFIX} prefix"
        for key in env_map(service)
        if not key.startswith(PREFIX)
    ]


def is_our_service(service: dict[str, Any]) -> bool:
    image = str(service.get("image") or "")
    return "build" in service or image.split("/")[-1].startswith("simclr-embed")


def common_compose_problems(raw: str, config: dict[str, Any], base: dict[str, Any] | None = None) -> list[str]:
    """What every compose file of the project must satisfy. `base`: the file an override extends."""
    problems = schema_problems(config)
    for name in sorted(variables_in(raw)):
        if not name.startswith(PREFIX):
            problems.append(f"variable ${{{name}}} lacks the {PREFIX} prefix")
    if re.search(r"^version\s*:", raw, re.MULTILINE):
        problems.append("top-level `version` is obsolete in the Compose Specification")
    base = base or {}
    base_services = base.get("services") or {}
    services = config.get("services") or {}
    known = set(base_services) | set(services)
    declared = set(base.get("volumes") or {}) | set(config.get("volumes") or {})
    for name, own in services.items():
        service = {**base_services.get(name, {}), **own}  # what the override's service becomes, roughly
        if "image" in service or "build" not in service:
            problems += image_problems(f"service {name}", service.get("image"))
        if is_our_service(service):
            problems += app_env_problems(f"service {name}", own)
        for mount in volume_mounts(own):
            if is_named_volume(mount["source"]) and mount["source"] not in declared:
                problems.append(f"service {name}: volume {mount['source']!r} is not declared under top-level volumes")
        for dep in own.get("depends_on") or {}:
            if dep not in known:
                problems.append(f"service {name}: depends on unknown service {dep!r}")
    return problems


def main_compose_problems(raw: str, env: dict[str, str] | None = None) -> list[str]:
    """docker-compose.yml: the single-machine production stack."""
    try:
        config = resolved(raw, MAIN_ENV if env is None else env)
    except (InterpolationError, yaml.YAMLError) as exc:
        return [f"cannot load: {exc}"]
    problems = common_compose_problems(raw, config)
    services = config.get("services") or {}
    missing = {"redis", "api", "worker", "flower"} - set(services)
    if missing:
        return problems + [f"missing services: {sorted(missing)}"]
    redis, api, worker, flower = (services[n] for n in ("redis", "api", "worker", "flower"))

    # redis: append-only persistence on a named volume, health check
    command = redis.get("command") or []
    command = command.split() if isinstance(command, str) else command
    if "--appendonly" not in command or command[command.index("--appendonly") + 1 :][:1] != ["yes"]:
        problems.append("redis: append-only persistence is off (--appendonly yes)")
    if not any(m["target"] == "/data" and is_named_volume(m["source"]) for m in volume_mounts(redis)):
        problems.append("redis: /data is not on a named volume")
    if not healthcheck_of(redis):
        problems.append("redis: no health check")

    # api: built from target api, port 8000, readiness health check, redis healthy first
    if (api.get("build") or {}).get("target") != "api":
        problems.append("api: not built from the Dockerfile target `api`")
    if not any(str(p).split(":")[-1].split("/")[0] == "8000" for p in api.get("ports") or []):
        problems.append("api: container port 8000 is not published")
    check = healthcheck_of(api)
    if not check or "/readyz" not in healthcheck_text(check):
        problems.append("api: no health check on /readyz")
    elif "curl" in healthcheck_text(check) or "wget" in healthcheck_text(check):
        problems.append("api: health check relies on curl/wget, which the slim image lacks")
    if not depends_on_healthy(api, "redis"):
        problems.append("api: does not wait for redis to be healthy (depends_on condition service_healthy)")
    api_env = env_map(api)
    if api_env.get("SIMCLR_EMBED_PORT") not in ("8000", 8000):
        problems.append("api: SIMCLR_EMBED_PORT is not 8000")
    raw_api_env = env_map((load_yaml(raw).get("services") or {}).get("api") or {})
    keys_source = str(raw_api_env.get("SIMCLR_EMBED_API_KEYS") or "")
    if not keys_source.startswith("${SIMCLR_EMBED_API_KEYS:?"):
        problems.append(
            "api: SIMCLR_EMBED_API_KEYS must come from the environment, required (${SIMCLR_EMBED_API_KEYS:?...})"
        )

    # api and worker share one named data volume, the datasets read-only, the broker
    for name, service in (("api", api), ("worker", worker)):
        env_ = env_map(service)
        if env_.get("SIMCLR_EMBED_DATA_DIR") != "/data":
            problems.append(f"{name}: SIMCLR_EMBED_DATA_DIR is not /data")
        if env_.get("SIMCLR_EMBED_BROKER_URL") != "redis://redis:6379/0":
            problems.append(f"{name}: SIMCLR_EMBED_BROKER_URL does not default to redis://redis:6379/0")
        if env_.get("SIMCLR_EMBED_DATASET_ROOTS") != "/datasets":
            problems.append(f"{name}: SIMCLR_EMBED_DATASET_ROOTS is not /datasets")
        if str(env_.get("SIMCLR_EMBED_DEMO_ON_EMPTY")).lower() != "false":
            problems.append(f"{name}: SIMCLR_EMBED_DEMO_ON_EMPTY is not false")
    data_volumes = [
        {m["source"] for m in volume_mounts(s) if m["target"] == "/data" and is_named_volume(m["source"])}
        for s in (api, worker)
    ]
    if not data_volumes[0] or data_volumes[0] != data_volumes[1]:
        problems.append("api and worker do not mount the same named volume at /data")

    # worker: target worker, all GPUs, shm, datasets, queues
    if (worker.get("build") or {}).get("target") != "worker":
        problems.append("worker: not built from the Dockerfile target `worker`")
    problems += worker_runtime_problems("worker", worker)
    wcmd = worker.get("command") or []
    wcmd = wcmd.split() if isinstance(wcmd, str) else wcmd
    if (
        "worker" not in wcmd
        or "--queues" not in wcmd
        or set(wcmd[wcmd.index("--queues") + 1].split(","))
        != {
            "train",
            "index",
        }
    ):
        problems.append("worker: command is not `simclr-embed worker --queues train,index`")
    if not depends_on_healthy(worker, "redis"):
        problems.append("worker: does not wait for redis to be healthy")

    # flower: optional, under a profile, broker from the one setting
    if "monitoring" not in (flower.get("profiles") or []):
        problems.append("flower: not under profiles [monitoring]")
    if not str(flower.get("image", "")).startswith("mher/flower:"):
        problems.append("flower: image is not mher/flower")
    raw_flower = (load_yaml(raw).get("services") or {}).get("flower") or {}
    if "SIMCLR_EMBED_BROKER_URL" not in json.dumps(raw_flower):
        problems.append("flower: broker does not come from SIMCLR_EMBED_BROKER_URL")
    for name, service in services.items():
        if name not in ("redis", "api", "worker") and not service.get("profiles"):
            problems.append(f"{name}: optional services belong under a profile")
    return problems


def worker_node_problems(raw: str, env: dict[str, str] | None = None) -> list[str]:
    """deploy/compose.worker-node.yml: GPU workers against a remote broker and shared storage."""
    try:
        config = resolved(raw, TEST_ENV if env is None else env)
    except (InterpolationError, yaml.YAMLError) as exc:
        return [f"cannot load: {exc}"]
    problems = common_compose_problems(raw, config)
    services = config.get("services") or {}
    if set(services) & {"redis", "api"}:
        problems.append("a worker-only node runs no redis and no api")
    worker = services.get("worker")
    if not worker:
        return problems + ["no worker service"]
    problems += worker_runtime_problems("worker", worker)
    raw_worker = (load_yaml(raw).get("services") or {}).get("worker") or {}
    if not str(env_map(raw_worker).get("SIMCLR_EMBED_BROKER_URL", "")).startswith("${SIMCLR_EMBED_BROKER_URL:?"):
        problems.append("worker: the remote broker URL must be required from the environment")
    shared = [m for m in volume_mounts(worker) if m["target"] in ("/data/models", "/data/jobs")]
    volumes = config.get("volumes") or {}
    if len(shared) != 2 or any(
        (volumes.get(m["source"]) or {}).get("driver_opts", {}).get("type") != "nfs" for m in shared
    ):
        problems.append("worker: models/ and jobs/ must be on shared (NFS) volumes")
    queues = worker.get("command", [])[-1] if worker.get("command") else ""
    if "index" in str(queues).split(","):
        problems.append("worker: a remote node must not take the `index` queue (SQLite item store is local)")
    return problems


# ==========================================================================================
# Dockerfile
# ==========================================================================================


@dataclass
class Instruction:
    cmd: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str
    args: dict[str, str] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Join continuation lines; drop comments and blank lines (as BuildKit's parser does)."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(part for part in buf if part)))
        buf = []
    if buf:
        out.append((start, " ".join(buf)))
    return out


def substitute_args(text: str, args: dict[str, str]) -> str:
    """Expand ARG values (``$NAME``, ``${NAME}``, ``${NAME:-default}``); other variables stay as written."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        if name in args:
            return args[name]
        return match.group(2) if match.group(2) is not None else match.group(0)

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", repl, text)


def parse_arg(spec: str) -> tuple[str, str]:
    name, _, default = spec.partition("=")
    return name.strip(), default.strip().strip('"').strip("'")


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        cmd, _, rest = line.partition(" ")
        cmd = cmd.upper()
        rest = rest.strip()
        if cmd == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            base = substitute_args(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else f"#{len(stages)}"
            stages.append(Stage(name=name, base=base))
        elif not stages:
            if cmd == "ARG":
                key, default = parse_arg(rest)
                global_args[key] = default
        else:
            stage = stages[-1]
            if cmd == "ARG":
                key, default = parse_arg(rest)
                stage.args[key] = default or global_args.get(key, "")
            stage.instructions.append(Instruction(cmd, substitute_args(rest, stage.args), number))
    return global_args, stages


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def copy_from(instruction: Instruction) -> str | None:
    match = re.search(r"--from=(\S+)", instruction.args)
    return match.group(1) if instruction.cmd == "COPY" and match else None


def copy_sources(instruction: Instruction) -> list[str]:
    words = [w for w in instruction.args.split() if not w.startswith("--")]
    return words[:-1]


def chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, root first."""
    out: list[Stage] = []
    current: Stage | None = stages[name]
    while current is not None:
        out.insert(0, current)
        current = stages.get(current.base)
    return out


def closure(stages: dict[str, Stage], name: str) -> list[Stage]:
    """Every stage whose content can end up in `name` (FROM parents and COPY --from sources)."""
    seen: dict[str, Stage] = {}
    todo = [name]
    while todo:
        stage = stages.get(todo.pop())
        if stage is None or stage.name in seen:
            continue
        seen[stage.name] = stage
        todo.append(stage.base)
        todo += [src for ins in stage.instructions if (src := copy_from(ins))]
    return list(seen.values())


def effective(stages: dict[str, Stage], name: str, cmd: str) -> Instruction | None:
    found = None
    for stage in chain(stages, name):
        for instruction in stage.instructions:
            if instruction.cmd == cmd:
                found = instruction
    return found


def extras_installed(instruction: Instruction) -> set[str]:
    return set().union(*(extras_of(c) for c in pip_commands(instruction)))


def extras_of(command: str) -> set[str]:
    return {e.strip() for group in re.findall(r"\.\[([^\]]*)\]", command) for e in group.split(",") if e.strip()}


def pip_commands(instruction: Instruction) -> list[str]:
    """The `pip install ...` commands of a RUN, split on && and ;."""
    return [c.strip() for c in re.split(r"&&|;|\|\|", instruction.args) if re.search(r"\bpip3? install\b", c)]


def pip_installs(stage: Stage) -> list[tuple[int, Instruction]]:
    return [
        (i, ins)
        for i, ins in enumerate(stage.instructions)
        if ins.cmd == "RUN" and re.search(r"\bpip3? install\b", ins.args)
    ]


ALLOWED_NON_APP_ENV = {"PATH", "DEBIAN_FRONTEND", "LANG", "LC_ALL"}
ALLOWED_NON_APP_ENV_PREFIXES = ("PIP_", "PYTHON", "NVIDIA_", "CUDA_")


def env_keys(instruction: Instruction) -> list[str]:
    return re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", instruction.args)


def dockerfile_problems(text: str) -> list[str]:
    problems: list[str] = []
    _, stage_list = parse_dockerfile(text)
    stages = {s.name: s for s in stage_list}
    for required in ("api", "worker"):
        if required not in stages:
            return [f"no stage named {required!r}"]

    # Base images: pinned, the right kind for each target.
    for stage in stage_list:
        if stage.base not in stages:
            problems += image_problems(f"stage {stage.name}", stage.base)
    api_root = chain(stages, "api")[0].base
    worker_root = chain(stages, "worker")[0].base
    if not re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", api_root):
        problems.append(f"api: base {api_root!r} is not a pinned python:3.11.X-slim-bookworm")
    if not re.fullmatch(
        r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn\d*-)?runtime-ubuntu\d+\.\d+(@sha256:[0-9a-f]{64})?", worker_root
    ):
        problems.append(f"worker: base {worker_root!r} is not a pinned nvidia/cuda runtime image")
    worker_runs = " ".join(i.args for s in chain(stages, "worker") for i in s.instructions if i.cmd == "RUN")
    if "python3.11" not in worker_runs:
        problems.append("worker: python3.11 is not installed on the CUDA base")

    for target in ("api", "worker"):
        # Non-root user, health check, a command.
        user = effective(stages, target, "USER")
        user_name = user.args.split(":")[0].strip() if user else "root"
        if user_name in ("root", "0", ""):
            problems.append(f"{target}: runs as root (USER {user.args if user else 'unset'})")
        health = effective(stages, target, "HEALTHCHECK")
        if health is None or health.args.strip().upper() == "NONE":
            problems.append(f"{target}: no HEALTHCHECK")
        elif re.search(r"\b(curl|wget)\b", health.args):
            problems.append(f"{target}: HEALTHCHECK relies on curl/wget")
        cmd = effective(stages, target, "CMD")
        cmd_words = exec_form(cmd.args) if cmd else None
        expected = {"api": ["simclr-embed", "serve"], "worker": ["simclr-embed", "worker"]}[target]
        if not cmd_words or cmd_words[:2] != expected:
            problems.append(f"{target}: CMD is not the exec form of `{' '.join(expected)} ...`")
        # ENV: the app's settings carry the one prefix.
        for stage in chain(stages, target):
            for instruction in stage.instructions:
                if instruction.cmd != "ENV":
                    continue
                for key in env_keys(instruction):
                    if key not in ALLOWED_NON_APP_ENV and not key.startswith((PREFIX, *ALLOWED_NON_APP_ENV_PREFIXES)):
                        problems.append(f"{target}: ENV {key} lacks the {PREFIX} prefix")

    # What gets installed where.
    api_pips = [cmd for st in closure(stages, "api") for _, ins in pip_installs(st) for cmd in pip_commands(ins)]
    for command in api_pips:
        extras = extras_of(command)
        if extras & {"training", "serving-gpu"} or re.search(
            r"(?<![\w-])(torch|torchvision|onnxruntime-gpu)(?![\w-])", command
        ):
            problems.append(f"api: `{command}` brings torch or GPU packages; the API image must stay slim")
    if not any("serving" in extras_of(c) for c in api_pips):
        problems.append("api: does not install the `serving` extra")
    worker_extras = {
        e for st in closure(stages, "worker") for _, ins in pip_installs(st) for e in extras_installed(ins)
    }
    if "training" not in worker_extras:
        problems.append("worker: does not install the `training` extra")
    if len(worker_extras & {"serving", "serving-gpu"}) != 1:
        problems.append(f"worker: installs extras {sorted(worker_extras)}: want exactly one of serving, serving-gpu")

    # Layer order: dependencies from pyproject.toml alone, then the code, installed with --no-deps.
    def installs_deps(name: str) -> bool:
        return any(extras_installed(ins) for st in chain(stages, name) for _, ins in pip_installs(st))

    for stage in {st.name: st for t in ("api", "worker") for st in closure(stages, t)}.values():
        instructions = stage.instructions
        code = []
        for index, ins in enumerate(instructions):
            if ins.cmd in ("COPY", "ADD") and not copy_from(ins):
                sources = {src.rstrip("/").removeprefix("./") for src in copy_sources(ins)}
                if sources & {"", "."}:
                    problems.append(f"stage {stage.name}: `COPY .` sends every change into this layer")
                if sources & {"", ".", "service", "trainer"}:
                    code.append(index)
        first_code = min(code, default=len(instructions))
        for index, ins in pip_installs(stage):
            if not extras_installed(ins):
                continue
            if index > first_code:
                problems.append(f"stage {stage.name}: dependencies are installed after the code is copied")
            if not any(i.cmd == "COPY" and "pyproject.toml" in copy_sources(i) for i in instructions[:index]):
                problems.append(f"stage {stage.name}: dependencies are installed without pyproject.toml copied first")
        if not code:
            continue
        later = [ins for index, ins in pip_installs(stage) if index > first_code]
        if not later or any("--no-deps" not in ins.args for ins in later):
            problems.append(f"stage {stage.name}: the code must be installed with --no-deps after it is copied")
        deps_first = installs_deps(stage.base) if stage.base in stages else False
        for ins in instructions[:first_code]:
            source = copy_from(ins)
            deps_first |= bool(source and source in stages and installs_deps(source))
            deps_first |= ins.cmd == "RUN" and bool(extras_installed(ins))
        if not deps_first:
            problems.append(f"stage {stage.name}: no dependency layer before the code")

    if not any(i.cmd == "EXPOSE" and "8000" in i.args.split() for st in chain(stages, "api") for i in st.instructions):
        problems.append("api: does not EXPOSE 8000")
    for stage in stage_list:
        for ins in stage.instructions:
            if ins.cmd == "ADD" and re.search(r"https?://", ins.args):
                problems.append(f"stage {stage.name}: ADD of a URL (line {ins.line}); download with a checksum instead")
    return problems


# ==========================================================================================
# .dockerignore
# ==========================================================================================


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out.append(pattern[i : j + 1])
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_excludes(text: str, path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern_regex(pattern)))
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


MUST_SEND = ["pyproject.toml", "README.md", "service/__init__.py", "service/api/app.py", "trainer/models.py",
             "deploy/torchrun-multinode.sh"]  # fmt: skip
MUST_NOT_SEND = [".git/HEAD", ".venv/bin/python", ".env", ".env.production", "data/models/active",
                 "runs/r1/ckpt.pt", "tests/test_x.py", "service/__pycache__/app.cpython-311.pyc",
                 "simclr_embed.egg-info/PKG-INFO", "deploy/compose.head.yml", "model.onnx"]  # fmt: skip


def dockerignore_problems(text: str) -> list[str]:
    problems = [
        f".dockerignore excludes {p}, which the images need" for p in MUST_SEND if dockerignore_excludes(text, p)
    ]
    problems += [
        f".dockerignore lets {p} into the build context" for p in MUST_NOT_SEND if not dockerignore_excludes(text, p)
    ]
    return problems


# ==========================================================================================
# The tests
# ==========================================================================================


def read(path: Path) -> str:
    assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    return path.read_text()


def test_vendored_schema_is_the_compose_specification() -> None:
    schema = json.loads(read(SCHEMA))
    assert schema["title"] == "Compose Specification"
    assert {"service", "deployment", "devices", "healthcheck"} <= set(schema["$defs"])
    compose_validator()  # the schema itself is a valid draft 2020-12 schema


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    cases = {
        "${SET}": "v", "$SET/x": "v/x", "${UNSET}": "", "${UNSET:-d}": "d", "${EMPTY:-d}": "d",
        "${EMPTY-d}": "", "${UNSET-d}": "d", "${SET:+alt}": "alt", "${UNSET:+alt}": "", "$$SET": "$SET",
        "${UNSET:-${SET}}": "v", "a${SET}b${UNSET:-c}": "avbc",
    }  # fmt: skip
    for template, expected in cases.items():
        assert interpolate_string(template, env, set()) == expected, template
    for template in ("${EMPTY:?no}", "${UNSET?no}", "${UNSET:?no}"):
        with pytest.raises(MissingVariable):
            interpolate_string(template, env, set())
    for template in ("$", "${", "${1X}", "${SET/x}"):
        with pytest.raises(InterpolationError):
            interpolate_string(template, env, set())


def test_compose_file_is_valid_and_wired() -> None:
    assert main_compose_problems(read(COMPOSE)) == []


def test_compose_requires_api_keys_and_hardcodes_no_secret() -> None:
    raw = read(COMPOSE)
    for env in ({}, {"SIMCLR_EMBED_API_KEYS": ""}):
        with pytest.raises(MissingVariable) as info:
            resolved(raw, env)
        assert info.value.name == "SIMCLR_EMBED_API_KEYS"
    config = resolved(raw, {"SIMCLR_EMBED_API_KEYS": "k1,k2"})
    assert env_map(config["services"]["api"])["SIMCLR_EMBED_API_KEYS"] == "k1,k2"
    # No key, password or token is written into the file itself.
    for line in raw.splitlines():
        match = re.match(r"\s*([A-Z_]*(?:KEY|PASSWORD|SECRET|TOKEN)[A-Z_]*)\s*:\s*(\S.*)$", line)
        if match:
            assert match.group(2).startswith("${"), f"literal secret in docker-compose.yml: {line.strip()}"


def test_compose_settings_come_from_prefixed_variables_with_defaults() -> None:
    raw = read(COMPOSE)
    used = variables_in(raw)
    assert used and all(name.startswith(PREFIX) for name in used), sorted(used)
    # Everything but the API keys has a default: the stack starts with only them set.
    config = resolved(raw, MAIN_ENV)
    assert config["services"]["api"]["ports"] == ["0.0.0.0:8000:8000"]
    moved = resolved(raw, {**MAIN_ENV, "SIMCLR_EMBED_PUBLISH_PORT": "9000", "SIMCLR_EMBED_WORKER_SHM_SIZE": "16gb"})
    assert moved["services"]["api"]["ports"] == ["0.0.0.0:9000:8000"]
    assert moved["services"]["worker"]["shm_size"] == "16gb"


def test_deploy_compose_files_are_valid() -> None:
    files = sorted(DEPLOY.glob("compose*.yml"))
    names = {f.name for f in files}
    assert {"compose.worker-node.yml", "compose.replicas.yml", "compose.head.yml"} <= names, names
    base = resolved(read(COMPOSE), MAIN_ENV)
    for path in files:
        raw = read(path)
        if path.name == "compose.worker-node.yml":
            assert worker_node_problems(raw) == [], path.name
        else:  # overrides of docker-compose.yml
            assert common_compose_problems(raw, resolved(raw, TEST_ENV), base=base) == [], path.name


def test_worker_node_requires_broker_and_shared_storage() -> None:
    raw = read(DEPLOY / "compose.worker-node.yml")
    for missing in ("SIMCLR_EMBED_BROKER_URL", "SIMCLR_EMBED_NFS_SERVER", "SIMCLR_EMBED_DATASETS_DIR"):
        env = {k: v for k, v in TEST_ENV.items() if k != missing}
        with pytest.raises(MissingVariable) as info:
            resolved(raw, env)
        assert info.value.name == missing


def test_replicas_override_scales_the_api_behind_a_load_balancer() -> None:
    raw = read(DEPLOY / "compose.replicas.yml")
    assert re.search(r"^\s*ports:\s*!reset\s*\[\]", raw, re.MULTILINE), "api must drop its host port"
    with pytest.raises(MissingVariable) as info:
        resolved(raw, {})
    assert info.value.name == "SIMCLR_EMBED_POSTGRES_PASSWORD"
    secret = {"SIMCLR_EMBED_POSTGRES_PASSWORD": "pw123"}
    config = resolved(raw, secret)
    assert str(config["services"]["api"]["deploy"]["replicas"]) == "3"
    five = resolved(raw, {**secret, "SIMCLR_EMBED_API_REPLICAS": "5"})
    assert str(five["services"]["api"]["deploy"]["replicas"]) == "5"
    # the replicas and the worker share one PostgreSQL item store, started healthy first
    postgres = config["services"]["postgres"]
    assert "pg_isready" in healthcheck_text(healthcheck_of(postgres))
    assert any(
        m["target"] == "/var/lib/postgresql/data" and is_named_volume(m["source"]) for m in volume_mounts(postgres)
    )
    for name in ("api", "worker"):
        service = config["services"][name]
        assert env_map(service)["SIMCLR_EMBED_STORE_URL"] == "postgresql://simclr:pw123@postgres:5432/simclr"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    lb = config["services"]["lb"]
    assert any(m["source"] == "./deploy/nginx.conf" for m in volume_mounts(lb))
    nginx = read(DEPLOY / "nginx.conf")
    assert nginx.count("{") == nginx.count("}"), "unbalanced braces in nginx.conf"
    assert re.search(r"server\s+api:8000\b[^;]*\bresolve\b", nginx), "nginx must re-resolve the api replicas"
    assert re.search(r"proxy_pass\s+http://", nginx)
    assert re.search(r"listen\s+8080;", nginx) and str(lb["ports"][0]).endswith(":8080")


def test_prometheus_scrapes_the_api_metrics() -> None:
    config = load_yaml(read(DEPLOY / "prometheus.yml"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = []
    for job in jobs.values():
        for static in job.get("static_configs", []):
            targets += [(t, job.get("metrics_path", "/metrics")) for t in static["targets"]]
        for sd in job.get("dns_sd_configs", []):
            targets += [(f"{n}:{sd['port']}", job.get("metrics_path", "/metrics")) for n in sd["names"]]
    assert ("api:8000", "/metrics") in targets, targets
    compose = resolved(read(COMPOSE), MAIN_ENV)
    prometheus = compose["services"]["prometheus"]
    assert any(m["source"] == "./deploy/prometheus.yml" for m in volume_mounts(prometheus))


def test_torchrun_script_runs_torchrun_with_c10d_rendezvous(tmp_path: Path) -> None:
    script = DEPLOY / "torchrun-multinode.sh"
    assert read(script).startswith("#!/usr/bin/env bash")
    assert script.stat().st_mode & stat.S_IXUSR, "deploy/torchrun-multinode.sh must be executable"
    bash = shutil.which("bash")
    assert bash, "bash is needed to check deploy/torchrun-multinode.sh"
    subprocess.run([bash, "-n", str(script)], check=True, timeout=10)
    # A stand-in torchrun that prints its arguments, one a line.
    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    missing = subprocess.run([bash, str(script), "--data", "/d"], env=env, capture_output=True, text=True, timeout=10)
    assert missing.returncode != 0 and "SIMCLR_EMBED_RDZV_HOST" in missing.stderr
    run = subprocess.run(
        [bash, str(script), "--data", "/datasets/x", "--out", "/data/jobs/r1"],
        env={**env, "SIMCLR_EMBED_RDZV_HOST": "10.0.0.11", "SIMCLR_EMBED_NNODES": "4"},
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    argv = run.stdout.splitlines()
    pairs = dict(zip(argv, argv[1:]))
    assert pairs["--nnodes"] == "4" and pairs["--nproc-per-node"] == "gpu"
    assert pairs["--rdzv-backend"] == "c10d" and pairs["--rdzv-endpoint"] == "10.0.0.11:29400"
    assert argv[argv.index("-m") :] == ["-m", "trainer.cli", "train", "--data", "/datasets/x", "--out", "/data/jobs/r1"]


def test_dockerfile_targets() -> None:
    assert dockerfile_problems(read(DOCKERFILE)) == []


def test_dockerfile_parser_sees_the_stages() -> None:
    _, stage_list = parse_dockerfile(read(DOCKERFILE))
    stages = {s.name: s for s in stage_list}
    assert {"api", "worker"} <= set(stages)
    assert "python" in chain(stages, "api")[0].base and "nvidia/cuda" in chain(stages, "worker")[0].base
    assert effective(stages, "api", "HEALTHCHECK") is not None
    # The code layers come after the dependency layers in both final stages.
    for target in ("api", "worker"):
        cmds = [(i.cmd, i.args) for i in stages[target].instructions]
        deps = next(n for n, (c, a) in enumerate(cmds) if c == "COPY" and "--from=" in a and "/opt/venv" in a)
        code = next(n for n, (c, a) in enumerate(cmds) if c == "COPY" and a.split()[0] == "service")
        assert deps < code, target


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    assert dockerignore_problems(read(DOCKERIGNORE)) == []


# ------------------------------------------------------------------------------------------
# The checks above must be able to fail: broken copies of the files are caught.
# ------------------------------------------------------------------------------------------

DOCKERFILE_BREAKAGES: dict[str, Callable[[str], str]] = {
    "api runs as root": lambda t: t.replace("USER ${APP_UID}:${APP_UID}\nVOLUME", "USER root\nVOLUME", 1),
    "worker user removed": lambda t: _rsub(t, r"USER \$\{APP_UID\}:\$\{APP_UID\}\n", ""),
    "api installs training": lambda t: t.replace('".[serving]"', '".[serving,training]"', 1),
    "api installs torch": lambda t: t.replace("pip uninstall -y simclr-embed", "pip install torch==2.14.1", 1),
    "worker installs both runtimes": lambda t: t.replace("WORKER_EXTRAS=serving-gpu,training", "WORKER_EXTRAS=serving,serving-gpu,training"),
    "worker without training": lambda t: t.replace("WORKER_EXTRAS=serving-gpu,training", "WORKER_EXTRAS=serving-gpu"),
    "unpinned python": lambda t: re.sub(r"python:3\.11\.\d+-slim-bookworm", "python:latest", t),
    "untagged cuda": lambda t: re.sub(r"nvidia/cuda:\S+", "nvidia/cuda", t, count=1),
    "no api stage": lambda t: t.replace(" AS api\n", " AS web\n"),
    "no healthcheck": lambda t: re.sub(r"HEALTHCHECK [^\n]*\\\n[^\n]*\n", "", t, count=1),
    "curl healthcheck": lambda t: t.replace('CMD ["python", "-c", "import os, urllib', 'CMD ["curl", "-f", "http://x", "import os, urllib', 1),
    "code before deps": lambda t: t.replace("COPY pyproject.toml ./\n", "COPY pyproject.toml ./\nCOPY service ./service\n", 1),
    "code installed with deps": lambda t: t.replace("pip install --no-build-isolation --no-deps .", "pip install --no-build-isolation .", 1),
    "whole context copied": lambda t: t.replace("COPY service ./service", "COPY . .", 1),
    "unprefixed app env": lambda t: t.replace("SIMCLR_EMBED_HOST=0.0.0.0", "HOST=0.0.0.0", 1),
    "no expose": lambda t: t.replace("EXPOSE 8000\n", ""),
}  # fmt: skip


def _rsub(text: str, pattern: str, repl: str) -> str:
    """Replace the last match only."""
    matches = list(re.finditer(pattern, text))
    assert matches, pattern
    m = matches[-1]
    return text[: m.start()] + repl + text[m.end() :]


@pytest.mark.parametrize("breakage", sorted(DOCKERFILE_BREAKAGES))
def test_dockerfile_checks_catch(breakage: str) -> None:
    original = read(DOCKERFILE)
    broken = DOCKERFILE_BREAKAGES[breakage](original)
    assert broken != original, f"the breakage {breakage!r} no longer applies to the Dockerfile"
    assert dockerfile_problems(broken), breakage


def _edit_compose(edit: Callable[[dict[str, Any]], None]) -> Callable[[str], str]:
    def apply(raw: str) -> str:
        data = load_yaml(raw)
        edit(data)
        return yaml.safe_dump(data, sort_keys=False)

    return apply


COMPOSE_BREAKAGES: dict[str, Callable[[str], str]] = {
    "typo in a key (schema)": lambda t: t.replace("    healthcheck:\n      test: [\"CMD-SHELL\"", "    helthcheck:\n      test: [\"CMD-SHELL\"", 1),
    "unprefixed variable": lambda t: t.replace("${SIMCLR_EMBED_PUBLISH_PORT:-8000}", "${PORT:-8000}", 1),
    "hard-coded api keys": lambda t: re.sub(r"\$\{SIMCLR_EMBED_API_KEYS:\?[^}]*\}", "changeme", t),
    "worker without gpus": _edit_compose(lambda d: d["services"]["worker"].pop("deploy")),
    "gpu count 1": _edit_compose(lambda d: d["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0].update(count=1)),
    "small shm": lambda t: t.replace("${SIMCLR_EMBED_WORKER_SHM_SIZE:-8gb}", "${SIMCLR_EMBED_WORKER_SHM_SIZE:-64mb}", 1),
    "datasets writable": lambda t: t.replace(":/datasets:ro", ":/datasets"),
    "api starts before redis is healthy": _edit_compose(lambda d: d["services"]["api"].update(depends_on=["redis"])),
    "liveness instead of readiness": lambda t: t.replace("/readyz", "/healthz"),
    "redis without aof": lambda t: t.replace('      - --appendonly\n      - "yes"\n', "", 1),
    "redis unpinned": lambda t: re.sub(r"image: redis:\S+", "image: redis:latest", t, count=1),
    "flower always on": _edit_compose(lambda d: d["services"]["flower"].pop("profiles")),
    "undeclared volume": _edit_compose(lambda d: d["volumes"].pop("simclr-data")),
    "separate data volumes": lambda t: t.replace("      - simclr-data:/data\n", "      - other-data:/data\n", 1).replace("volumes:\n  # Model", "volumes:\n  other-data:\n  # Model", 1),
    "unprefixed app variable": _edit_compose(lambda d: d["services"]["worker"]["environment"].update(DATA_DIR="/data")),
    "no worker": _edit_compose(lambda d: d["services"].pop("worker")),
}  # fmt: skip


@pytest.mark.parametrize("breakage", sorted(COMPOSE_BREAKAGES))
def test_compose_checks_catch(breakage: str) -> None:
    original = read(COMPOSE)
    broken = COMPOSE_BREAKAGES[breakage](original)
    assert broken != original, f"the breakage {breakage!r} no longer applies to docker-compose.yml"
    assert main_compose_problems(broken), breakage


def test_worker_node_checks_catch() -> None:
    original = read(DEPLOY / "compose.worker-node.yml")
    assert worker_node_problems(original.replace('"${SIMCLR_EMBED_WORKER_QUEUES:-train}"', '"train,index"'))
    assert worker_node_problems(original.replace("type: nfs", "type: none"))
    assert worker_node_problems(original.replace("driver: nvidia", "driver: amd"))


def test_dockerignore_checks_catch() -> None:
    original = read(DOCKERIGNORE)
    assert dockerignore_problems(re.sub(r"^.*env.*$", "", original, flags=re.MULTILINE))
    assert dockerignore_problems(original + "\nservice\n")
    assert dockerignore_problems(original.replace("!deploy/torchrun-multinode.sh", ""))
