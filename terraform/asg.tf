# Several hosts (host_count >= 2): an Auto Scaling group across two zones behind the
# Network Load Balancer (nlb.tf), Redis on ElastiCache (elasticache.tf). Every host is
# the same stack as the single host, provisioned by the same playbook: the inventory
# finds each instance by its tags (outputs.tf, ansible_inventory). Nothing here exists
# with host_count = 1 (docs/deploy.md, Several hosts).

resource "aws_subnet" "public_b" {
  count = local.multi_host ? 1 : 0

  vpc_id            = aws_vpc.main.id
  cidr_block        = var.second_public_subnet_cidr
  availability_zone = local.second_availability_zone
  # The launch template asks for a public address per host (no Elastic IP, no NAT).
  map_public_ip_on_launch = false

  tags = { Name = "${local.name}-public-b" }
}

resource "aws_route_table_association" "public_b" {
  count = local.multi_host ? 1 : 0

  subnet_id      = aws_subnet.public_b[0].id
  route_table_id = aws_route_table.public.id
}

resource "aws_launch_template" "appliance" {
  #checkov:skip=CKV_AWS_341:Two hops as on the single host: the appliance's container reads its tokens from SSM with the instance role; the docker role's metadata guard decides which containers get there.
  count = local.multi_host ? 1 : 0

  name_prefix   = "${local.name}-appliance-"
  image_id      = data.aws_ssm_parameter.ubuntu_ami.value
  instance_type = var.instance_type
  key_name      = aws_key_pair.operator.key_name
  ebs_optimized = true

  iam_instance_profile {
    name = aws_iam_instance_profile.appliance.name
  }

  # A public address for egress (images, packages, AWS APIs) and for Ansible over SSH;
  # the security group is the single host's: 80/443 public, 8443 admin, SSH operators.
  network_interfaces {
    #checkov:skip=CKV_AWS_88:Each host needs a public address for egress without a NAT gateway and for Ansible over SSH (ssh_allowed_cidrs only); the security group filters it.
    associate_public_ip_address = true
    delete_on_termination       = true
    security_groups             = [aws_security_group.appliance.id]
  }

  # As the single host: IMDSv2 only, two hops (containers read SSM with the role).
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 2
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = "/dev/sda1"

    ebs {
      encrypted             = true
      kms_key_id            = aws_kms_key.main.arn
      volume_type           = "gp3"
      volume_size           = var.root_volume_size_gb
      delete_on_termination = true
    }
  }

  dynamic "credit_specification" {
    for_each = can(regex("^t[0-9]", var.instance_type)) ? [1] : []

    content {
      cpu_credits = var.cpu_credits
    }
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.common_tags, { Name = "${local.name}-root" })
  }
}

resource "aws_autoscaling_group" "appliance" {
  # EC2 health checks, not ELB: hosts are provisioned by Ansible after launch, so ELB health checks would terminate every new host before its first playbook run; the load balancer's own TCP checks keep traffic off an unprovisioned host (docs/deploy.md, Several hosts).
  count = local.multi_host ? 1 : 0

  name                = "${local.name}-appliance"
  min_size            = var.host_count
  max_size            = var.host_count
  desired_capacity    = var.host_count
  vpc_zone_identifier = [aws_subnet.public.id, aws_subnet.public_b[0].id]
  target_group_arns   = [for group in aws_lb_target_group.appliance : group.arn]
  health_check_type   = "EC2"

  launch_template {
    id      = aws_launch_template.appliance[0].id
    version = aws_launch_template.appliance[0].latest_version
  }

  # The tags Ansible's inventory filters on reach every instance; no Name, so the
  # inventory names each host by its instance id.
  dynamic "tag" {
    for_each = local.common_tags

    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  # Ansible provisions hosts; a new AMI release must not replace them.
  lifecycle {
    ignore_changes = [launch_template]
  }
}

# --- Prometheus finds every host (monitoring/hosts_sd.py, ansible/roles/hosts_sd) ---------------

# node_exporter's port, between the group's hosts only (each host's Prometheus scrapes all).
resource "aws_vpc_security_group_ingress_rule" "node_exporter" {
  count = local.multi_host ? 1 : 0

  security_group_id            = aws_security_group.appliance.id
  description                  = "node_exporter, scraped by every host's Prometheus"
  ip_protocol                  = "tcp"
  from_port                    = 9100
  to_port                      = 9100
  referenced_security_group_id = aws_security_group.appliance.id
}

resource "aws_vpc_security_group_egress_rule" "node_exporter" {
  count = local.multi_host ? 1 : 0

  security_group_id            = aws_security_group.appliance.id
  description                  = "Prometheus to the other hosts' node_exporter"
  ip_protocol                  = "tcp"
  from_port                    = 9100
  to_port                      = 9100
  referenced_security_group_id = aws_security_group.appliance.id
}

# monitoring/hosts_sd.py, on each host, lists the instances for Prometheus (DescribeInstances has no resource-level
# permissions: "*" is the only resource it accepts).
data "aws_iam_policy_document" "discover_hosts" {
  statement {
    sid       = "DescribeInstancesForPrometheus"
    effect    = "Allow"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "discover_hosts" {
  count = local.multi_host ? 1 : 0

  name   = "discover-wsbridge-hosts"
  role   = aws_iam_role.appliance.id
  policy = data.aws_iam_policy_document.discover_hosts.json
}
