"""ansible/: syntax, ansible-lint's production profile, and the conventions of the roles."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import ANSIBLE_DIR, run, tool_env, tool_venv

ROLES = ("base", "docker", "appliance")
ARGUMENT_TYPES = {"bool": bool, "int": int, "str": str, "path": str, "list": list, "dict": dict}


def ansible_env(tmp_path: Path) -> dict[str, str]:
    venv = tool_venv("ansible")
    # ANSIBLE_HOME keeps the run's temporary and cache files out of the user's home.
    return tool_env(venv, ANSIBLE_HOME=str(tmp_path / "ansible-home"), ANSIBLE_NOCOLOR="1", NO_COLOR="1")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def role_tasks(role: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for name in ("tasks", "handlers"):
        for path in sorted((ANSIBLE_DIR / "roles" / role / name).glob("*.yml")):
            tasks.extend(load(path) or [])
    return tasks


@pytest.mark.parametrize("inventory", ["inventory/static.example.yml"])
def test_the_playbook_passes_the_syntax_check(inventory: str, tmp_path: Path) -> None:
    result = run(
        ["ansible-playbook", "-i", inventory, "--syntax-check", "site.yml"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
    )
    assert "playbook: site.yml" in result.stdout


def test_ansible_lint_passes_with_the_production_profile(tmp_path: Path) -> None:
    config = load(ANSIBLE_DIR / ".ansible-lint")
    assert config["profile"] == "production"
    assert not config.get("skip_list") and not config.get("warn_list"), "skip rules inline, with a reason"
    result = run(
        ["ansible-lint", "--offline", "-c", ".ansible-lint", "--nocolor"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        check=False,
        timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output
    processed = re.search(r"in (\d+) files processed", output)
    assert processed and int(processed.group(1)) >= 20, output


def test_every_inline_lint_skip_gives_a_reason() -> None:
    for path in ANSIBLE_DIR.rglob("*.yml"):
        for line in path.read_text().splitlines():
            if "# noqa" in line:
                assert re.search(r"# noqa: [\w\[\]-]+ - .{15,}", line), f"{path}: unexplained skip: {line.strip()}"


@pytest.mark.parametrize("role", ROLES)
def test_every_default_is_prefixed_typed_and_documented(role: str) -> None:
    defaults = load(ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml") or {}
    spec = load(ANSIBLE_DIR / "roles" / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]
    options = spec["options"]
    assert defaults, f"{role} has no defaults"
    for name, value in defaults.items():
        assert name.startswith(f"{role}_"), f"{name} lacks the {role}_ prefix"
        assert name in options, f"{name} is missing from meta/argument_specs.yml"
        option = options[name]
        assert len(option.get("description", "")) > 10, f"{name} has no description"
        expected = ARGUMENT_TYPES[option["type"]]
        if not (isinstance(value, str) and "{{" in value):
            assert isinstance(value, expected), f"{name}: default {value!r} is not a {option['type']}"
    # Required inputs have no default; every other documented option has one.
    for name, option in options.items():
        assert option.get("required", False) == (name not in defaults), name
    # Each default is commented where it is set: a comment heads its paragraph.
    text = (ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml").read_text().splitlines()
    for index, line in enumerate(text):
        if re.match(rf"^{role}_\w+:", line):
            paragraph_start = max((i for i in range(index) if not text[i].strip()), default=-1) + 1
            assert any(text[i].startswith("#") for i in range(paragraph_start, index)), (
                f"{line.split(':')[0]} has no comment above it"
            )


@pytest.mark.parametrize("role", ROLES)
def test_task_names_are_full_sentences_and_handlers_exist(role: str) -> None:
    tasks = role_tasks(role)
    handlers = {task["name"] for task in load(ANSIBLE_DIR / "roles" / role / "handlers" / "main.yml") or []}
    for task in tasks:
        name = task.get("name", "")
        assert re.match(r"^[A-Z][^{]*\.$", name), f"{role}: task name is not a sentence: {name!r}"
        for notified in [task["notify"]] if isinstance(task.get("notify"), str) else task.get("notify", []):
            assert notified in handlers, f"{role}: {name!r} notifies a missing handler {notified!r}"


def test_tasks_that_touch_secrets_hide_them_from_the_log() -> None:
    tasks = role_tasks("appliance")
    secret_tasks = [
        task for task in tasks if "appliance_secrets" in yaml.safe_dump(task) or ".env" in yaml.safe_dump(task)
    ]
    assert secret_tasks
    for task in secret_tasks:
        if "ansible.builtin.assert" in task:
            # It reports the names of missing parameters, never their values.
            assert "appliance_secrets.keys()" in yaml.safe_dump(task)
            continue
        assert task.get("no_log") is True, task["name"]
    env_template = (ANSIBLE_DIR / "roles" / "appliance" / "templates" / "env.j2").read_text()
    for name in ("LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "ADMIN_TOKEN", "REDIS_PASSWORD"):
        assert f"{name}={{{{ appliance_secrets['{name}'] }}}}" in env_template


def test_the_inventory_plugin_filters_on_the_tags_terraform_sets(terraform_names) -> None:
    inventory = load(ANSIBLE_DIR / "inventory" / "wsbridge.aws_ec2.yml")
    assert inventory["plugin"] == "amazon.aws.aws_ec2"
    assert inventory["regions"] == [terraform_names.region]
    tag_filters = {
        key.removeprefix("tag:"): value for key, value in inventory["filters"].items() if key.startswith("tag:")
    }
    assert tag_filters and tag_filters.items() <= terraform_names.tags.items()
    assert inventory["filters"]["instance-state-name"] == "running"
    group_vars = load(ANSIBLE_DIR / "group_vars" / "wsbridge" / "main.yml")
    assert group_vars["appliance_ssm_parameter_prefix"] == terraform_names.parameter_prefix
    assert group_vars["appliance_aws_region"] == terraform_names.region


def test_the_static_example_inventory_defines_the_wsbridge_group(tmp_path: Path) -> None:
    import json

    result = run(
        ["ansible-inventory", "-i", "inventory/static.example.yml", "--list"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
    )
    listed = json.loads(result.stdout)
    assert listed["wsbridge"]["hosts"] == ["bridge.example.com"]


def test_the_role_requires_exactly_secrets_that_terraform_creates(terraform_names) -> None:
    defaults = load(ANSIBLE_DIR / "roles" / "appliance" / "defaults" / "main.yml")
    created = {name.removeprefix(terraform_names.parameter_prefix) for name in terraform_names.parameter_names}
    assert set(defaults["appliance_required_secrets"]) <= created
    # Every secret the template writes is one the role insists on.
    template = (ANSIBLE_DIR / "roles" / "appliance" / "templates" / "env.j2").read_text()
    used = set(re.findall(r"appliance_secrets\['(\w+)'\]", template))
    assert used == set(defaults["appliance_required_secrets"])
