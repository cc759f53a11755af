"""terraform/ with host_count >= 2: the group, the load balancer, ElastiCache, and what finds the hosts.

Offline as test_terraform.py: the configuration parsed with python-hcl2 (checkov covers
the new resources in test_terraform.py's session scan), and Terraform's inventory for a group read by
the real amazon.aws.aws_ec2 plugin against moto.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hcl2
import pytest
from deploy_support import (
    _HCL_OPTIONS,
    ANSIBLE_DIR,
    ROOT,
    TERRAFORM_DIR,
    Moto,
    Terraform,
    TerraformNames,
    ansible_inventory,
    run,
    tool_env,
    tool_venv,
)

GROUP_FILES = ("asg.tf", "nlb.tf", "elasticache.tf")
SINGLE_HOST = {("aws_instance", "appliance"), ("aws_eip", "appliance"), ("aws_ebs_volume", "data")} | {
    ("aws_volume_attachment", "data")
}


def parsed(name: str) -> dict[str, Any]:
    with (TERRAFORM_DIR / name).open() as handle:
        return hcl2.load(handle, serialization_options=_HCL_OPTIONS)


def test_one_host_stays_the_default_and_the_group_exists_only_with_two_or_more(terraform: Terraform) -> None:
    assert terraform.variable_default("host_count") == 1
    assert terraform.locals["multi_host"] == "${var.host_count > 1}"
    assert terraform.locals["nlb_ports"] == "${local.multi_host ? {http = 80, wss = 443, admin = 8443} : {}}"
    counted = 0
    for name in GROUP_FILES:
        for block in parsed(name).get("resource", []):
            for kind, named in block.items():
                for resource_name, resource in named.items():
                    gate = resource.get("count") or resource.get("for_each")
                    assert gate in ("${local.multi_host ? 1 : 0}", "${local.nlb_ports}"), f"{kind}.{resource_name}"
                    counted += 1
    assert counted >= 15
    # The single host's resources exist only with one host, and an existing state keeps them.
    moved = {(block["from"], block["to"]) for block in parsed("moved.tf")["moved"]}
    for kind, name in SINGLE_HOST:
        assert terraform.resources[kind][name]["count"] == "${local.multi_host ? 0 : 1}", f"{kind}.{name}"
        assert (f"${{{kind}.{name}}}", f"${{{kind}.{name}[0]}}") in moved, f"{kind}.{name} has no moved block"
    assert terraform.refusals("host_count", 0) and terraform.refusals("host_count", 1.5)
    assert terraform.refusals("host_count", 21)
    assert not terraform.refusals("host_count", 2) and not terraform.refusals("host_count", 1)


def test_elasticache_is_multi_az_encrypted_and_its_auth_token_comes_from_ssm(terraform: Terraform) -> None:
    group = terraform.resources["aws_elasticache_replication_group"]["redis"]
    assert group["engine"] == "valkey"
    assert group["num_cache_clusters"] == 2
    assert group["automatic_failover_enabled"] is True and group["multi_az_enabled"] is True
    assert group["transit_encryption_enabled"] is True and group["transit_encryption_mode"] == "required"
    assert group["at_rest_encryption_enabled"] is True and group["kms_key_id"] == "${aws_kms_key.main.arn}"
    # The token is the stack's REDIS_PASSWORD parameter, read from SSM: never generated here.
    assert group["auth_token"] == "${data.aws_ssm_parameter.redis_auth_token[0].value}"
    parameter = terraform.data["aws_ssm_parameter"]["redis_auth_token"]
    assert parameter["name"] == '${aws_ssm_parameter.secret["REDIS_PASSWORD"].name}'
    assert parameter["depends_on"] == ["${aws_ssm_parameter.secret}"]
    assert "REDIS_PASSWORD" in terraform.string_list("secret_names")
    assert not any(key.startswith("random_") for key in terraform.resources)
    # ... and no output shows it.
    for name, output in terraform.outputs.items():
        text = json.dumps(output["value"])
        assert "auth_token" not in text and "data.aws_ssm_parameter" not in text, name
    # Ownership and presence keys are never evicted, as on the single host's Redis.
    (setting,) = terraform.resources["aws_elasticache_parameter_group"]["redis"]["parameter"]
    assert (setting["name"], setting["value"]) == ("maxmemory-policy", "noeviction")
    assert group["parameter_group_name"] == "${aws_elasticache_parameter_group.redis[0].name}"
    # Reached from the hosts only, on 6379.
    ingress = terraform.resources["aws_vpc_security_group_ingress_rule"]
    to_redis = {
        name: rule
        for name, rule in ingress.items()
        if rule["security_group_id"].startswith("${aws_security_group.redis")
    }
    assert list(to_redis) == ["redis_from_hosts"]
    rule = to_redis["redis_from_hosts"]
    assert rule["referenced_security_group_id"] == "${aws_security_group.appliance.id}"
    assert rule["from_port"] == rule["to_port"] == 6379 and "cidr_ipv4" not in rule
    assert group["security_group_ids"] == ["${aws_security_group.redis[0].id}"]


def test_the_group_spans_two_zones_behind_a_tls_load_balancer(terraform: Terraform) -> None:
    subnets = ["${aws_subnet.public.id}", "${aws_subnet.public_b[0].id}"]
    group = terraform.resources["aws_autoscaling_group"]["appliance"]
    assert group["vpc_zone_identifier"] == subnets
    assert group["min_size"] == group["max_size"] == group["desired_capacity"] == "${var.host_count}"
    assert terraform.resources["aws_subnet"]["public"]["availability_zone"] == "${local.availability_zone}"
    assert terraform.resources["aws_subnet"]["public_b"]["availability_zone"] == "${local.second_availability_zone}"
    assert 'endswith(local.availability_zone, "b") ? "c" : "b"' in terraform.locals["second_availability_zone"]
    # Every host carries the tags the inventory and Prometheus filter on.
    (tags,) = [block["tag"] for block in group["dynamic"] if "tag" in block]
    assert tags["for_each"] == "${local.common_tags}"
    assert tags["content"][0]["propagate_at_launch"] is True
    # As the single host: IMDSv2 with two hops, an encrypted root volume with the stack's key.
    template = terraform.resources["aws_launch_template"]["appliance"]
    (metadata,) = template["metadata_options"]
    assert metadata["http_tokens"] == "required" and metadata["http_put_response_hop_limit"] == 2
    (disk,) = template["block_device_mappings"]
    assert disk["ebs"][0]["encrypted"] is True and disk["ebs"][0]["kms_key_id"] == "${aws_kms_key.main.arn}"
    assert template["iam_instance_profile"][0]["name"] == "${aws_iam_instance_profile.appliance.name}"
    assert template["network_interfaces"][0]["security_groups"] == ["${aws_security_group.appliance.id}"]
    # The load balancer: network, both zones, TLS with the ACM certificate on 443 and 8443.
    balancer = terraform.resources["aws_lb"]["appliance"]
    assert balancer["load_balancer_type"] == "network" and balancer["subnets"] == subnets
    assert balancer["enable_cross_zone_load_balancing"] is True
    listener = terraform.resources["aws_lb_listener"]["appliance"]
    assert listener["protocol"] == '${each.key == "http" ? "TCP" : "TLS"}'
    assert "aws_acm_certificate_validation.bridge[0].certificate_arn" in listener["certificate_arn"]
    assert "ELBSecurityPolicy-TLS13-1-2" in listener["ssl_policy"]
    targets = terraform.resources["aws_lb_target_group"]["appliance"]
    assert targets["protocol"] == listener["protocol"], "TLS re-encrypted to Traefik, plain TCP on 80"
    assert targets["preserve_client_ip"] is True, "8443 is filtered by the clients' addresses"
    assert group["target_group_arns"] == "${[for group in aws_lb_target_group.appliance : group.arn]}"
    certificate = terraform.resources["aws_acm_certificate"]["bridge"]
    assert (certificate["domain_name"], certificate["validation_method"]) == ("${var.domain_name}", "DNS")
    docs = (ROOT / "docs" / "deploy.md").read_text()
    section = docs.split("## Several hosts", 1)[1].split("\n## ", 1)[0]
    assert "TLS ends at the load balancer" in section and "Let's Encrypt" in section


def plain(value: Any) -> Any:
    """ansible-inventory marks values from the plugin as unsafe: {"__ansible_unsafe": v}."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


GROUP_SETUP = r"""
import json, sys
import boto3

spec = json.loads(sys.argv[1])
ec2 = boto3.client("ec2", region_name=spec["region"])
vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
image = ec2.describe_images()["Images"][0]["ImageId"]
hosts = []
for index, zone in enumerate(("a", "b")):
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.40.{index + 1}.0/24", AvailabilityZone=spec["region"] + zone)
    # As the Auto Scaling group launches them: the common tags, no Name, a public address.
    reservation = ec2.run_instances(
        ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.medium", SubnetId=subnet["Subnet"]["SubnetId"],
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in spec["tags"].items()]}],
    )
    hosts.append(reservation["Instances"][0]["InstanceId"])
print(json.dumps(hosts))
"""


def test_the_inventory_finds_every_host_of_the_group(
    moto: Moto, terraform: Terraform, terraform_names: TerraformNames, tmp_path: Path
) -> None:
    moto.reset()
    spec = {"region": terraform_names.region, "tags": terraform_names.tags}
    hosts = json.loads(moto.python(GROUP_SETUP, json.dumps(spec)))
    endpoint = "master.websocket-bridge-prod-redis.abc123.euc1.cache.amazonaws.com"
    values = terraform.with_values(
        domain_name="bridge.wsbridge-ops.net", acme_email="ops@wsbridge-ops.net", host_count=3
    )
    applied = {
        "aws_sns_topic.alerts.arn": "arn:aws:sns:eu-central-1:210987654321:websocket-bridge-prod-alerts",
        "local.data_volume_id": "",  # Several hosts: no data volume.
        "local.redis_endpoint": endpoint,
    }
    inventory_file = tmp_path / "wsbridge.aws_ec2.yml"
    inventory_file.write_text(json.dumps(ansible_inventory(values, applied=applied)))
    venv = tool_venv("ansible")
    env = tool_env(venv, **moto.env(), ANSIBLE_HOME=str(tmp_path / "ansible-home"), ANSIBLE_NOCOLOR="1")
    result = run(["ansible-inventory", "-i", inventory_file, "--list"], cwd=ANSIBLE_DIR, env=env)
    inventory = plain(json.loads(result.stdout))
    # site.yml's play runs on group wsbridge (test_aws.py): every host of the group, by instance id.
    assert sorted(inventory["wsbridge"]["hosts"]) == sorted(hosts)
    for host in hosts:
        hostvars = inventory["_meta"]["hostvars"][host]
        assert hostvars["ansible_host"], "Ansible connects to each host's public address"
        assert hostvars["appliance_extra_env"] == {"REDIS_HOST": endpoint, "REDIS_TLS": "true"}
        assert hostvars["base_data_volume_id"] == ""


@pytest.mark.parametrize("name", GROUP_FILES)
def test_every_new_file_is_named_in_the_deploy_docs(name: str) -> None:
    assert f"terraform/{name}" in (ROOT / "docs" / "deploy.md").read_text()
