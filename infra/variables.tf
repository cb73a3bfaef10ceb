# Every input, documented. Only `container_image` and `acm_certificate_arn` have no default.

# --- General -----------------------------------------------------------------------------

variable "aws_region" {
  description = "AWS region to deploy into. Also passed to the container as AWS_REGION."
  type        = string
  default     = "us-east-1"
}

variable "name" {
  description = "Application name, the first part of every resource name."
  type        = string
  default     = "commng"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name must be 2-21 characters of lower-case letters, digits and dashes, starting with a letter."
  }
}

variable "environment" {
  description = "Environment name (e.g. prod, staging), the second part of every resource name."
  type        = string
  default     = "prod"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,10}$", var.environment))
    error_message = "environment must be 2-11 characters of lower-case letters, digits and dashes."
  }

  # The ALB is named "<name>-<environment>" and its target group that plus "-app": AWS allows
  # 32 characters for both.
  validation {
    condition     = length("${var.name}-${var.environment}-app") <= 32
    error_message = "name and environment together must be at most 27 characters (\"<name>-<environment>-app\" names the target group, and AWS allows 32)."
  }
}

variable "tags" {
  description = "Extra tags applied to every resource (through the provider's default_tags)."
  type        = map(string)
  default     = {}
}

# --- Network -----------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "CIDR block of the VPC the stack creates. Split into two public (ALB) and two private (tasks, database, endpoints) subnets. Unused with existing_vpc_id."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr))
    error_message = "vpc_cidr must be a valid IPv4 CIDR block."
  }
}

variable "availability_zones" {
  description = "The two Availability Zones (names, in aws_region) for the subnets the stack creates. Change together with aws_region. Unused with existing_vpc_id."
  type        = list(string)
  default     = ["us-east-1a", "us-east-1b"]

  validation {
    condition     = length(var.availability_zones) == 2 && length(distinct(var.availability_zones)) == 2
    error_message = "availability_zones must list exactly two distinct zones."
  }
}

# Use an existing VPC instead of creating one: give all three of existing_vpc_id,
# existing_private_subnet_ids and existing_public_subnet_ids, or none.

variable "existing_vpc_id" {
  description = "ID of an existing VPC to deploy into (with existing_private_subnet_ids and existing_public_subnet_ids). null (default) creates the stack's own VPC from vpc_cidr and availability_zones. The VPC must have DNS support and DNS hostnames enabled."
  type        = string
  default     = null

  validation {
    condition     = var.existing_vpc_id == null || can(regex("^vpc-[0-9a-f]+$", var.existing_vpc_id))
    error_message = "existing_vpc_id must be a VPC id (vpc-...) or null."
  }
}

variable "existing_private_subnet_ids" {
  description = "With existing_vpc_id: at least two private subnets of that VPC, in different AZs, for the tasks, the database and the interface endpoints. Empty (default) when the stack creates its VPC."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.existing_private_subnet_ids : can(regex("^subnet-[0-9a-f]+$", id))])
    error_message = "existing_private_subnet_ids must contain subnet ids (subnet-...)."
  }

  validation {
    condition     = (var.existing_vpc_id == null) == (length(var.existing_private_subnet_ids) == 0)
    error_message = "existing_private_subnet_ids is required with existing_vpc_id and must stay empty without it: give existing_vpc_id, existing_private_subnet_ids and existing_public_subnet_ids together, or none of them."
  }

  validation {
    condition     = length(var.existing_private_subnet_ids) == 0 || length(distinct(var.existing_private_subnet_ids)) >= 2
    error_message = "existing_private_subnet_ids needs at least two distinct subnets (in two AZs): the database subnet group and the service span two zones."
  }
}

variable "existing_public_subnet_ids" {
  description = "With existing_vpc_id: at least two public subnets of that VPC (routed to an internet gateway), in different AZs, for the ALB. Empty (default) when the stack creates its VPC."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.existing_public_subnet_ids : can(regex("^subnet-[0-9a-f]+$", id))])
    error_message = "existing_public_subnet_ids must contain subnet ids (subnet-...)."
  }

  validation {
    condition     = (var.existing_vpc_id == null) == (length(var.existing_public_subnet_ids) == 0)
    error_message = "existing_public_subnet_ids is required with existing_vpc_id and must stay empty without it: give existing_vpc_id, existing_private_subnet_ids and existing_public_subnet_ids together, or none of them."
  }

  validation {
    condition     = length(var.existing_public_subnet_ids) == 0 || length(distinct(var.existing_public_subnet_ids)) >= 2
    error_message = "existing_public_subnet_ids needs at least two distinct subnets (in two AZs): an ALB spans at least two zones."
  }
}

variable "create_vpc_endpoints" {
  description = "Create the interface endpoints (Secrets Manager, ECR api and dkr, CloudWatch Logs) and the S3 gateway endpoint the tasks need without a NAT. Always true for the stack's own VPC. With existing_vpc_id, set false when that VPC already has these endpoints (private DNS allows one per service and VPC) or a NAT route from the private subnets: the tasks then get HTTPS (443) egress to anywhere instead."
  type        = bool
  default     = true

  validation {
    condition     = var.create_vpc_endpoints || var.existing_vpc_id != null
    error_message = "create_vpc_endpoints = false is only for an existing VPC (existing_vpc_id): the stack's own VPC has no NAT, so its tasks need the endpoints."
  }
}

variable "alb_ingress_cidrs" {
  description = "IPv4 CIDR blocks allowed to reach the ALB on ports 80 and 443."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "acm_certificate_arn" {
  description = "ARN of the ACM certificate for the ALB's HTTPS listener (same region as the ALB)."
  type        = string

  validation {
    condition     = can(regex("^arn:[a-z-]+:acm:", var.acm_certificate_arn))
    error_message = "acm_certificate_arn must be an ACM certificate ARN."
  }
}

variable "admin_allowed_cidrs" {
  description = "CIDR blocks (IPv4 or IPv6, as the ALB sees the client) allowed to reach /admin* through the ALB. Empty (default): nobody; the ALB answers 404 for /admin* to everyone. At most 4: an ALB rule takes 5 condition values and the path takes one."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.admin_allowed_cidrs) <= 4
    error_message = "admin_allowed_cidrs takes at most 4 CIDR blocks: a listener rule has at most 5 condition values in total, and the /admin* path pattern is one of them."
  }

  validation {
    condition     = alltrue([for cidr in var.admin_allowed_cidrs : can(cidrhost(cidr, 0))])
    error_message = "admin_allowed_cidrs must contain CIDR blocks such as 203.0.113.0/24 or 2001:db8::/64."
  }
}

variable "alb_ssl_policy" {
  description = "TLS policy of the HTTPS listener: a TLS 1.3 policy restricted to TLS 1.2 and 1.3 with forward-secret ciphers."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-Res-2021-06"

  validation {
    condition     = can(regex("^ELBSecurityPolicy-TLS13-", var.alb_ssl_policy))
    error_message = "alb_ssl_policy must be a TLS 1.3 policy (ELBSecurityPolicy-TLS13-1-2-Res-2021-06 or newer)."
  }
}

variable "alb_deletion_protection" {
  description = "Protect the ALB against deletion (set false only to tear the stack down)."
  type        = bool
  default     = true
}

variable "alb_access_logs_bucket" {
  description = "Existing S3 bucket for ALB access logs (its bucket policy must allow the regional ELB log delivery). null disables access logs."
  type        = string
  default     = null
}

variable "waf_web_acl_arn" {
  description = "ARN of an existing WAFv2 web ACL (REGIONAL scope) to associate with the ALB. null associates none."
  type        = string
  default     = null
}

variable "prometheus_cidr_blocks" {
  description = "IPv4 CIDR blocks of Prometheus servers allowed to scrape the tasks directly on the container port (8000, /metrics with the admin Bearer token). Empty (default): none. The tasks have private addresses only, so these are VPC, peered or on-premises ranges."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for cidr in var.prometheus_cidr_blocks : can(cidrnetmask(cidr))])
    error_message = "prometheus_cidr_blocks must contain IPv4 CIDR blocks such as 10.0.5.0/24."
  }

  validation {
    condition     = !contains(var.prometheus_cidr_blocks, "0.0.0.0/0")
    error_message = "prometheus_cidr_blocks must name the scrapers' ranges, not 0.0.0.0/0."
  }
}

variable "prometheus_security_group_ids" {
  description = "Security groups of Prometheus servers (in this VPC or a peered one in the same region) allowed to scrape the tasks on the container port. Empty (default): none."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.prometheus_security_group_ids : can(regex("^sg-[0-9a-f]+$", id))])
    error_message = "prometheus_security_group_ids must contain security group ids (sg-...)."
  }
}

# --- Alarms ------------------------------------------------------------------------------

variable "alarm_sns_topic_arn" {
  description = "ARN of an existing SNS topic for the stack's alarms. null (default) creates a KMS-encrypted topic (output alarm_sns_topic_arn) to subscribe to. An existing topic must let events.amazonaws.com and cloudwatch.amazonaws.com publish (and use its KMS key, if encrypted)."
  type        = string
  default     = null

  validation {
    condition     = var.alarm_sns_topic_arn == null || can(regex("^arn:[a-z-]+:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]+$", var.alarm_sns_topic_arn))
    error_message = "alarm_sns_topic_arn must be an SNS topic ARN (arn:aws:sns:<region>:<account>:<name>) or null."
  }
}

# --- Database ----------------------------------------------------------------------------

variable "db_engine_version" {
  description = "PostgreSQL engine version, 13 or newer (the app resolves in-doubt commits with pg_xact_status). A major version (\"16\") lets RDS pick and auto-upgrade the minor version."
  type        = string
  default     = "16"
}

variable "db_parameter_group_family" {
  description = "Parameter group family; must match db_engine_version's major version."
  type        = string
  default     = "postgres16"
}

variable "db_instance_class" {
  description = "RDS instance class."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_allocated_storage" {
  description = "Initial storage in GiB (gp3)."
  type        = number
  default     = 20
}

variable "db_max_allocated_storage" {
  description = "Upper bound in GiB for storage autoscaling (0 disables it)."
  type        = number
  default     = 100
}

variable "db_name" {
  description = "Name of the database created in the instance (POSTGRES_DB in the container)."
  type        = string
  default     = "comm_ng"
}

variable "db_username" {
  description = "Master user name. Its password is generated and kept by RDS in Secrets Manager (manage_master_user_password), or, with db_master_password_managed_by_rds = false, generated by Terraform and written write-only; never in state. In app_role mode only the migration task and the rotation functions log in as it."
  type        = string
  default     = "commng_admin"
}

variable "db_multi_az" {
  description = "Run a synchronous standby in the second AZ."
  type        = bool
  default     = true
}

variable "db_deletion_protection" {
  description = "Protect the database instance against deletion."
  type        = bool
  default     = true
}

variable "db_backup_retention_days" {
  description = "Days of automated backups (1-35). Point-in-time recovery covers this window."
  type        = number
  default     = 14

  validation {
    condition     = var.db_backup_retention_days >= 1 && var.db_backup_retention_days <= 35
    error_message = "db_backup_retention_days must be between 1 and 35 (0 would disable backups)."
  }
}

variable "db_skip_final_snapshot" {
  description = "Skip the final snapshot when the instance is destroyed (keep false in production)."
  type        = bool
  default     = false
}

variable "db_monitoring_interval" {
  description = "Enhanced Monitoring interval in seconds (0, 1, 5, 10, 15, 30 or 60; 0 disables it)."
  type        = number
  default     = 60

  validation {
    condition     = contains([0, 1, 5, 10, 15, 30, 60], var.db_monitoring_interval)
    error_message = "db_monitoring_interval must be one of 0, 1, 5, 10, 15, 30, 60."
  }
}

variable "db_performance_insights_enabled" {
  description = "Enable Performance Insights (7 days, free tier; encrypted with the stack's data key). Not available on micro/small classes."
  type        = bool
  default     = true
}

variable "master_user_secret_kms_key_id" {
  description = <<-EOT
    ARN of a customer-managed KMS key that encrypts the DB secrets (master, app, replica) and
    the ADMIN_TOKEN secret. null (default) uses the AWS-managed key aws/secretsmanager, which
    needs no key permissions. When set, the execution, task and migration roles get
    kms:Decrypt on exactly this key, and the rotation functions kms:Decrypt and
    kms:GenerateDataKey (the key policy must also allow the account to delegate through IAM).
  EOT
  type        = string
  default     = null

  validation {
    condition     = var.master_user_secret_kms_key_id == null || can(regex("^arn:[a-z-]+:kms:", var.master_user_secret_kms_key_id))
    error_message = "master_user_secret_kms_key_id must be a KMS key ARN (not an alias or key id), because IAM policies name it."
  }
}

variable "db_secret_rotation_schedule" {
  description = <<-EOT
    Rotation schedule of the RDS-managed master secret, as a Secrets Manager schedule
    expression ("rate(7 days)", "cron(0 4 ? * SUN *)"). RDS turns rotation on by itself with a
    7-day schedule when manage_master_user_password is set. Non-null (default) makes Terraform
    own the schedule through aws_secretsmanager_secret_rotation without a Lambda (managed
    rotation; rotation_lambda_arn is optional in recent 5.x providers). null leaves RDS's default in place and unmanaged: change it
    then with `aws secretsmanager rotate-secret --secret-id <arn> --rotation-rules ...`.
    With db_master_password_managed_by_rds = false it is the single-user function's schedule
    of the stack's master secret (null there means rate(7 days)).
  EOT
  type        = string
  default     = "rate(7 days)"
}

variable "db_secret_rotation_window" {
  description = "Length of the rotation window (e.g. \"3h\"), or null for Secrets Manager's default (the whole day for rate expressions)."
  type        = string
  default     = "3h"
}

# --- Database credentials: who the service logs in as -------------------------------------

variable "db_credentials_mode" {
  description = <<-EOT
    Which PostgreSQL login the service uses (docs/deployment-shapes.md).
    "app_role" (default): a login role without DDL rights, commng_app, whose password is in a
    secret of its own (db_app_secret_arn) rotated every 7 days by AWS's alternating-users
    function (commng_app / commng_app_clone); the tables belong to the NOLOGIN role
    commng_owner, and the migration task (commng-migrate) is the only thing that uses the
    master secret. "master": the service logs in as the RDS master user (an rds_superuser)
    with the master secret, the original design: simpler, but a leaked task credential is a
    superuser of the whole instance. Less safe; kept for existing stacks and throw-away ones.
  EOT
  type        = string
  default     = "app_role"

  validation {
    condition     = contains(["app_role", "master"], var.db_credentials_mode)
    error_message = "db_credentials_mode must be \"app_role\" (least privilege, the default) or \"master\" (the service logs in as the RDS master user; less safe)."
  }
}

variable "db_auth" {
  description = <<-EOT
    How the service logs in to PostgreSQL (infra/README.md, "IAM database authentication").
    "secret" (default): with the password of its secret (db_credentials_mode), rotated by
    Secrets Manager. "iam": with IAM database authentication, no password at all: the app
    signs a 15-minute token (SigV4) for commng_app with its task role, which may rds-db:connect
    as exactly that user of this instance; the instance gets iam_database_authentication_enabled
    and the bootstrap grants commng_app rds_iam. No app secret and no rotation function for it
    are created; the master secret stays, for the migration task. Needs db_credentials_mode =
    "app_role" (rds_iam on the master would end its password logins: migrations, rotation).
  EOT
  type        = string
  default     = "secret"

  validation {
    condition     = contains(["secret", "iam"], var.db_auth)
    error_message = "db_auth must be \"secret\" (the service logs in with its rotated secret, the default) or \"iam\" (IAM database authentication, no password)."
  }

  validation {
    condition     = var.db_auth == "secret" || var.db_credentials_mode == "app_role"
    error_message = "db_auth = \"iam\" needs db_credentials_mode = \"app_role\": the IAM login is commng_app, and granting rds_iam to the master user would end its password logins (migrations, rotation)."
  }
}

variable "db_app_secret_version" {
  description = "Version of the app secret's first password (app_role mode). Terraform writes a fresh random password (write-only, never in state) only when this changes; the rotation function rotates it from then on. Bump it only to re-seed a broken secret, and rotate the secret right after (aws secretsmanager rotate-secret): the bootstrap does not change an existing role's password, the alternating-users function does."
  type        = number
  default     = 1

  validation {
    condition     = var.db_app_secret_version >= 1 && floor(var.db_app_secret_version) == var.db_app_secret_version
    error_message = "db_app_secret_version must be a whole number, 1 or more."
  }
}

variable "db_app_secret_rotation_schedule" {
  description = "Rotation schedule of the app secret (and the replica secret) by the alternating-users function, as a Secrets Manager schedule expression. Each login stays valid until the rotation after next, so two periods (14 days by default) separate a password's retirement from its creation."
  type        = string
  default     = "rate(7 days)"

  validation {
    condition     = can(regex("^(rate|cron)\\(.+\\)$", var.db_app_secret_rotation_schedule))
    error_message = "db_app_secret_rotation_schedule must be a schedule expression such as rate(7 days) or cron(0 4 ? * SUN *)."
  }
}

variable "rotation_function_semantic_version" {
  description = "Version of AWS's rotation applications (Serverless Application Repository) to deploy (X.Y.Z, one listed by `aws serverlessrepo list-application-versions`, see infra/README.md): code that holds the master credentials, so it is pinned and reviewed, never \"the latest at apply time\"."
  type        = string

  validation {
    condition     = var.rotation_function_semantic_version != null && can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.rotation_function_semantic_version))
    error_message = "rotation_function_semantic_version must be a pinned version X.Y.Z (null would deploy whatever is latest at each apply)."
  }
}

variable "db_master_password_managed_by_rds" {
  description = <<-EOT
    true (default): RDS generates, stores (secret "rds!db-...") and rotates the master
    password (manage_master_user_password). false: Terraform writes a random master password
    write-only (never in state) to the instance and to a secret of the stack's own, which
    AWS's single-user rotation function rotates. Needed for a read replica: RDS for
    PostgreSQL does not create a read replica of an instance whose master password RDS
    manages (db_replica_enabled). Switching an existing instance is a ModifyDBInstance: the
    RDS-managed secret is deleted and the service must be in app_role mode or restarted.
  EOT
  type        = bool
  default     = true
}

variable "db_master_password_version" {
  description = "With db_master_password_managed_by_rds = false: version of the master password Terraform writes. Terraform sets a new random password on the instance and in the master secret only when this changes (the single-user rotation function rotates it in between)."
  type        = number
  default     = 1

  validation {
    condition     = var.db_master_password_version >= 1 && floor(var.db_master_password_version) == var.db_master_password_version
    error_message = "db_master_password_version must be a whole number, 1 or more."
  }
}

variable "db_replica_enabled" {
  description = "Create a read replica (aws_db_instance.replica) and a secret for its SELECT-only login role commng_ro (DB_REPLICA_SECRET_ID). Requires db_credentials_mode = \"app_role\" and db_master_password_managed_by_rds = false: RDS for PostgreSQL cannot replicate an instance whose master password RDS manages. For Aurora's reader endpoint instead, see docs/deployment-shapes.md."
  type        = bool
  default     = false

  validation {
    condition     = !var.db_replica_enabled || (var.db_credentials_mode == "app_role" && !var.db_master_password_managed_by_rds)
    error_message = "db_replica_enabled = true needs db_credentials_mode = \"app_role\" and db_master_password_managed_by_rds = false: RDS for PostgreSQL refuses to create a read replica of an instance whose master password RDS manages, and the replica is read through its own SELECT-only role (commng_ro), never as the master user."
  }
}

variable "db_replica_instance_class" {
  description = "Instance class of the read replica; null (default) uses db_instance_class."
  type        = string
  default     = null
}

# --- Application (ECS) ---------------------------------------------------------------------

variable "container_image" {
  description = "Image to run, pinned by digest (<repository>@sha256:<64 hex>): a tag can be moved to other code. It must be in ECR in this region: the private subnets have no NAT, only VPC endpoints."
  type        = string

  validation {
    condition     = can(regex("^[^@\\s]+@sha256:[0-9a-f]{64}$", var.container_image))
    error_message = "container_image must be a digest reference, <repository>@sha256:<64 lower-case hex digits> (a tag may point to other code tomorrow)."
  }
}

variable "admin_token_version" {
  description = "Version of the generated ADMIN_TOKEN. Terraform writes a new random token (write-only, never in state) whenever this number changes, and the service then replaces its tasks: bump it to rotate the token."
  type        = number
  default     = 1

  validation {
    condition     = var.admin_token_version >= 1 && floor(var.admin_token_version) == var.admin_token_version
    error_message = "admin_token_version must be a whole number, 1 or more."
  }
}

variable "metrics_token_version" {
  description = "Version of the generated METRICS_TOKEN (the Prometheus scraper's read-only token for /metrics). Bump it to write a new token and roll the tasks; give Prometheus the new value."
  type        = number
  default     = 1

  validation {
    condition     = var.metrics_token_version >= 1 && floor(var.metrics_token_version) == var.metrics_token_version
    error_message = "metrics_token_version must be a whole number, 1 or more."
  }
}

variable "secret_admin_role_arns" {
  description = "Roles (ARNs) that may read the stack's secrets besides their runtime readers: the role that runs terraform (it reads each secret version back on every plan) and the operators' (they read the tokens). Non-null turns on a resource policy on each of the stack's own secrets that denies GetSecretValue to every other principal (secret_policies.tf); null (default) attaches none. Roles only: aws:PrincipalArn is the role's ARN for an assumed-role session."
  type        = list(string)
  default     = null

  validation {
    condition     = var.secret_admin_role_arns == null || alltrue([for arn in coalesce(var.secret_admin_role_arns, []) : can(regex("^arn:[a-z-]+:iam::[0-9]{12}:role/", arn))])
    error_message = "secret_admin_role_arns must list IAM role ARNs (arn:aws:iam::123456789012:role/...), or be null."
  }
}

variable "bootstrap_completed" {
  description = "false (default) until the bootstrap (migration) task has run once: the service runs 0 tasks and the app and replica secrets are not rotated, since the logins they hold do not exist yet. Set true for the second apply (infra/README.md, \"First deployment\"); an existing stack sets it true before applying this version."
  type        = bool
  default     = false
}

variable "desired_count" {
  description = "Number of tasks of the service."
  type        = number
  default     = 2
}

variable "task_cpu" {
  description = "Fargate task CPU units."
  type        = number
  default     = 512
}

variable "task_memory" {
  description = "Fargate task memory in MiB."
  type        = number
  default     = 1024
}

variable "web_concurrency" {
  description = "gunicorn worker processes per task (WEB_CONCURRENCY)."
  type        = number
  default     = 2
}

variable "postgres_pool_size" {
  description = "SQLAlchemy pool size per worker (POSTGRES_POOL_SIZE). desired_count x web_concurrency x (pool + overflow + 1 LISTEN connection for rotation fan-out) must stay under the instance's max_connections, with room for the second pool during a rotation."
  type        = number
  default     = 10
}

variable "db_secret_refresh_interval_ms" {
  description = "How often each worker polls the DB secret (DB_SECRET_REFRESH_INTERVAL_MS). Also bounds how long a rotated password can go unnoticed when no connection fails."
  type        = number
  default     = 300000
}

variable "db_pool_grace_period_ms" {
  description = "How long the old pool may drain after a credential swap (DB_POOL_GRACE_PERIOD_MS)."
  type        = number
  default     = 30000
}

variable "log_level" {
  description = "Application log level (LOG_LEVEL): DEBUG, INFO, WARNING or ERROR."
  type        = string
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING or ERROR."
  }
}

variable "log_retention_days" {
  description = "Retention of the CloudWatch log groups (application and VPC flow logs)."
  type        = number
  default     = 365
}
