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
  description = "SSM path of the secrets (appliance_ssm_parameter_prefix in Ansible)."
  value       = var.ssm_parameter_prefix
}

output "kms_key_arn" {
  description = "ARN of the stack's KMS key (SSM parameters, root volume, flow logs)."
  value       = aws_kms_key.main.arn
}

output "ansible_inventory_filters" {
  description = "Tag filters that find the host with Ansible's amazon.aws.aws_ec2 inventory plugin, and its region."
  value = {
    region              = var.aws_region
    "tag:Project"       = local.common_tags.Project
    "tag:Environment"   = local.common_tags.Environment
    "tag:Role"          = local.common_tags.Role
    instance-state-name = "running"
  }
}

output "ssh_command" {
  description = "SSH to the host (from a network in ssh_allowed_cidrs)."
  value       = "ssh ubuntu@${aws_eip.appliance.public_ip}"
}
