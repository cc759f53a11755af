"""terraform/: checkov's policies, and the properties this project insists on.

Terraform itself cannot run here (its providers come from a registry out of reach),
so the configuration is parsed with python-hcl2 and checked by checkov offline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_support import ROOT, TERRAFORM_DIR, Terraform, TerraformNames, ansible_inventory, run, tool_env, tool_venv

# Values an operator would put in terraform.tfvars (none at an example domain).
REAL_INPUTS = {
    "domain_name": "bridge.wsbridge-ops.net",
    "acme_email": "ops@wsbridge-ops.net",
    "alert_emails": ["oncall@wsbridge-ops.net"],
    "ssh_allowed_cidrs": ["198.51.100.7/32"],
    "admin_allowed_cidrs": ["198.51.100.0/24"],
    "ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorKeyOperatorKeyOperatorKeyOperator op@laptop",
}
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


@pytest.fixture(scope="session")
def checkov_terraform() -> dict[str, Any]:
    # checkov is the slow one: once per session (the mutation tests reuse the function).
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
    assert {"public_ip", "public_dns", "instance_id", "ansible_inventory"} <= set(terraform.outputs)
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
    # Two hops: the appliance's container reaches the instance profile (TOKEN_STORE=ssm)
    # under IMDSv2; one more would let a container behind another NAT in too.
    assert metadata["http_put_response_hop_limit"] == 2
    (root,) = instance["root_block_device"]
    assert root["encrypted"] is True
    assert root["kms_key_id"] == "${aws_kms_key.main.arn}"
    assert instance["iam_instance_profile"] == "${aws_iam_instance_profile.appliance.name}"
    eip = terraform.resources["aws_eip"]["appliance"]
    assert eip["instance"] == "${aws_instance.appliance[0].id}"


def test_security_group_rules_are_standalone_resources_only(terraform: Terraform) -> None:
    # Inline ingress/egress blocks next to aws_vpc_security_group_*_rule resources make
    # every second apply delete the standalone rules (SSH among them).
    for name, group in terraform.resources["aws_security_group"].items():
        assert "ingress" not in group and "egress" not in group, f"aws_security_group.{name} has inline rules"
    assert "aws_security_group_rule" not in terraform.resources, "use aws_vpc_security_group_*_rule only"
    for kind in ("aws_vpc_security_group_ingress_rule", "aws_vpc_security_group_egress_rule"):
        assert terraform.resources[kind], kind
        for name, rule in terraform.resources[kind].items():
            # ElastiCache's group (host_count >= 2) is the only other one.
            groups = {"${aws_security_group.appliance.id}", "${aws_security_group.redis[0].id}"}
            assert rule["security_group_id"] in groups, f"{kind}.{name}"


def _rules(terraform: Terraform, kind: str) -> dict[str, dict[str, Any]]:
    return terraform.resources.get(kind, {})


def test_ssh_is_required_for_ansible_and_never_open_to_the_world(terraform: Terraform) -> None:
    ingress = _rules(terraform, "aws_vpc_security_group_ingress_rule")
    ssh = {
        name: rule
        for name, rule in ingress.items()
        if isinstance(rule["from_port"], int) and rule["from_port"] <= 22 <= rule["to_port"]
    }
    assert set(ssh) == {"ssh"}, ssh
    assert ssh["ssh"]["for_each"] == "${toset(var.ssh_allowed_cidrs)}"
    assert ssh["ssh"]["cidr_ipv4"] == "${each.value}"
    # Ansible provisions over SSH (Session Manager is a shell only, docs/deploy.md): the
    # networks and the key are required inputs, and /0 is refused.
    assert "default" not in terraform.variables["ssh_allowed_cidrs"]
    assert "default" not in terraform.variables["ssh_public_key"]
    assert terraform.refusals("ssh_allowed_cidrs", [])
    assert terraform.refusals("ssh_allowed_cidrs", ["0.0.0.0/0"])
    assert terraform.refusals("ssh_allowed_cidrs", ["203.0.113.7/32", "10.0.0.0/0"])
    assert not terraform.refusals("ssh_allowed_cidrs", ["203.0.113.7/32"])
    assert terraform.refusals("ssh_public_key", "AAAA not a key")
    assert terraform.resources["aws_key_pair"]["operator"]["public_key"] == "${var.ssh_public_key}"
    assert terraform.resources["aws_instance"]["appliance"]["key_name"] == "${aws_key_pair.operator.key_name}"
    # A shell when SSH is locked out: Session Manager stays.
    attachment = terraform.resources["aws_iam_role_policy_attachment"]["session_manager"]
    assert attachment["policy_arn"].endswith(":iam::aws:policy/AmazonSSMManagedInstanceCore")
    assert attachment["role"] == "${aws_iam_role.appliance.name}"
    # World-open ingress is 80 and 443 only; 8443 follows admin_allowed_cidrs.
    for name, rule in ingress.items():
        if rule.get("cidr_ipv4") == "0.0.0.0/0":
            assert name == "public", name
    public = ingress["public"]["for_each"]
    assert sorted(public.values()) == [80, 443]
    assert ingress["admin"]["from_port"] == ingress["admin"]["to_port"] == 8443
    assert ingress["admin"]["for_each"] == "${toset(var.admin_allowed_cidrs)}"


def _statements(terraform: Terraform) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    document = terraform.data["aws_iam_policy_document"]["appliance"]
    static = document["statement"]
    dynamic = [block["statement"]["content"][0] for block in document.get("dynamic", [])]
    for block in document.get("dynamic", []):
        assert block["statement"]["for_each"] in (
            "${var.token_rotation_from_host ? [1] : []}",
            "${var.container_logs_to_cloudwatch ? [1] : []}",
        )
    return static, dynamic


def test_the_instance_policy_reads_only_below_the_prefix_and_decrypts_only_through_ssm(terraform: Terraform) -> None:
    static, _ = _statements(terraform)
    actions = {action for statement in static for action in statement["actions"]}
    assert actions == {
        "ssm:GetParameter",
        "ssm:GetParameters",
        "ssm:GetParametersByPath",
        "kms:Decrypt",
        "sns:Publish",
        "kms:GenerateDataKey",
    }
    assert terraform.variable_default("ssm_parameter_prefix") == "/WebSocket/prod/"
    base = terraform.resolve(terraform.locals["ssm_arn_base"])
    assert re.fullmatch(r"arn:\$\{[^}]+\}:ssm:eu-central-1:\$\{[^}]+\}:parameter/WebSocket/prod", base), base
    for statement in static:
        assert statement["effect"] == "Allow"
        resources = statement["resources"]
        assert "*" not in resources
        if any(a.startswith("ssm:") for a in statement["actions"]):
            # The path itself (GetParametersByPath) and everything below it: nothing else.
            assert resources == ["${local.ssm_arn_base}", "${local.ssm_arn_base}/*"]
        elif statement["actions"] == ["sns:Publish"]:
            # Alertmanager's sns_configs: the alerts topic, nothing else.
            assert resources == ["${aws_sns_topic.alerts.arn}"]
        elif statement["sid"] == "EncryptAlertsThroughSns":
            _assert_key_through_ssm(statement, service="sns")
        else:
            _assert_key_through_ssm(statement)
    # The role has that policy, Session Manager's, and no other.
    # discover_hosts: ec2:DescribeInstances for Prometheus, only with host_count >= 2.
    assert set(terraform.resources["aws_iam_role_policy"]) == {"appliance", "flow_logs", "discover_hosts"}
    assert terraform.resources["aws_iam_role_policy"]["appliance"]["role"] == "${aws_iam_role.appliance.id}"
    assert {name: a["role"] for name, a in terraform.resources["aws_iam_role_policy_attachment"].items()} == {
        "session_manager": "${aws_iam_role.appliance.name}",
        "dlm": "${aws_iam_role.dlm.name}",
    }


def _assert_key_through_ssm(statement: dict[str, Any], service: str = "ssm") -> None:
    assert statement["resources"] == ["${aws_kms_key.main.arn}"], statement
    (condition,) = statement["condition"]
    assert condition["test"] == "StringEquals"
    assert condition["variable"] == "kms:ViaService"
    assert condition["values"] == [service + ".${var.aws_region}.amazonaws.com"]


def test_rotation_from_the_host_may_write_only_the_token_parameters(
    terraform: Terraform, terraform_names: TerraformNames
) -> None:
    _, dynamic = _statements(terraform)
    assert terraform.variables["token_rotation_from_host"]["default"] is False
    by_sid = {statement["sid"]: statement for statement in dynamic}
    rotate = by_sid["RotateTokenParameters"]
    assert set(rotate["actions"]) == {
        "ssm:PutParameter",
        "ssm:LabelParameterVersion",
        "ssm:UnlabelParameterVersion",  # the token service moves labels off the oldest of 100 versions
        "ssm:GetParameterHistory",
    }
    assert rotate["resources"] == "${local.token_parameter_arns}"
    arns = terraform.locals["token_parameter_arns"]
    tokens = terraform.string_list("token_names")
    assert tokens == ["LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "ADMIN_TOKEN"]
    assert "for name in local.token_names" in arns and "${local.ssm_arn_base}/${name}" in arns
    assert "${local.ssm_arn_base}/client_tokens/*" in arns
    # The tokens are parameters Terraform creates; Redis's password and the others are not
    # writable from the host.
    created = {name.removeprefix(terraform_names.parameter_prefix) for name in terraform_names.parameter_names}
    assert set(tokens) <= created
    assert not {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "MONITORING_BASIC_AUTH"} & set(tokens)
    encrypt = by_sid["EncryptTokenParametersThroughSsm"]
    assert set(encrypt["actions"]) == {"kms:Encrypt", "kms:GenerateDataKey"}
    _assert_key_through_ssm(encrypt)
    assert set(by_sid) == {"RotateTokenParameters", "EncryptTokenParametersThroughSsm", "WriteContainerLogs"}
    logs = by_sid["WriteContainerLogs"]
    assert set(logs["actions"]) == {"logs:CreateLogStream", "logs:PutLogEvents"}
    assert logs["resources"] == ["${aws_cloudwatch_log_group.containers[0].arn}:*"]


def test_the_flow_log_role_has_the_permissions_aws_documents(terraform: Terraform) -> None:
    (statement,) = terraform.data["aws_iam_policy_document"]["flow_logs_write"]["statement"]
    assert set(statement["actions"]) == {
        "logs:CreateLogGroup",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "logs:DescribeLogGroups",
        "logs:DescribeLogStreams",
    }
    for resource in statement["resources"]:
        assert resource.startswith("${aws_cloudwatch_log_group.flow_logs.arn}"), resource
    (assume,) = terraform.data["aws_iam_policy_document"]["flow_logs_assume"]["statement"]
    assert assume["principals"][0]["identifiers"] == ["vpc-flow-logs.amazonaws.com"]


def test_secrets_are_written_once_without_entering_the_state(
    terraform: Terraform, terraform_names: TerraformNames
) -> None:
    parameter = terraform.resources["aws_ssm_parameter"]["secret"]
    assert parameter["type"] == "SecureString"
    assert parameter["key_id"] == "${aws_kms_key.main.arn}"
    # Write-only: the value is neither in the plan nor in the state.
    assert "value" not in parameter and "insecure_value" not in parameter
    assert "ephemeral.random_password." in parameter["value_wo"]
    assert parameter["value_wo_version"] == "${var.secrets_version}"
    assert "random_password" not in terraform.resources, "a random_password resource keeps its result in the state"
    assert set(terraform.ephemeral["random_password"]) == {"secret", "monitoring"}
    names = {name.removeprefix("/WebSocket/prod/") for name in terraform_names.parameter_names}
    assert names >= REQUIRED_SECRETS
    assert all(name.startswith("/WebSocket/prod/") for name in terraform_names.parameter_names)
    assert terraform.resources["aws_kms_key"]["main"]["enable_key_rotation"] is True


def test_the_state_lives_in_s3_with_a_lockfile(terraform: Terraform) -> None:
    (block,) = terraform.terraform
    (backend,) = block["backend"]
    assert set(backend) == {"s3"}
    assert backend["s3"]["use_lockfile"] is True
    assert backend["s3"]["encrypt"] is True
    example = (TERRAFORM_DIR / "backend.hcl.example").read_text()
    assert re.search(r"^bucket\s*=", example, re.MULTILINE) and re.search(r"^key\s*=", example, re.MULTILINE)
    assert "terraform/backend.hcl" in (ROOT / ".gitignore").read_text()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


# Arguments the pinned provider majors no longer have: a configuration using one fails
# at `terraform plan` on a real account.
REMOVED_ARGUMENTS = {
    "aws": {
        6: {
            "aws_eip": {"vpc"},
            "aws_flow_log": {"log_group_name"},
            "aws_instance": {"cpu_core_count", "cpu_threads_per_core"},
            "aws_ssm_parameter": {"overwrite"},
        }
    }
}
# Features and the versions that brought them: (Terraform, provider) minimums.
FEATURE_MINIMUMS = {
    "ephemeral resources": ("1.10.0", "random", "3.7.0"),
    "write-only arguments": ("1.11.0", "aws", "5.90.0"),
    "S3 lockfile": ("1.10.0", None, None),
}


def _minimum(constraint: str) -> tuple[int, ...]:
    match = re.search(r"(?:~>|>=|=)\s*(\d+(?:\.\d+)*)", constraint)
    assert match, constraint
    return _version(match.group(1) + ".0" * (2 - match.group(1).count(".")))


def test_provider_version_constraints_are_honoured(terraform: Terraform) -> None:
    (block,) = terraform.terraform
    (providers,) = block["required_providers"]
    for provider, majors in REMOVED_ARGUMENTS.items():
        major = _minimum(providers[provider]["version"])[0]
        for kind, removed in majors.get(major, {}).items():
            for name, resource in terraform.resources.get(kind, {}).items():
                used = removed & set(resource)
                assert not used, f"{kind}.{name} uses {used}, removed in {provider} provider {major}.x"
    assert terraform.resources["aws_eip"]["appliance"]["domain"] == "vpc"
    terraform_minimum = _minimum(block["required_version"])
    uses = {
        "ephemeral resources": bool(terraform.ephemeral),
        "write-only arguments": any(
            key.endswith("_wo") for kind in terraform.resources.values() for r in kind.values() for key in r
        ),
        "S3 lockfile": block["backend"][0]["s3"].get("use_lockfile") is True,
    }
    assert any(uses.values()), "nothing to check: the test would pass trivially"
    for feature, used in uses.items():
        if not used:
            continue
        needed_terraform, provider, needed_provider = FEATURE_MINIMUMS[feature]
        assert terraform_minimum >= _version(needed_terraform), f"{feature} need Terraform >= {needed_terraform}"
        if provider:
            assert _minimum(providers[provider]["version"]) >= _version(needed_provider), (
                f"{feature} need {provider} >= {needed_provider}"
            )


REFERENCE = re.compile(
    r"(?<![\w.])(?:"
    r"var\.(?P<var>\w+)|local\.(?P<local>\w+)|data\.(?P<data>\w+\.\w+)|ephemeral\.(?P<ephemeral>\w+\.\w+)"
    r"|(?P<resource>(?:aws|random)_\w+\.\w+)"
    r")"
)


def references(node: Any) -> Iterator[tuple[str, str]]:
    text = json.dumps(node)
    for match in REFERENCE.finditer(text):
        kind = match.lastgroup
        assert kind
        yield kind, match.group(kind)


def test_every_reference_resolves_to_something_declared(terraform: Terraform) -> None:
    declared = {
        "var": set(terraform.variables),
        "local": set(terraform.locals),
        "data": {f"{kind}.{name}" for kind, named in terraform.data.items() for name in named},
        "ephemeral": {f"{kind}.{name}" for kind, named in terraform.ephemeral.items() for name in named},
        "resource": {f"{kind}.{name}" for kind, named in terraform.resources.items() for name in named},
    }
    blocks = [
        terraform.resources,
        terraform.data,
        terraform.locals,
        terraform.outputs,
        terraform.ephemeral,
        terraform.providers,
        {name: variable.get("validation") for name, variable in terraform.variables.items()},
    ]
    found = 0
    for block in blocks:
        for kind, name in references(block):
            found += 1
            assert name in declared[kind], f"{kind} {name} is referenced but not declared"
    assert found > 50, "too few references found: the pattern is wrong"
    # And nothing declared is left unused (a leftover usually means a broken rename).
    used = {(kind, name) for block in blocks for kind, name in references(block)}
    for name in terraform.variables:
        assert ("var", name) in used, f"variable {name} is never used"
    for name in terraform.locals:
        assert ("local", name) in used, f"local {name} is never used"


def test_tags_are_merged_in_one_place_and_name_the_host(terraform_names: TerraformNames, terraform: Terraform) -> None:
    assert terraform_names.tags == {
        "Project": "websocket-bridge",
        "Environment": "prod",
        "Role": "wsbridge-appliance",
        "ManagedBy": "terraform",
    }
    assert terraform_names.instance_name == "websocket-bridge-prod-appliance"
    (provider,) = [p["aws"] for p in terraform.providers if "alias" not in p["aws"]]
    (default_tags,) = provider["default_tags"]
    assert default_tags["tags"] == "${local.common_tags}"


def test_the_ansible_inventory_output_uses_the_same_tags_region_and_prefix(
    terraform: Terraform, terraform_names: TerraformNames
) -> None:
    inventory = ansible_inventory(terraform.with_values(**REAL_INPUTS))
    assert inventory["plugin"] == "amazon.aws.aws_ec2"
    assert inventory["regions"] == [terraform_names.region]
    tag_filters = {key.removeprefix("tag:"): v for key, v in inventory["filters"].items() if key.startswith("tag:")}
    assert tag_filters.items() <= terraform_names.tags.items() and len(tag_filters) == 3
    assert inventory["groups"]["wsbridge"] == f"tags.Role == '{terraform_names.tags['Role']}'"
    compose = inventory["compose"]
    assert compose["appliance_aws_region"] == f"'{terraform_names.region}'"
    assert compose["appliance_ssm_parameter_prefix"] == f"'{terraform_names.parameter_prefix}'"
    assert compose["appliance_domain"] == f"'{REAL_INPUTS['domain_name']}'"
    # The play's required inputs come from Terraform too: the Let's Encrypt e-mail, the
    # alerts topic, the data volume.
    assert compose["appliance_acme_email"] == f"'{REAL_INPUTS['acme_email']}'"
    assert compose["appliance_alerts_sns_topic_arn"] == "'${aws_sns_topic.alerts.arn}'"
    assert compose["base_data_volume_id"] == "'${join(\"\", aws_ebs_volume.data[*].id)}'"
    assert inventory["strict"] is True


# --- Required inputs, refused when they are examples ----------------------------------------


def test_every_default_passes_its_own_validation(terraform: Terraform) -> None:
    checked = 0
    for name, variable in terraform.variables.items():
        if "default" in variable and variable.get("validation"):
            assert not terraform.refusals(name, variable["default"]), name
            checked += 1
    assert checked >= 10


def test_the_inputs_without_a_safe_default_are_required_and_refuse_example_values(terraform: Terraform) -> None:
    required = {name for name, variable in terraform.variables.items() if "default" not in variable}
    assert required == {
        "domain_name",
        "acme_email",
        "alert_emails",
        "ssh_allowed_cidrs",
        "ssh_public_key",
        "admin_allowed_cidrs",
    }
    for name, value in REAL_INPUTS.items():
        assert not terraform.refusals(name, value), (name, value)
    # Let's Encrypt refuses example domains ("forbidden domain"): so does the validation.
    for email in ("ops@example.com", "OPS@Example.COM", "ops@example.org", "a@bridge.test", "a@x.example"):
        assert terraform.refusals("acme_email", email), email
        assert terraform.refusals("alert_emails", ["oncall@wsbridge-ops.net", email]), email
    for email in ("ops@example-corp.com", "ops@myexample.com"):
        assert not terraform.refusals("acme_email", email), email
    for domain in ("bridge.example.com", "example.net", "bridge.test.example", "x.invalid", "a.localhost"):
        assert terraform.refusals("domain_name", domain), domain
    assert terraform.refusals("acme_email", "not an e-mail")
    assert terraform.refusals("alert_emails", []), "a receiver is required"
    assert terraform.refusals("admin_allowed_cidrs", [])
    # A copy of terraform.tfvars.example that was not edited is refused, with a reason.
    import hcl2

    with (TERRAFORM_DIR / "terraform.tfvars.example").open() as handle:
        example = hcl2.load(handle)
    assert required <= set(example), required - set(example)
    for name in ("domain_name", "acme_email", "alert_emails"):
        assert terraform.refusals(name, example[name]), f"the example's {name} is accepted"


# --- Alerts that reach a person, from inside and outside the host ------------------------------


def test_alerts_go_to_an_encrypted_sns_topic_with_e_mail_subscriptions(terraform: Terraform) -> None:
    topic = terraform.resources["aws_sns_topic"]["alerts"]
    assert topic["kms_master_key_id"] == "${aws_kms_key.main.arn}"
    subscription = terraform.resources["aws_sns_topic_subscription"]["alerts_email"]
    assert subscription["for_each"] == "${toset(var.alert_emails)}"
    assert subscription["topic_arn"] == "${aws_sns_topic.alerts.arn}"
    assert (subscription["protocol"], subscription["endpoint"]) == ("email", "${each.value}")
    assert terraform.outputs["alerts_sns_topic_arn"]["value"] == "${aws_sns_topic.alerts.arn}"
    # CloudWatch alarms may publish to a topic encrypted with the stack's key.
    (kms,) = [terraform.data["aws_iam_policy_document"]["kms"]]
    services = {
        identifier
        for statement in kms["statement"]
        for principal in statement["principals"]
        if principal["type"] == "Service" and "kms:GenerateDataKey*" in statement["actions"]
        for identifier in principal["identifiers"]
    }
    assert "cloudwatch.amazonaws.com" in services
    # Alertmanager reaches SNS's API over HTTPS; no SMTP egress is needed (SNS mails).
    egress = terraform.resources["aws_vpc_security_group_egress_rule"]
    assert egress["web"]["for_each"]["https"] == 443 and egress["web"]["cidr_ipv4"] == "0.0.0.0/0"
    assert not any(port in (25, 465, 587) for rule in egress.values() for port in [rule.get("from_port")])


def test_a_dead_host_and_an_unreachable_endpoint_are_noticed_outside_the_host(terraform: Terraform) -> None:
    alarms = terraform.resources["aws_cloudwatch_metric_alarm"]
    status = alarms["instance_status"]
    assert set(status["for_each"].values()) == {"StatusCheckFailed_Instance", "StatusCheckFailed_System"}
    assert status["namespace"] == "AWS/EC2" and status["metric_name"] == "${each.value}"
    assert "{InstanceId = aws_instance.appliance[0].id}" in status["dimensions"]
    assert status["treat_missing_data"] == "breaching", "a host that stops reporting is down"
    assert status["alarm_actions"] == ["${aws_sns_topic.alerts.arn}"]
    # Route 53's checkers, from outside, at the public name and the WebSocket port.
    check = terraform.resources["aws_route53_health_check"]["wss"]
    assert (check["fqdn"], check["port"]) == ("${var.domain_name}", 443)
    endpoint = alarms["wss_endpoint"]
    assert endpoint["namespace"] == "AWS/Route53" and endpoint["metric_name"] == "HealthCheckStatus"
    assert endpoint["dimensions"] == {"HealthCheckId": "${aws_route53_health_check.wss.id}"}
    assert endpoint["comparison_operator"] == "LessThanThreshold" and endpoint["threshold"] == 1
    # Route 53's metrics exist in us-east-1 only: the alarm and its topic live there.
    (east,) = [p["aws"] for p in terraform.providers if p["aws"].get("alias") == "us_east_1"]
    assert east["region"] == "us-east-1"
    assert endpoint["provider"] == "${aws.us_east_1}"
    assert endpoint["alarm_actions"] == ["${aws_sns_topic.endpoint_alerts.arn}"]
    east_topic = terraform.resources["aws_sns_topic"]["endpoint_alerts"]
    assert east_topic["provider"] == "${aws.us_east_1}"
    east_subscription = terraform.resources["aws_sns_topic_subscription"]["endpoint_email"]
    assert east_subscription["provider"] == "${aws.us_east_1}"
    assert east_subscription["for_each"] == "${toset(var.alert_emails)}"
    assert east_subscription["topic_arn"] == "${aws_sns_topic.endpoint_alerts.arn}"


# --- Data that outlives the host ---------------------------------------------------------------


def test_the_data_volume_outlives_the_instance_and_is_snapshotted_daily(terraform: Terraform) -> None:
    volume = terraform.resources["aws_ebs_volume"]["data"]
    assert volume["encrypted"] is True and volume["kms_key_id"] == "${aws_kms_key.main.arn}"
    assert volume["availability_zone"] == terraform.resources["aws_subnet"]["public"]["availability_zone"]
    assert volume["lifecycle"][0]["prevent_destroy"] is True
    attachment = terraform.resources["aws_volume_attachment"]["data"]
    assert attachment["volume_id"] == "${aws_ebs_volume.data[0].id}"
    assert attachment["instance_id"] == "${aws_instance.appliance[0].id}"
    # Not the root volume: that one goes with the instance.
    assert terraform.resources["aws_instance"]["appliance"]["root_block_device"][0]["delete_on_termination"] is True
    policy = terraform.resources["aws_dlm_lifecycle_policy"]["data"]
    (details,) = policy["policy_details"]
    assert details["resource_types"] == ["VOLUME"]
    assert details["target_tags"] == {"Snapshot": "${local.snapshot_tag}"}
    assert volume["tags"]["Snapshot"] == "${local.snapshot_tag}"
    (schedule,) = details["schedule"]
    assert schedule["create_rule"][0]["interval"] == 24 and schedule["create_rule"][0]["interval_unit"] == "HOURS"
    assert schedule["retain_rule"][0]["count"] == "${var.snapshot_retention_count}"
    assert policy["execution_role_arn"] == "${aws_iam_role.dlm.arn}" and policy["state"] == "ENABLED"
    dlm = terraform.resources["aws_iam_role_policy_attachment"]["dlm"]
    assert dlm["policy_arn"].endswith(":iam::aws:policy/service-role/AWSDataLifecycleManagerServiceRole")
    (assume,) = terraform.data["aws_iam_policy_document"]["dlm_assume"]["statement"]
    assert assume["principals"][0]["identifiers"] == ["dlm.amazonaws.com"]


# --- Memory and CPU ------------------------------------------------------------------------------

# Memory of the instance types the default may be, in MiB (EC2's instance type list).
INSTANCE_MEMORY_MIB = {
    "t3.small": 2048,
    "t3.medium": 4096,
    "t3.large": 8192,
    "t3a.medium": 4096,
    "m7i.large": 8192,
}
# What Ubuntu, sshd, chrony, containerd and dockerd keep (docs/deploy.md, Memory and CPU budget).
HOST_RESERVE_MIB = 512


def _mebibytes(size: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKmMgG])?[bB]?", str(size))
    assert match, size
    return (
        float(match.group(1))
        * {"k": 1 / 1024, "m": 1, "g": 1024, None: 1 / 1024 / 1024}[(match.group(2) or "").lower() or None]
    )


def test_the_containers_memory_limits_fit_the_default_instance_type(terraform: Terraform) -> None:
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.prod.yml").read_text())
    total = 0.0
    for name, service in compose["services"].items():
        deploy = service.get("deploy", {})
        limit = deploy.get("resources", {}).get("limits", {}).get("memory")
        assert limit, f"{name} has no memory limit"
        replicas = deploy.get("replicas", 1)
        if isinstance(replicas, str):  # ${WSBRIDGE_REPLICAS:-2}: its default
            replicas = int(re.fullmatch(r"\$\{\w+:-(\d+)\}", replicas).group(1))  # type: ignore[union-attr]
        total += _mebibytes(limit) * replicas
    instance_type = terraform.variable_default("instance_type")
    budget = INSTANCE_MEMORY_MIB[instance_type] - HOST_RESERVE_MIB
    assert total <= budget, f"the containers may use {total:.0f} MiB; a {instance_type} leaves {budget} MiB"
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f"**{instance_type}**" in docs and f"| {HOST_RESERVE_MIB} |" in docs and f"| at most {budget} |" in docs


def test_the_credit_mode_is_chosen_and_documented(terraform: Terraform) -> None:
    instance = terraform.resources["aws_instance"]["appliance"]
    (credits,) = [block["credit_specification"] for block in instance["dynamic"] if "credit_specification" in block]
    assert credits["content"][0]["cpu_credits"] == "${var.cpu_credits}"
    assert terraform.variable_default("cpu_credits") in ("standard", "unlimited")
    assert terraform.refusals("cpu_credits", "sometimes")
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f'`cpu_credits = "{terraform.variable_default("cpu_credits")}"` (the default)' in docs
    assert "per vCPU-hour" in docs


def test_every_documented_put_parameter_of_a_stack_secret_names_the_stacks_key(
    terraform: Terraform, terraform_names: TerraformNames
) -> None:
    """Without --key-id, put-parameter --overwrite moves the secret to alias/aws/ssm (the next apply moves it back)."""
    alias = terraform.resolve(terraform.resources["aws_kms_alias"]["main"]["name"])
    recipes = []
    for path in (ROOT / "docs" / "deploy.md", ROOT / "README.md"):
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            command = line[line.find("aws ssm put-parameter") :] if "aws ssm put-parameter" in line else ""
            names = re.findall(r"--name\s+(\S+)", command)
            if names and names[0] in terraform_names.parameter_names:
                recipes.append(command)
                assert f"--key-id {alias}" in command, f"{path.name}: {command}"
    assert recipes, "the rotation recipe is gone: the test would pass trivially"
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert "`wsbridge tokens rotate <name>`" in docs
    assert "**Do not bump `secrets_version` to rotate one secret.**" in docs


def test_the_readme_steps_name_every_file_and_input_a_first_deploy_needs(terraform: Terraform) -> None:
    """Followed literally, the README's steps must be enough: state bucket, backend.hcl, tfvars, Ansible."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploy to AWS", 1)[1].split("\n## ", 1)[0]
    for needed in (
        "backend.hcl",
        "terraform.tfvars",
        "tools/venvs/ansible.txt",  # Ansible and the collections it bundles
        "ansible-galaxy collection install -r ansible/requirements.yml",
        "put-bucket-versioning",  # the state bucket
        "terraform output -json ansible_inventory",
        "ansible-playbook site.yml",
    ):
        assert needed in section, f"the README's deploy steps never mention {needed}"
    # Every input without a default is named, in the README and in docs/deploy.md's table.
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for name, variable in terraform.variables.items():
        if "default" not in variable:
            assert f"`{name}`" in section, f"the README's steps never ask for {name}"
            assert f"| `{name}` |" in docs, f"docs/deploy.md's table of required inputs lacks {name}"
    assert "aws_ssm" not in section and "ansible_connection: amazon.aws.aws_ssm" not in docs
