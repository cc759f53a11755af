"""Several hosts: each host's Prometheus finds every host of the group (monitoring/hosts_sd.py).

The script, run as the systemd timer runs it (ansible/roles/hosts_sd) but against a local
moto server, writes the file_sd file; the shipped prometheus.yml, its hosts job pointed at
that file, passes the real promtool (which reads the file_sd files it names); and what the
file lists matches what Terraform tags and opens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from deploy_support import ANSIBLE_DIR, ROOT, Moto, Terraform, TerraformNames, run, tool_env

SCRIPT = ROOT / "monitoring" / "hosts_sd.py"

SETUP = r"""
import json, sys
import boto3

spec = json.loads(sys.argv[1])
ec2 = boto3.client("ec2", region_name=spec["region"])
vpc = ec2.create_vpc(CidrBlock="10.41.0.0/16")["Vpc"]["VpcId"]
image = ec2.describe_images()["Images"][0]["ImageId"]
subnets = [
    ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.41.{n}.0/24", AvailabilityZone=spec["region"] + zone)["Subnet"]["SubnetId"]
    for n, zone in ((1, "a"), (2, "b"))
]

def launch(subnet, tags):
    reservation = ec2.run_instances(
        ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.small", SubnetId=subnet,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )
    return reservation["Instances"][0]

hosts = [launch(subnet, spec["tags"]) for subnet in subnets]
# Decoys: a stopped host of the group, and a running instance of another role.
stopped = launch(subnets[0], spec["tags"])["InstanceId"]
ec2.stop_instances(InstanceIds=[stopped])
launch(subnets[1], {"Role": "something-else"})
print(json.dumps([
    {"id": h["InstanceId"], "address": h["PrivateIpAddress"], "zone": h["Placement"]["AvailabilityZone"]}
    for h in hosts
]))
"""


def hosts_job(config: dict[str, Any]) -> dict[str, Any]:
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "hosts"]
    return job


def test_the_script_writes_the_groups_running_hosts_as_the_file_prometheus_reads(
    moto: Moto, terraform: Terraform, terraform_names: TerraformNames, tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `python3 dev.py test` installs it (tools/apt/monitoring.txt)"
    moto.reset()
    role = terraform_names.tags["Role"]
    spec = {"region": terraform_names.region, "tags": {"Role": role}}
    hosts = json.loads(moto.python(SETUP, json.dumps(spec)))

    # The timer's command line (the role's unit), with the folder moved here.
    service = (ANSIBLE_DIR / "roles" / "hosts_sd" / "templates" / "wsbridge-hosts-sd.service.j2").read_text()
    defaults = yaml.safe_load((ANSIBLE_DIR / "roles" / "hosts_sd" / "defaults" / "main.yml").read_text())
    assert "--tag {{ hosts_sd_tag }} --port {{ hosts_sd_port }} --output {{ hosts_sd_dir }}/hosts.json" in service
    assert defaults["hosts_sd_tag"] == f"Role={role}"
    output = tmp_path / "hosts" / "hosts.json"
    args = [
        "--region",
        terraform_names.region,
        "--tag",
        defaults["hosts_sd_tag"],
        "--port",
        str(defaults["hosts_sd_port"]),
    ]
    result = run(
        [moto.venv / "bin" / "python", SCRIPT, *args, "--output", output], env=tool_env(moto.venv, **moto.env())
    )
    assert "2 host(s)" in result.stdout
    expected = sorted(
        (
            {
                "targets": [f"{h['address']}:{defaults['hosts_sd_port']}"],
                "labels": {"instance": h["id"], "zone": h["zone"]},
            }
            for h in hosts
        ),
        key=lambda group: group["labels"]["instance"],
    )
    assert json.loads(output.read_text()) == expected
    assert {group["labels"]["zone"][-1] for group in expected} == {"a", "b"}
    assert not list(output.parent.glob(".*")), "the temporary file was left behind"

    # The shipped prometheus.yml reads exactly that folder (docker-compose.prod.yml mounts it
    # there from the role's hosts_sd_dir), and promtool accepts the config with this file.
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    job = hosts_job(config)
    (discovery,) = job["file_sd_configs"]
    assert discovery["files"] == ["/etc/prometheus/hosts/*.json"]
    compose = yaml.safe_load((ROOT / "docker-compose.prod.yml").read_text())
    assert f"{defaults['hosts_sd_dir']}:/etc/prometheus/hosts:ro" in compose["services"]["prometheus"]["volumes"]
    config["rule_files"] = []
    discovery["files"] = [str(output.parent / "*.json")]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    check = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # ...and promtool does read the files the glob matches: a bad one beside it fails.
    (output.parent / "bad.json").write_text('[{"targets": [], "labels": {"1bad": "x"}}]')
    check = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and "not a valid label name" in check.stdout + check.stderr

    # Reachable with the least privilege: the port is open between the group's own hosts
    # only, and the instance role may list instances only when there is a group.
    rule = terraform.resources["aws_vpc_security_group_ingress_rule"]["node_exporter"]
    assert defaults["hosts_sd_port"] == rule["from_port"] == rule["to_port"]
    assert rule["referenced_security_group_id"] == rule["security_group_id"]
    policy = terraform.data["aws_iam_policy_document"]["discover_hosts"]["statement"][0]
    assert policy["actions"] == ["ec2:DescribeInstances"]
    attached = terraform.resources["aws_iam_role_policy"]["discover_hosts"]
    assert attached["role"] == "${aws_iam_role.appliance.id}" and attached["count"] == "${local.multi_host ? 1 : 0}"
