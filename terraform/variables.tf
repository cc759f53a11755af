variable "aws_region" {
  type        = string
  description = "AWS region to deploy into, e.g. eu-central-1."
  default     = "eu-central-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.aws_region))
    error_message = "aws_region must be a region name such as eu-central-1."
  }
}

variable "project" {
  type        = string
  description = "Project name: the Project tag, and the prefix of resource names."
  default     = "websocket-bridge"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.project))
    error_message = "project must be 3-32 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "environment" {
  type        = string
  description = "Environment name: the Environment tag that the Ansible inventory filters on."
  default     = "prod"

  validation {
    condition     = contains(["prod", "staging", "dev"], var.environment)
    error_message = "environment must be one of prod, staging, dev."
  }
}

variable "domain_name" {
  type        = string
  description = "Public DNS name of the bridge (an A record to the Elastic IP), e.g. bridge.example.com."

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.domain_name))
    error_message = "domain_name must be a lowercase DNS name such as bridge.example.com."
  }

  # RFC 2606/6761 names never resolve to the host: Let's Encrypt refuses them.
  validation {
    condition     = !can(regex("(^|[.@])(example[.](com|net|org)|example|test|invalid|localhost)$", var.domain_name))
    error_message = "domain_name is an example domain (example.com/.net/.org, .example, .test, .invalid, .localhost): use your own domain."
  }
}

variable "instance_type" {
  type        = string
  description = "EC2 instance type of the appliance host: 4 GiB of memory or more (the containers' limits add up to about 3.5 GiB; docs/deploy.md, Memory and CPU budget)."
  default     = "t3.medium"

  validation {
    condition     = can(regex("^[a-z][a-z0-9]*[0-9][a-z0-9-]*\\.[a-z0-9]+$", var.instance_type))
    error_message = "instance_type must be an EC2 instance type such as t3.small."
  }
}

variable "root_volume_size_gb" {
  type        = number
  description = "Size of the encrypted gp3 root volume in GiB (Docker images, logs, Prometheus data)."
  default     = 30

  validation {
    condition     = var.root_volume_size_gb >= 20 && var.root_volume_size_gb <= 500
    error_message = "root_volume_size_gb must be between 20 and 500."
  }
}

variable "availability_zone" {
  type        = string
  description = "Availability zone of the subnet and the host; null means the region's zone a."
  default     = null

  validation {
    condition     = var.availability_zone == null || can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9][a-z]$", var.availability_zone))
    error_message = "availability_zone must be a zone name such as eu-central-1a."
  }
}

variable "vpc_cidr" {
  type        = string
  description = "CIDR block of the VPC."
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be a valid IPv4 CIDR block."
  }
}

variable "public_subnet_cidr" {
  type        = string
  description = "CIDR block of the public subnet, inside vpc_cidr."
  default     = "10.40.1.0/24"

  validation {
    condition     = can(cidrhost(var.public_subnet_cidr, 0))
    error_message = "public_subnet_cidr must be a valid IPv4 CIDR block."
  }
}

variable "ssh_allowed_cidrs" {
  type        = list(string)
  description = "Operator networks allowed to SSH to the host: Ansible provisions it over SSH (required, at least one; never /0)."

  validation {
    condition     = length(var.ssh_allowed_cidrs) > 0
    error_message = "ssh_allowed_cidrs needs at least one operator network (your IP as 203.0.113.7/32): Ansible connects over SSH."
  }

  validation {
    condition     = alltrue([for cidr in var.ssh_allowed_cidrs : can(cidrhost(cidr, 0))])
    error_message = "ssh_allowed_cidrs must contain valid IPv4 CIDR blocks."
  }

  validation {
    condition     = alltrue([for cidr in var.ssh_allowed_cidrs : !contains(["0.0.0.0/0", "::/0"], cidr) && !endswith(cidr, "/0")])
    error_message = "SSH is never open to the whole Internet: list the operators' networks, e.g. 203.0.113.7/32."
  }
}

variable "ssh_public_key" {
  type        = string
  description = "OpenSSH public key installed for the default user (ubuntu), used by Ansible over SSH (required)."

  validation {
    condition     = can(regex("^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/=]+", var.ssh_public_key))
    error_message = "ssh_public_key must be an OpenSSH public key line (ssh-ed25519 AAAA...)."
  }
}

variable "ssm_parameter_prefix" {
  type        = string
  description = "SSM Parameter Store path that holds the appliance's secrets; the instance may read only below it."
  default     = "/WebSocket/prod/"

  validation {
    condition     = can(regex("^(/[A-Za-z0-9_.-]+)+/$", var.ssm_parameter_prefix))
    error_message = "ssm_parameter_prefix must start and end with a slash, e.g. /WebSocket/prod/."
  }
}

variable "log_retention_days" {
  type        = number
  description = "Days the VPC flow logs and the container logs are kept in CloudWatch Logs."
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a retention period CloudWatch Logs accepts (e.g. 30, 90, 365)."
  }
}

variable "extra_tags" {
  type        = map(string)
  description = "Additional tags for every resource (cost centre, owner); cannot override the tags Ansible filters on."
  default     = {}
}

variable "admin_allowed_cidrs" {
  type        = list(string)
  description = "Networks allowed to reach port 8443 (dashboard, API, Grafana, Prometheus); required. WebSockets (443) stay public. Only the security group filters it: ufw does not see ports Docker publishes."

  validation {
    condition     = length(var.admin_allowed_cidrs) > 0
    error_message = "admin_allowed_cidrs needs at least one network (your office or VPN, e.g. 203.0.113.0/24)."
  }

  validation {
    condition     = alltrue([for cidr in var.admin_allowed_cidrs : can(cidrhost(cidr, 0))])
    error_message = "admin_allowed_cidrs must contain valid IPv4 CIDR blocks."
  }
}

variable "token_rotation_from_host" {
  type        = bool
  description = "Let the host rewrite its token parameters (wsbridge tokens rotate on the host): PutParameter, LabelParameterVersion, UnlabelParameterVersion, GetParameterHistory on the tokens only."
  default     = false
}

variable "secrets_version" {
  type        = number
  description = "Write-only version of the generated secrets: bump it to have Terraform write fresh random values to every parameter."
  default     = 1

  validation {
    condition     = var.secrets_version >= 1 && floor(var.secrets_version) == var.secrets_version
    error_message = "secrets_version must be a whole number, 1 or more."
  }
}

variable "acme_email" {
  type        = string
  description = "E-mail of the Let's Encrypt account (expiry notices); required, not an example address (Let's Encrypt refuses those)."

  validation {
    condition     = can(regex("^[^@\\s]+@[^@\\s]+[.][a-z]{2,63}$", var.acme_email))
    error_message = "acme_email must be an e-mail address such as ops@your-company.net."
  }

  validation {
    condition     = !can(regex("(^|[.@])(example[.](com|net|org)|example|test|invalid|localhost)$", lower(var.acme_email)))
    error_message = "acme_email is at an example domain: Let's Encrypt refuses it (\"forbidden domain\"). Use a real mailbox."
  }
}

variable "alert_emails" {
  type        = list(string)
  description = "Who gets the alerts: e-mail subscriptions of the alerts SNS topic (Alertmanager and the out-of-host checks publish to it); required. AWS mails each address a confirmation link."

  validation {
    condition     = length(var.alert_emails) > 0
    error_message = "alert_emails needs at least one address: without a receiver no alert reaches a person."
  }

  validation {
    condition     = alltrue([for email in var.alert_emails : can(regex("^[^@\\s]+@[^@\\s]+[.][a-z]{2,63}$", email)) && !can(regex("(^|[.@])(example[.](com|net|org)|example|test|invalid|localhost)$", lower(email)))])
    error_message = "alert_emails must be real e-mail addresses, none at an example domain."
  }
}

variable "cpu_credits" {
  type        = string
  description = "Credit mode of a burstable (t3/t3a/t4g) instance: unlimited (bursts past the baseline, billed per vCPU-hour of surplus) or standard (throttled to the baseline when credits run out)."
  default     = "unlimited"

  validation {
    condition     = contains(["standard", "unlimited"], var.cpu_credits)
    error_message = "cpu_credits must be standard or unlimited."
  }
}

variable "data_volume_size_gb" {
  type        = number
  description = "Size of the encrypted gp3 data volume in GiB: Docker's data root (certificates, Prometheus, Grafana, Alertmanager, Redis volumes); it survives instance replacement."
  default     = 20

  validation {
    condition     = var.data_volume_size_gb >= 10 && var.data_volume_size_gb <= 1000
    error_message = "data_volume_size_gb must be between 10 and 1000."
  }
}

variable "snapshot_retention_count" {
  type        = number
  description = "Daily EBS snapshots of the data volume kept by the lifecycle policy (DLM)."
  default     = 7

  validation {
    condition     = var.snapshot_retention_count >= 1 && var.snapshot_retention_count <= 1000
    error_message = "snapshot_retention_count must be between 1 and 1000."
  }
}

variable "container_logs_to_cloudwatch" {
  type        = bool
  description = "Create a CloudWatch Logs group for the containers' logs and let the host write to it (Ansible then sets Docker's awslogs driver), so logs outlive container recreation and the host."
  default     = false
}

# --- Several hosts (docs/deploy.md, Several hosts) ------------------------------------------

variable "host_count" {
  type        = number
  description = "Appliance hosts: 1 is the single host with its Elastic IP and data volume (main.tf); 2 or more is an Auto Scaling group across two zones behind a Network Load Balancer, with ElastiCache for Valkey as the shared Redis (asg.tf, nlb.tf, elasticache.tf)."
  default     = 1

  validation {
    condition     = var.host_count >= 1 && var.host_count <= 20 && floor(var.host_count) == var.host_count
    error_message = "host_count must be a whole number from 1 to 20."
  }
}

variable "second_public_subnet_cidr" {
  type        = string
  description = "CIDR block of the second public subnet (the region's zone b), inside vpc_cidr; used only with host_count >= 2."
  default     = "10.40.2.0/24"

  validation {
    condition     = can(cidrhost(var.second_public_subnet_cidr, 0))
    error_message = "second_public_subnet_cidr must be a valid IPv4 CIDR block."
  }
}

variable "redis_node_type" {
  type        = string
  description = "ElastiCache node type of the shared Valkey (a primary and a replica in the other zone); used only with host_count >= 2."
  default     = "cache.t4g.small"

  validation {
    condition     = can(regex("^cache\\.[a-z0-9]+\\.[a-z0-9]+$", var.redis_node_type))
    error_message = "redis_node_type must be an ElastiCache node type such as cache.t4g.small."
  }
}
