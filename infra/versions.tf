# Terraform and provider versions, the provider itself, and names shared by every file.

terraform {
  # 1.11: write-only arguments (the ADMIN_TOKEN's secret_string_wo, ecs.tf). 1.10 already
  # brought ephemeral resources and the S3 backend's native lock file (use_lockfile below).
  required_version = ">= 1.11"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.100: ephemeral aws_secretsmanager_random_password and write-only secret_string_wo.
      version = "~> 5.100"
    }
  }

  # State in S3, locked by a lock file next to the state object (no DynamoDB table). Partial
  # configuration: bucket, key and region come from `terraform init -backend-config=...`
  # (infra/README.md, "State backend"), so nothing here is environment specific. The offline
  # check runs `terraform init -backend=false`, which skips this block.
  backend "s3" {
    use_lockfile = true
    encrypt      = true
  }
}

provider "aws" {
  region = var.aws_region

  default_tags {
    tags = merge(var.tags, {
      Application = var.name
      Environment = var.environment
      ManagedBy   = "terraform"
    })
  }
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_region" "current" {}

locals {
  # Every resource name starts with this, e.g. "commng-prod".
  prefix = "${var.name}-${var.environment}"

  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = data.aws_region.current.name

  # Two pinned AZs: the ALB needs two, and RDS Multi-AZ and the ECS service spread over
  # them. Pinned by name (not "the first two available") so the plan never shifts subnets
  # when AWS adds a zone.
  azs = var.availability_zones

  # The RDS-managed master secret ("rds!db-..."). Everything that reads the database
  # credentials points at this one ARN.
  db_secret_arn = aws_db_instance.main.master_user_secret[0].secret_arn

  # Port gunicorn listens on inside the container (gunicorn.conf.py reads $PORT).
  container_port = 8000
}
