"""terraform/: checkov's policies, and the properties this project insists on.

Terraform itself cannot run here (its providers come from a registry out of reach),
so the configuration is parsed with python-hcl2 and checked by checkov offline.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from deploy_support import ROOT, TERRAFORM_DIR, Terraform, TerraformNames, run, tool_env, tool_venv

REQUIRED_SECRETS = {"LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "REDIS_PASSWORD", "ADMIN_TOKEN"}


def checkov(*args: str) -> dict[str, Any]:
    venv = tool_venv("checkov")
    result = run(
        [venv / "bin" / "checkov", *args, "--skip-download", "--output", "json", "--compact"],
        env=tool_env(venv, BC_SKIP_MAPPING="TRUE", CHECKOV_RUN_SCA_PACKAGE_SCAN_V2="false"),
        cwd=ROOT,
        check=False,
        timeout=180,
    )
    # Exit 1 means failed checks; the report says which. Anything else is a crash.
    assert result.returncode in (0, 1), f"checkov crashed:\n{result.stdout}\n{result.stderr}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    for one in reports:
        assert one["summary"]["parsing_errors"] == 0, one["summary"]
    return {
        "passed": [c for r in reports for c in r["results"].get("passed_checks", [])],
        "failed": [c for r in reports for c in r["results"].get("failed_checks", [])],
        "skipped": [c for r in reports for c in r["results"].get("skipped_checks", [])],
    }


def describe(checks: list[dict[str, Any]]) -> str:
    return "\n".join(f"{c['check_id']} {c['resource']} {c['file_path']}: {c['check_name']}" for c in checks)


@pytest.fixture(scope="module")
def checkov_terraform() -> dict[str, Any]:
    return checkov("-d", str(TERRAFORM_DIR), "--framework", "terraform")


def test_checkov_finds_no_failed_check_in_terraform(checkov_terraform: dict[str, Any]) -> None:
    assert not checkov_terraform["failed"], describe(checkov_terraform["failed"])
    # The scan really covered the configuration (a wrong path passes trivially).
    resources = {check["resource"] for check in checkov_terraform["passed"]}
    assert {"aws_instance.appliance", "aws_security_group.appliance", "aws_kms_key.main"} <= resources


def test_every_checkov_skip_is_justified_inline(checkov_terraform: dict[str, Any]) -> None:
    skips = re.findall(
        r"#\s*checkov:skip=([A-Z0-9_]+)(?::(.*))?", "".join(p.read_text() for p in TERRAFORM_DIR.glob("*.tf"))
    )
    assert skips, "no skip found: this test would pass trivially"
    for check_id, reason in skips:
        assert reason and len(reason.strip()) >= 20, f"{check_id} is skipped without a justification"
    assert {c["check_id"] for c in checkov_terraform["skipped"]} == {check_id for check_id, _ in skips}


def test_checkov_finds_no_failed_check_in_the_dockerfile() -> None:
    report = checkov("-f", str(ROOT / "Dockerfile"), "--framework", "dockerfile")
    assert not report["failed"], describe(report["failed"])
    assert {"CKV_DOCKER_2", "CKV_DOCKER_3"} <= {c["check_id"] for c in report["passed"]}  # HEALTHCHECK, USER


def test_every_variable_has_a_type_and_a_description(terraform: Terraform) -> None:
    assert len(terraform.variables) >= 10
    for name, variable in terraform.variables.items():
        assert variable.get("type"), f"variable {name} has no type"
        assert len(variable.get("description", "")) > 10, f"variable {name} has no description"


def test_every_output_has_a_description(terraform: Terraform) -> None:
    assert {"public_ip", "public_dns", "instance_id", "ansible_inventory_filters"} <= set(terraform.outputs)
    for name, output in terraform.outputs.items():
        assert len(output.get("description", "")) > 10, f"output {name} has no description"


def test_provider_versions_are_pinned(terraform: Terraform) -> None:
    (block,) = terraform.terraform
    assert block["required_version"]
    (providers,) = block["required_providers"]
    for name, spec in providers.items():
        assert re.match(r"^(~>|=)\s*\d+\.\d+", spec["version"]), f"provider {name} is not pinned: {spec['version']}"


def test_the_instance_requires_imdsv2_and_an_encrypted_root_volume(terraform: Terraform) -> None:
    instance = terraform.resources["aws_instance"]["appliance"]
    (metadata,) = instance["metadata_options"]
    assert metadata["http_tokens"] == "required"
    assert metadata["http_endpoint"] == "enabled"
    assert metadata["http_put_response_hop_limit"] == 1
    (root,) = instance["root_block_device"]
    assert root["encrypted"] is True
    assert root["kms_key_id"] == "${aws_kms_key.main.arn}"
    assert instance["iam_instance_profile"] == "${aws_iam_instance_profile.appliance.name}"
    eip = terraform.resources["aws_eip"]["appliance"]
    assert eip["instance"] == "${aws_instance.appliance.id}"


def _cidrs(rule: dict[str, Any]) -> list[str]:
    value = rule.get("cidr_blocks") or rule.get("cidr_ipv4") or []
    return value if isinstance(value, list) else [value]


def test_ssh_is_never_open_to_the_world(terraform: Terraform) -> None:
    ssh_rules = []
    for group in terraform.resources["aws_security_group"].values():
        for rule in group.get("ingress", []):
            if rule["from_port"] <= 22 <= rule["to_port"]:
                ssh_rules.append(rule)
    for rule in terraform.resources.get("aws_vpc_security_group_ingress_rule", {}).values():
        if rule["from_port"] <= 22 <= rule["to_port"]:
            ssh_rules.append(rule)
    assert ssh_rules, "no SSH rule found: this test would pass trivially"
    for rule in ssh_rules:
        cidrs = _cidrs(rule)
        assert not any(c in ("0.0.0.0/0", "::/0") for c in cidrs), rule
        # Only from the validated operator list.
        assert all("var.ssh_allowed_cidrs" in c or "each.value" in c for c in cidrs), rule
    variable = terraform.variables["ssh_allowed_cidrs"]
    assert variable["default"] == []
    assert any("0.0.0.0/0" in v["condition"] for v in variable["validation"]), "the validation must refuse /0"
    # Every other world-open ingress is HTTP or HTTPS.
    for group in terraform.resources["aws_security_group"].values():
        for rule in group.get("ingress", []):
            if "0.0.0.0/0" in _cidrs(rule):
                assert (rule["from_port"], rule["to_port"]) in {(80, 80), (443, 443)}, rule


def test_the_instance_policy_is_scoped_to_the_parameter_prefix_and_the_key(terraform: Terraform) -> None:
    statements = terraform.data["aws_iam_policy_document"]["appliance"]["statement"]
    actions = {action for statement in statements for action in statement["actions"]}
    assert actions == {"ssm:GetParameter", "ssm:GetParameters", "ssm:GetParametersByPath", "kms:Decrypt"}
    prefix = terraform.variable_default("ssm_parameter_prefix")
    assert prefix == "/WebSocket/prod/"
    for statement in statements:
        assert statement["effect"] == "Allow"
        resources = statement["resources"]
        assert "*" not in resources
        if any(a.startswith("ssm:") for a in statement["actions"]):
            for resource in resources:
                resolved = terraform.resolve(resource)
                assert re.fullmatch(
                    r"arn:\$\{[^}]+\}:ssm:[a-z0-9-]+:\$\{[^}]+\}:parameter/WebSocket/prod(/\*)?", resolved
                ), resolved
        else:
            assert resources == ["${aws_kms_key.main.arn}"]
            (condition,) = statement["condition"]
            assert condition["variable"] == "kms:ViaService"
    # The role has that policy and no other (no managed policies attached).
    assert set(terraform.resources["aws_iam_role_policy"]) == {"appliance", "flow_logs"}
    assert terraform.resources["aws_iam_role_policy"]["appliance"]["role"] == "${aws_iam_role.appliance.id}"
    assert "aws_iam_role_policy_attachment" not in terraform.resources


def test_secrets_are_kms_encrypted_securestrings_that_terraform_never_overwrites(
    terraform: Terraform, terraform_names: TerraformNames
) -> None:
    parameter = terraform.resources["aws_ssm_parameter"]["secret"]
    assert parameter["type"] == "SecureString"
    assert parameter["key_id"] == "${aws_kms_key.main.arn}"
    (lifecycle,) = parameter["lifecycle"]
    assert lifecycle["ignore_changes"] == ["${value}"] or lifecycle["ignore_changes"] == ["value"]
    names = {name.removeprefix("/WebSocket/prod/") for name in terraform_names.parameter_names}
    assert names >= REQUIRED_SECRETS
    assert all(name.startswith("/WebSocket/prod/") for name in terraform_names.parameter_names)
    assert terraform.resources["aws_kms_key"]["main"]["enable_key_rotation"] is True


def test_tags_are_merged_in_one_place_and_name_the_host(terraform_names: TerraformNames, terraform: Terraform) -> None:
    assert terraform_names.tags == {
        "Project": "websocket-bridge",
        "Environment": "prod",
        "Role": "wsbridge-appliance",
        "ManagedBy": "terraform",
    }
    assert terraform_names.instance_name == "websocket-bridge-prod-appliance"
    (provider,) = [p["aws"] for p in _providers(terraform)]
    (default_tags,) = provider["default_tags"]
    assert default_tags["tags"] == "${local.common_tags}"


def _providers(terraform: Terraform) -> list[dict[str, Any]]:
    import hcl2

    with (TERRAFORM_DIR / "versions.tf").open() as handle:
        parsed = hcl2.load(
            handle,
            serialization_options=hcl2.SerializationOptions(
                with_comments=False, explicit_blocks=False, strip_string_quotes=True
            ),
        )
    return parsed["provider"]
