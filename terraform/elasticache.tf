# The shared Redis of several hosts (host_count >= 2): ElastiCache for Valkey, a primary
# and a replica in the other zone, Multi-AZ with automatic failover, TLS and encryption
# at rest with the stack's key. The appliance connects to the primary endpoint, whose
# name follows a failover (REDIS_HOST + REDIS_TLS=true, README "Redis that fails over").
#
# The AUTH token is the stack's REDIS_PASSWORD parameter (ssm.tf): the hosts already read
# it into secrets/redis_password, so the appliance's REDIS_PASSWORD is the token. It is
# read here from Parameter Store, never generated or output by Terraform; ElastiCache's
# auth_token has no write-only form in the pinned provider, so the state holds it as a
# sensitive attribute, in the encrypted state bucket (docs/deploy.md, Several hosts).

data "aws_ssm_parameter" "redis_auth_token" {
  count = local.multi_host ? 1 : 0

  name = aws_ssm_parameter.secret["REDIS_PASSWORD"].name
  # Read after ssm.tf wrote it, on the first apply too.
  depends_on = [aws_ssm_parameter.secret]
}

resource "aws_security_group" "redis" {
  count = local.multi_host ? 1 : 0

  name        = "${local.name}-redis"
  description = "WebSocket Bridge ElastiCache: Redis protocol from the appliance hosts only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${local.name}-redis" }
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_hosts" {
  count = local.multi_host ? 1 : 0

  security_group_id            = aws_security_group.redis[0].id
  description                  = "Redis (TLS) from the appliance hosts"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = aws_security_group.appliance.id
}

resource "aws_vpc_security_group_egress_rule" "redis" {
  count = local.multi_host ? 1 : 0

  security_group_id            = aws_security_group.appliance.id
  description                  = "Out to ElastiCache (Redis over TLS)"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = aws_security_group.redis[0].id
}

resource "aws_elasticache_subnet_group" "redis" {
  count = local.multi_host ? 1 : 0

  name       = "${local.name}-redis"
  subnet_ids = [aws_subnet.public.id, aws_subnet.public_b[0].id]
}

# noeviction, as the single host's Redis: an evicted ownership or presence key would
# silently route a client's commands nowhere (ElastiCache's default is volatile-lru).
resource "aws_elasticache_parameter_group" "redis" {
  count = local.multi_host ? 1 : 0

  name   = "${local.name}-valkey8"
  family = "valkey8"

  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }
}

resource "aws_elasticache_replication_group" "redis" {
  count = local.multi_host ? 1 : 0

  replication_group_id = "${local.name}-redis"
  description          = "WebSocket Bridge ${var.environment}: shared broker of the hosts"
  engine               = "valkey"
  engine_version       = "8.0"
  node_type            = var.redis_node_type
  port                 = 6379
  parameter_group_name = aws_elasticache_parameter_group.redis[0].name
  subnet_group_name    = aws_elasticache_subnet_group.redis[0].name
  security_group_ids   = [aws_security_group.redis[0].id]

  # A primary and a replica in the other zone; the replica is promoted on failure.
  num_cache_clusters         = 2
  automatic_failover_enabled = true
  multi_az_enabled           = true

  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.main.arn
  auth_token                 = data.aws_ssm_parameter.redis_auth_token[0].value
  auth_token_update_strategy = "ROTATE"

  auto_minor_version_upgrade = true
  snapshot_retention_limit   = 1
  apply_immediately          = false

  lifecycle {
    # A rotated REDIS_PASSWORD reaches ElastiCache through the documented rotation
    # (docs/deploy.md), never by an apply that would cut the hosts off mid-rotation.
    ignore_changes = [auth_token]
  }
}

locals {
  # The primary endpoint the hosts connect to (Ansible's inventory); "" with one host.
  redis_endpoint = join("", aws_elasticache_replication_group.redis[*].primary_endpoint_address)
  # The single host's data volume (Ansible mounts it); "" with several hosts.
  data_volume_id = join("", aws_ebs_volume.data[*].id)
}
