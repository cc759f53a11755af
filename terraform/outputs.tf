output "public_ip" {
  description = "Elastic IP of the single host: point the domain's A record here (null with several hosts: see load_balancer_dns)."
  value       = one(aws_eip.appliance[*].public_ip)
}

output "public_dns" {
  description = "AWS public DNS name of the Elastic IP (null with several hosts)."
  value       = one(aws_eip.appliance[*].public_dns)
}

output "instance_id" {
  description = "EC2 instance id of the single host (null with several hosts: see autoscaling_group_name)."
  value       = one(aws_instance.appliance[*].id)
}

output "domain_name" {
  description = "The bridge's public name; WebSocket URL wss://<domain_name>/ws/{client_id}."
  value       = var.domain_name
}

output "ssm_parameter_names" {
  description = "SSM SecureString parameters holding the appliance's secrets."
  value       = { for name, parameter in aws_ssm_parameter.secret : name => parameter.name }
}

output "ssm_parameter_prefix" {
  description = "SSM path of the secrets (SSM_PREFIX of the appliance)."
  value       = var.ssm_parameter_prefix
}

output "kms_key_arn" {
  description = "ARN of the stack's KMS key (SSM parameters, volumes, logs, alerts topic)."
  value       = aws_kms_key.main.arn
}

# The single source of truth for Ansible: the inventory is generated from this output
#   terraform output -json ansible_inventory > ../ansible/inventory/wsbridge.aws_ec2.yml
# (JSON is YAML), so region, tags, parameter prefix and domain cannot disagree between
# Terraform and the playbook. The host's variables come from `compose`.
output "ansible_inventory" {
  description = "Configuration of Ansible's amazon.aws.aws_ec2 inventory plugin that finds exactly this host, with its variables."
  value = {
    plugin  = "amazon.aws.aws_ec2"
    regions = [var.aws_region]
    filters = {
      "tag:Project"       = local.common_tags.Project
      "tag:Environment"   = local.common_tags.Environment
      "tag:Role"          = local.common_tags.Role
      instance-state-name = "running"
    }
    hostnames = ["tag:Name", "instance-id"]
    compose = {
      ansible_host                   = "public_ip_address | default(private_ip_address, true)"
      appliance_domain               = "'${var.domain_name}'"
      appliance_aws_region           = "'${var.aws_region}'"
      appliance_ssm_parameter_prefix = "'${var.ssm_parameter_prefix}'"
      appliance_token_rotation       = var.token_rotation_from_host ? "true" : "false"
      appliance_acme_email           = "'${var.acme_email}'"
      appliance_alerts_sns_topic_arn = "'${aws_sns_topic.alerts.arn}'"
      base_data_volume_id            = "'${local.data_volume_id}'"
      # Several hosts: Redis is ElastiCache, over TLS with its AUTH token (REDIS_PASSWORD).
      appliance_extra_env = "{'REDIS_HOST': '${local.redis_endpoint}', 'REDIS_TLS': 'true'} if '${local.redis_endpoint}' else {}"
      docker_awslogs                 = var.container_logs_to_cloudwatch ? "true" : "false"
      docker_awslogs_group           = "'${local.container_log_group}'"
      docker_awslogs_region          = "'${var.aws_region}'"
    }
    groups = {
      wsbridge = "tags.Role == '${local.common_tags.Role}'"
    }
    strict = true
  }
}

output "ssh_command" {
  description = "SSH to the host (from a network in ssh_allowed_cidrs); `aws ssm start-session --target <instance_id>` gives a shell without it."
  value       = local.multi_host ? "ansible-inventory --graph (one host per instance of the group)" : "ssh ubuntu@${one(aws_eip.appliance[*].public_ip)}"
}

output "alerts_sns_topic_arn" {
  description = "ARN of the alerts SNS topic (Alertmanager publishes to it: ALERTS_SNS_TOPIC_ARN); confirm the e-mail subscriptions AWS sends."
  value       = aws_sns_topic.alerts.arn
}

output "data_volume_id" {
  description = "EBS volume holding Docker's data root (certificates, metrics, Grafana); snapshotted daily, survives instance replacement (null with several hosts)."
  value       = one(aws_ebs_volume.data[*].id)
}

# --- Several hosts ------------------------------------------------------------------------------

output "load_balancer_dns" {
  description = "With several hosts: the Network Load Balancer's DNS name; point the domain here (CNAME, or a Route 53 alias A record). Null with one host."
  value       = one(aws_lb.appliance[*].dns_name)
}

output "autoscaling_group_name" {
  description = "With several hosts: the Auto Scaling group of the appliance hosts. Null with one host."
  value       = one(aws_autoscaling_group.appliance[*].name)
}

output "acm_validation_records" {
  description = "With several hosts: the DNS record(s) that validate the load balancer's ACM certificate; create them while the first apply waits."
  value       = local.multi_host ? [for option in aws_acm_certificate.bridge[0].domain_validation_options : { name = option.resource_record_name, type = option.resource_record_type, value = option.resource_record_value }] : []
}

output "redis_primary_endpoint" {
  description = "With several hosts: ElastiCache's primary endpoint (REDIS_HOST, TLS with the REDIS_PASSWORD parameter as AUTH token). Empty with one host."
  value       = local.redis_endpoint
}
