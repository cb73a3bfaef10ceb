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

  # --- Database credentials (docs/deployment-shapes.md) ---
  # app_role (default): the service logs in as commng_app (or its clone) from a secret of its
  # own; master: the service logs in as the RDS master user. See var.db_credentials_mode.
  app_role = var.db_credentials_mode == "app_role"

  # iam (var.db_auth): commng_app logs in with IAM tokens (rds-db:connect), no password at all:
  # no app secret and no rotation of one. The master secret stays, for the migration task.
  iam_auth = var.db_auth == "iam"

  # The app's own rotated secret: app_role mode with password authentication.
  app_secret = local.app_role && !local.iam_auth

  # The master secret: RDS's own ("rds!db-...") by default, or the stack's secret when
  # Terraform writes the master password (db_master_password_managed_by_rds = false, which a
  # read replica needs). Only the migration task and the rotation functions read it in
  # app_role mode.
  db_master_secret_arn = var.db_master_password_managed_by_rds ? aws_db_instance.main.master_user_secret[0].secret_arn : aws_secretsmanager_secret.db_master[0].arn

  # The secret the service logs in with (DB_SECRET_ID, POSTGRES_USER/POSTGRES_PASSWORD at
  # start): the app secret in app_role mode, the master secret in master mode, none with IAM.
  db_secret_arn = local.iam_auth ? null : (local.app_role ? aws_secretsmanager_secret.db_app[0].arn : local.db_master_secret_arn)

  # Every secret the service reads at runtime: its login, plus the replica's when there is one.
  # Empty with IAM authentication and no replica.
  service_secret_arns   = concat(local.iam_auth ? [] : [local.db_secret_arn], aws_secretsmanager_secret.db_replica[*].arn)
  service_reads_secrets = !local.iam_auth || var.db_replica_enabled

  # IAM authentication: the one database user the task role may connect as. The resource is
  # the instance's DbiResourceId (resource_id), not its identifier.
  db_connect_arn = "arn:${local.partition}:rds-db:${local.region}:${local.account_id}:dbuser:${aws_db_instance.main.resource_id}/${local.db_app_username}"

  # Every database secret something rotates; a failed rotation of any of them pages.
  rotated_secret_arns = distinct(concat([local.db_master_secret_arn], local.service_secret_arns))

  # PostgreSQL roles of app_role mode (created by the migration task's bootstrap; the
  # rotation function creates "<user>_clone" itself when it does not exist yet).
  db_owner_role       = "commng_owner"
  db_app_username     = "commng_app"
  db_replica_username = "commng_ro"

  # Port gunicorn listens on inside the container (gunicorn.conf.py reads $PORT).
  container_port = 8000
}
