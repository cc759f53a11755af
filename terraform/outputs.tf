output "public_ip" {
  description = "Elastic IP of the host: point the domain's A record here."
  value       = aws_eip.appliance.public_ip
}

output "public_dns" {
  description = "AWS public DNS name of the Elastic IP."
  value       = aws_eip.appliance.public_dns
}

output "instance_id" {
  description = "EC2 instance id of the host."
  value       = aws_instance.appliance.id
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
      base_data_volume_id            = "'${aws_ebs_volume.data.id}'"
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
  value       = "ssh ubuntu@${aws_eip.appliance.public_ip}"
}

output "alerts_sns_topic_arn" {
  description = "ARN of the alerts SNS topic (Alertmanager publishes to it: ALERTS_SNS_TOPIC_ARN); confirm the e-mail subscriptions AWS sends."
  value       = aws_sns_topic.alerts.arn
}

output "data_volume_id" {
  description = "EBS volume holding Docker's data root (certificates, metrics, Grafana); snapshotted daily, survives instance replacement."
  value       = aws_ebs_volume.data.id
}
