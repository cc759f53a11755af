data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# Ubuntu 24.04 LTS, the current image published by Canonical.
data "aws_ssm_parameter" "ubuntu_ami" {
  name = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
}

# --- Network ---------------------------------------------------------------------------

resource "aws_vpc" "main" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true

  tags = { Name = "${local.name}-vpc" }
}

# The VPC's default security group allows all traffic between its members: empty it,
# so only the group below applies.
resource "aws_default_security_group" "main" {
  vpc_id = aws_vpc.main.id

  tags = { Name = "${local.name}-default-deny" }
}

resource "aws_internet_gateway" "main" {
  vpc_id = aws_vpc.main.id

  tags = { Name = "${local.name}-igw" }
}

resource "aws_subnet" "public" {
  vpc_id            = aws_vpc.main.id
  cidr_block        = var.public_subnet_cidr
  availability_zone = local.availability_zone
  # The host is reached through its Elastic IP; nothing gets an automatic public IP.
  map_public_ip_on_launch = false

  tags = { Name = "${local.name}-public" }
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.main.id

  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.main.id
  }

  tags = { Name = "${local.name}-public" }
}

resource "aws_route_table_association" "public" {
  subnet_id      = aws_subnet.public.id
  route_table_id = aws_route_table.public.id
}

# Rules are standalone resources only: inline ingress/egress blocks mixed with
# aws_vpc_security_group_*_rule resources make every second apply remove the
# standalone ones (the provider's documented conflict), so a second run would change
# something. No inline rule may be added here (tests/deploy/test_terraform.py).
resource "aws_security_group" "appliance" {
  name        = "${local.name}-appliance"
  description = "WebSocket Bridge host: WSS/HTTPS from anywhere, SSH from operators only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${local.name}-appliance" }
}

# Port 80 (redirected to HTTPS by Traefik), 443 (WebSockets, the ACME TLS-ALPN-01
# challenge) from anywhere; 8443 (dashboard, API, Grafana, Prometheus) from
# admin_allowed_cidrs.
resource "aws_vpc_security_group_ingress_rule" "public" {
  #checkov:skip=CKV_AWS_260:Port 80 must be open to the world: Traefik answers it only with a redirect to HTTPS.
  for_each = { http = 80, wss = 443 }

  security_group_id = aws_security_group.appliance.id
  description       = "Public ${each.key} (Traefik)"
  ip_protocol       = "tcp"
  from_port         = each.value
  to_port           = each.value
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "admin" {
  for_each = toset(var.admin_allowed_cidrs)

  security_group_id = aws_security_group.appliance.id
  description       = "Dashboard, API, Grafana, Prometheus (Traefik websecure)"
  ip_protocol       = "tcp"
  from_port         = 8443
  to_port           = 8443
  cidr_ipv4         = each.value
}

# SSH: one rule per operator network (validated: never /0); none when the list is
# empty, and Session Manager (AmazonSSMManagedInstanceCore) still reaches the host.
resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = toset(var.ssh_allowed_cidrs)

  security_group_id = aws_security_group.appliance.id
  description       = "SSH from an operator network (Ansible)"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = each.value
}

# 443 carries what the alerts need too: Alertmanager publishes to SNS over HTTPS, and
# SNS (not the host) sends the e-mails, so no SMTP port is opened.
resource "aws_vpc_security_group_egress_rule" "web" {
  for_each = { https = 443, http = 80 }

  security_group_id = aws_security_group.appliance.id
  description       = "Out ${each.key}: package mirrors, images, Let's Encrypt, AWS APIs (SSM, SNS, CloudWatch Logs)"
  ip_protocol       = "tcp"
  from_port         = each.value
  to_port           = each.value
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "dns" {
  security_group_id = aws_security_group.appliance.id
  description       = "DNS to the VPC resolver"
  ip_protocol       = "udp"
  from_port         = 53
  to_port           = 53
  cidr_ipv4         = var.vpc_cidr
}

# --- Flow logs (who talked to the host), encrypted with the stack's key ----------------

resource "aws_cloudwatch_log_group" "flow_logs" {
  name              = "/${var.project}/${var.environment}/vpc-flow-logs"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

# The containers' logs (Docker's awslogs driver), when container_logs_to_cloudwatch.
resource "aws_cloudwatch_log_group" "containers" {
  count = var.container_logs_to_cloudwatch ? 1 : 0

  name              = local.container_log_group
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

resource "aws_iam_role" "flow_logs" {
  name               = "${local.name}-flow-logs"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume.json
}

resource "aws_iam_role_policy" "flow_logs" {
  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs.id
  policy = data.aws_iam_policy_document.flow_logs_write.json
}

resource "aws_flow_log" "main" {
  vpc_id          = aws_vpc.main.id
  traffic_type    = "ALL"
  log_destination = aws_cloudwatch_log_group.flow_logs.arn
  iam_role_arn    = aws_iam_role.flow_logs.arn
}

# --- The host -----------------------------------------------------------------------------

# The operator's key: Ansible provisions the host over SSH (Session Manager gives a
# shell, not the playbook: docs/deploy.md).
resource "aws_key_pair" "operator" {
  key_name   = "${local.name}-operator"
  public_key = var.ssh_public_key
}

# The single host (host_count = 1); several hosts are an Auto Scaling group (asg.tf).
resource "aws_instance" "appliance" {
  count = local.multi_host ? 0 : 1

  ami                  = data.aws_ssm_parameter.ubuntu_ami.value
  instance_type        = var.instance_type
  subnet_id            = aws_subnet.public.id
  key_name             = aws_key_pair.operator.key_name
  iam_instance_profile = aws_iam_instance_profile.appliance.name
  ebs_optimized        = true
  monitoring           = true

  vpc_security_group_ids      = [aws_security_group.appliance.id]
  associate_public_ip_address = false

  # IMDSv2 only (session tokens). Two hops: the appliance's container reads its
  # tokens from SSM, and Alertmanager publishes to SNS, with the instance's role (the
  # bridge network is one hop more). Which containers get there is the host's
  # decision: the docker role's metadata guard lets only the compose file's `aws`
  # network through (docs/deploy.md, Security notes).
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 2
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    encrypted             = true
    kms_key_id            = aws_kms_key.main.arn
    volume_type           = "gp3"
    volume_size           = var.root_volume_size_gb
    delete_on_termination = true
  }

  # Burstable types: the credit mode is a decision, not a default (docs/deploy.md,
  # "Memory and CPU budget"). Other families have no credits.
  dynamic "credit_specification" {
    for_each = can(regex("^t[0-9]", var.instance_type)) ? [1] : []

    content {
      cpu_credits = var.cpu_credits
    }
  }

  # Ansible provisions the host; a new AMI release must not replace it.
  lifecycle {
    ignore_changes = [ami]
  }

  tags        = { Name = "${local.name}-appliance" }
  volume_tags = merge(local.common_tags, { Name = "${local.name}-root" })
}

resource "aws_eip" "appliance" {
  count = local.multi_host ? 0 : 1

  domain   = "vpc"
  instance = aws_instance.appliance[0].id

  tags = { Name = "${local.name}-eip" }

  depends_on = [aws_internet_gateway.main]
}

# --- The data volume: what must outlive the host ---------------------------------------

# Docker's data root (docker role): the certificates (acme.json), Prometheus's TSDB,
# Grafana's database, Alertmanager's silences and Redis's AOF when turned on. A
# replaced instance gets the same volume back; snapshots (dlm.tf) cover its loss.
# Several hosts keep nothing of their own (ElastiCache, ACM at the load balancer): none.
resource "aws_ebs_volume" "data" {
  count = local.multi_host ? 0 : 1

  availability_zone = local.availability_zone
  size              = var.data_volume_size_gb
  type              = "gp3"
  encrypted         = true
  kms_key_id        = aws_kms_key.main.arn

  tags = { Name = "${local.name}-data", Snapshot = local.snapshot_tag }

  lifecycle {
    prevent_destroy = true
  }
}

# /dev/sdf appears as an NVMe device on Nitro instances; Ansible finds it by the
# volume id (/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol...).
resource "aws_volume_attachment" "data" {
  count = local.multi_host ? 0 : 1

  device_name = "/dev/sdf"
  volume_id   = aws_ebs_volume.data[0].id
  instance_id = aws_instance.appliance[0].id
}
