terraform {
  # 1.11: write-only arguments (aws_ssm_parameter.value_wo) and ephemeral resources, so
  # no secret is kept in the state (ssm.tf).
  required_version = ">= 1.11.0, < 2.0.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 6.x: aws_eip has no `vpc` argument (use domain = "vpc"); value_wo exists.
      version = "~> 6.14"
    }
    random = {
      source = "hashicorp/random"
      # 3.7: the ephemeral random_password.
      version = "~> 3.7"
    }
  }

  # State in S3 with S3-native locking (use_lockfile, Terraform 1.10+; no DynamoDB
  # table) and server-side encryption. Bucket, key and region come from a file kept out
  # of git:  terraform init -backend-config=backend.hcl  (see backend.hcl.example).
  backend "s3" {
    encrypt      = true
    use_lockfile = true
  }
}

provider "aws" {
  region = var.aws_region

  # Tags merged in one place (locals.tf); every taggable resource gets them.
  default_tags {
    tags = local.common_tags
  }
}

# Route 53 publishes health-check metrics in us-east-1 only: the endpoint's alarm and
# its topic live there (alerts.tf).
provider "aws" {
  alias  = "us_east_1"
  region = "us-east-1"

  default_tags {
    tags = local.common_tags
  }
}
