# The stack's secrets, SecureString under the stack's key, below ssm_parameter_prefix:
#   LLM_SECRET_TOKEN, UNITY_CLIENT_TOKEN, ADMIN_TOKEN, REDIS_PASSWORD  the appliance's
#   GRAFANA_ADMIN_PASSWORD                                             Grafana's admin login
#   MONITORING_PASSWORD, MONITORING_BASIC_AUTH                         Prometheus behind
#       Traefik: user "ops" with that password, and its htpasswd (bcrypt) line
# Terraform creates each with a random value once; rotating one (docs/deploy.md)
# changes the parameter in SSM, and Terraform never writes it back (ignore_changes).
#
# The initial values live in the Terraform state too: keep the state in an encrypted,
# access-controlled backend, and rotate after the first apply if that is not enough.

resource "random_password" "secret" {
  for_each = toset(local.secret_names)

  length  = 48
  special = false # URL- and shell-safe: tokens travel in headers and in redis:// URLs.
}

resource "random_password" "monitoring" {
  length  = 32
  special = false
}

locals {
  generated_secrets = merge(
    { for name in local.secret_names : name => random_password.secret[name].result },
    {
      MONITORING_PASSWORD   = random_password.monitoring.result
      MONITORING_BASIC_AUTH = "ops:${random_password.monitoring.bcrypt_hash}"
    },
  )
}

resource "aws_ssm_parameter" "secret" {
  # A static list: for_each may not derive from the (sensitive) values.
  for_each = toset(local.ssm_parameter_names)

  name        = "${var.ssm_parameter_prefix}${each.key}"
  description = "WebSocket Bridge ${var.environment}: ${each.key}"
  type        = "SecureString"
  key_id      = aws_kms_key.main.arn
  value       = local.generated_secrets[each.key]

  lifecycle {
    ignore_changes = [value]
  }
}
