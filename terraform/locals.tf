locals {
  name = "${var.project}-${var.environment}"

  # The tags Ansible's aws_ec2 inventory filters on (ansible/inventory/wsbridge.aws_ec2.yml)
  # come last so extra_tags cannot change them.
  common_tags = merge(var.extra_tags, {
    Project     = var.project
    Environment = var.environment
    Role        = "wsbridge-appliance"
    ManagedBy   = "terraform"
  })

  # The appliance's tokens (TOKEN_STORE=ssm reads them at run time; a host-side
  # rotation may rewrite exactly these).
  token_names = ["LLM_SECRET_TOKEN", "UNITY_CLIENT_TOKEN", "ADMIN_TOKEN"]

  # Secrets stored as SecureString below ssm_parameter_prefix (ssm.tf), each a random
  # 48-character password at first: the appliance's tokens, Redis, Grafana's admin.
  secret_names = concat(local.token_names, ["REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"])

  # Every parameter ssm.tf creates: those, plus Prometheus's basic-auth password and
  # its htpasswd line.
  ssm_parameter_names = concat(local.secret_names, ["MONITORING_PASSWORD", "MONITORING_BASIC_AUTH"])

  # "/WebSocket/prod/" -> "WebSocket/prod": parameter ARNs have no double slash.
  ssm_path = trim(var.ssm_parameter_prefix, "/")

  # The tag the snapshot policy (dlm.tf) selects the data volume by.
  snapshot_tag = "${local.name}-data"

  # Docker's awslogs driver writes here (container_logs_to_cloudwatch).
  container_log_group = "/${var.project}/${var.environment}/containers"

  # A fixed zone, so the subnet (and the host) never move when AWS adds zones.
  availability_zone = coalesce(var.availability_zone, "${var.aws_region}a")

  # Several hosts (asg.tf, nlb.tf, elasticache.tf) instead of the single one (main.tf).
  multi_host = var.host_count > 1
  # The group's second zone; the first is availability_zone.
  second_availability_zone = "${var.aws_region}${endswith(local.availability_zone, "b") ? "c" : "b"}"
}
