#!/usr/bin/python3
"""Every running host of the group, as a Prometheus file_sd targets file.

Several hosts (terraform ``host_count`` >= 2, docs/deploy.md "Several hosts"): each
host's Prometheus runs in a container that the metadata guard keeps away from the
instance role, so it cannot use ``ec2_sd_configs`` itself. This script runs on the host
instead (a systemd timer that Ansible installs only on the hosts of a group, with the
instance role's ``ec2:DescribeInstances``), lists the group's running instances by its
tag, and writes their private addresses to a JSON file that Prometheus's ``hosts`` job
reads through ``file_sd_configs`` (monitoring/prometheus.yml). The file is replaced
atomically, so Prometheus never reads half of it; when the call fails, the previous
file stays (Prometheus keeps the last good list) and the exit status says so.

Only the standard library and boto3 (Debian's python3-boto3). Tested against moto by
tests/deploy/test_hosts_sd.py, which checks the output with the real promtool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def targets(instances: list[dict[str, Any]], port: int) -> list[dict[str, Any]]:
    """One target group per instance: its private address, named as the inventory names it."""
    found = []
    for instance in instances:
        address = instance.get("PrivateIpAddress")
        if not address:
            continue
        found.append(
            {
                "targets": [f"{address}:{port}"],
                "labels": {
                    "instance": instance["InstanceId"],
                    "zone": instance.get("Placement", {}).get("AvailabilityZone", ""),
                },
            }
        )
    return sorted(found, key=lambda group: group["labels"]["instance"])


def running_instances(ec2: Any, tag: str, value: str) -> list[dict[str, Any]]:
    filters = [
        {"Name": f"tag:{tag}", "Values": [value]},
        {"Name": "instance-state-name", "Values": ["running"]},
    ]
    instances = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            instances.extend(reservation["Instances"])
    return instances


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temporary, 0o644)  # Prometheus runs as nobody in its container
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", required=True)
    parser.add_argument("--tag", default="Role=wsbridge-appliance", help="NAME=VALUE the group's hosts carry")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--output", type=Path, required=True, help="the file_sd file (.json)")
    args = parser.parse_args(argv)
    tag, _, value = args.tag.partition("=")
    if not tag or not value:
        parser.error("--tag must be NAME=VALUE")

    import boto3  # only here: the pure functions above are tested without it

    ec2 = boto3.session.Session().client("ec2", region_name=args.region)
    try:
        found = targets(running_instances(ec2, tag, value), args.port)
    except Exception as error:
        print(f"hosts_sd: DescribeInstances failed, {args.output} kept: {error}", file=sys.stderr)
        return 1
    write_atomically(args.output, json.dumps(found, indent=2) + "\n")
    print(f"hosts_sd: {len(found)} host(s) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
