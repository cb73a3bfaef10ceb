# RDS PostgreSQL (master password managed by RDS, or written by Terraform), SSL forced, and an
# optional read replica.

resource "aws_db_subnet_group" "main" {
  name        = local.prefix
  description = "Private subnets of ${local.prefix}"
  subnet_ids  = local.private_subnet_ids
}

resource "aws_db_parameter_group" "main" {
  name        = "${local.prefix}-${var.db_parameter_group_family}"
  family      = var.db_parameter_group_family
  description = "CommNG: SSL only, connection logging"

  # Reject any connection that is not TLS (the app connects with sslmode=verify-full).
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  # Logins and logouts are logged so a rotation's old/new pool hand-over is visible.
  parameter {
    name  = "log_connections"
    value = "1"
  }

  parameter {
    name  = "log_disconnections"
    value = "1"
  }

  lifecycle {
    create_before_destroy = true
  }
}

# RDS creates the log groups of its exported logs itself, with no KMS key and no retention,
# unless they exist first: Terraform creates them, encrypted and with the stack's retention,
# and the instances depend on them.
locals {
  db_log_exports = ["postgresql", "upgrade"]
  db_log_groups = merge(
    { for log in local.db_log_exports : "main-${log}" => "/aws/rds/instance/${local.prefix}/${log}" },
    var.db_replica_enabled ? {
      for log in local.db_log_exports : "replica-${log}" => "/aws/rds/instance/${local.prefix}-replica/${log}"
    } : {},
  )
}

resource "aws_cloudwatch_log_group" "db" {
  for_each = local.db_log_groups

  name              = each.value
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.logs.arn
}

resource "aws_db_instance" "main" {
  identifier     = local.prefix
  engine         = "postgres"
  engine_version = var.db_engine_version
  instance_class = var.db_instance_class

  allocated_storage     = var.db_allocated_storage
  max_allocated_storage = var.db_max_allocated_storage
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.data.arn

  db_name  = var.db_name
  username = var.db_username

  # var.db_auth = "iam": logins granted rds_iam (commng_app, by the bootstrap) take IAM tokens.
  iam_database_authentication_enabled = local.iam_auth

  # Default (db_master_password_managed_by_rds = true): RDS generates the master password
  # and keeps it in a Secrets Manager secret it owns ("rds!db-..."): JSON {"username": ...,
  # "password": ...}. RDS rotates it (7 days by default; see aws_secretsmanager_secret_rotation
  # below). Otherwise (a read replica needs it: RDS for PostgreSQL does not replicate an
  # instance whose master password RDS manages) Terraform writes a random password
  # write-only, here and in aws_secretsmanager_secret.db_master (credentials.tf), and the
  # single-user rotation function rotates it. Either way the password is never in state.
  manage_master_user_password   = var.db_master_password_managed_by_rds ? true : null
  master_user_secret_kms_key_id = var.db_master_password_managed_by_rds ? var.master_user_secret_kms_key_id : null
  password_wo                   = one(ephemeral.aws_secretsmanager_random_password.db_master[*].random_password)
  password_wo_version           = var.db_master_password_managed_by_rds ? null : var.db_master_password_version

  db_subnet_group_name   = aws_db_subnet_group.main.name
  vpc_security_group_ids = [aws_security_group.db.id]
  parameter_group_name   = aws_db_parameter_group.main.name
  publicly_accessible    = false
  multi_az               = var.db_multi_az
  port                   = 5432

  deletion_protection       = var.db_deletion_protection
  backup_retention_period   = var.db_backup_retention_days
  backup_window             = "03:00-04:00"
  maintenance_window        = "sun:04:30-sun:05:30"
  copy_tags_to_snapshot     = true
  skip_final_snapshot       = var.db_skip_final_snapshot
  final_snapshot_identifier = "${local.prefix}-final"

  auto_minor_version_upgrade      = true
  enabled_cloudwatch_logs_exports = local.db_log_exports
  depends_on                      = [aws_cloudwatch_log_group.db]

  monitoring_interval = var.db_monitoring_interval
  monitoring_role_arn = var.db_monitoring_interval > 0 ? aws_iam_role.rds_monitoring[0].arn : null

  performance_insights_enabled          = var.db_performance_insights_enabled
  performance_insights_kms_key_id       = var.db_performance_insights_enabled ? aws_kms_key.data.arn : null
  performance_insights_retention_period = var.db_performance_insights_enabled ? 7 : null

  # A changed parameter group or class waits for the maintenance window.
  apply_immediately = false
}

# Rotation schedule of the RDS-managed secret. RDS enables rotation itself (every 7 days);
# this resource makes the schedule explicit and owned by Terraform. No Lambda: for
# RDS-managed secrets, Secrets Manager asks RDS to rotate ("managed rotation"), which is
# why rotation_lambda_arn is omitted. rotate_immediately = false: creating or changing the
# schedule does not itself rotate the password.
resource "aws_secretsmanager_secret_rotation" "db_master" {
  count = var.db_master_password_managed_by_rds && var.db_secret_rotation_schedule != null ? 1 : 0

  secret_id          = aws_db_instance.main.master_user_secret[0].secret_arn
  rotate_immediately = false

  rotation_rules {
    schedule_expression = var.db_secret_rotation_schedule
    duration            = var.db_secret_rotation_window
  }
}

# --- Optional read replica (db_replica_enabled) -------------------------------------------------
# Same subnets, security group, parameter group (SSL forced) and data key as the primary. The
# application reads it through the SELECT-only role commng_ro (aws_secretsmanager_secret.db_replica,
# DB_REPLICA_SECRET_ID); roles and passwords come from the primary by replication.
resource "aws_db_instance" "replica" {
  count = var.db_replica_enabled ? 1 : 0

  identifier          = "${local.prefix}-replica"
  replicate_source_db = aws_db_instance.main.identifier
  instance_class      = coalesce(var.db_replica_instance_class, var.db_instance_class)

  max_allocated_storage = var.db_max_allocated_storage
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.data.arn

  db_subnet_group_name   = aws_db_subnet_group.main.name
  vpc_security_group_ids = [aws_security_group.db.id]
  parameter_group_name   = aws_db_parameter_group.main.name
  publicly_accessible    = false
  multi_az               = var.db_multi_az
  port                   = 5432

  # A replica has no final snapshot of its own: the primary's backups cover the data.
  deletion_protection   = var.db_deletion_protection
  copy_tags_to_snapshot = true
  skip_final_snapshot   = true

  auto_minor_version_upgrade      = true
  enabled_cloudwatch_logs_exports = local.db_log_exports
  depends_on                      = [aws_cloudwatch_log_group.db]

  monitoring_interval = var.db_monitoring_interval
  monitoring_role_arn = var.db_monitoring_interval > 0 ? aws_iam_role.rds_monitoring[0].arn : null

  performance_insights_enabled          = var.db_performance_insights_enabled
  performance_insights_kms_key_id       = var.db_performance_insights_enabled ? aws_kms_key.data.arn : null
  performance_insights_retention_period = var.db_performance_insights_enabled ? 7 : null

  apply_immediately = false

  lifecycle {
    # The same rule as var.db_replica_enabled's validation, where the replica is made.
    precondition {
      condition     = local.app_role && !var.db_master_password_managed_by_rds
      error_message = "A read replica needs db_credentials_mode = \"app_role\" and db_master_password_managed_by_rds = false: RDS for PostgreSQL refuses to create a read replica of an instance whose master password RDS manages, and the replica is read through commng_ro, never as the master user."
    }
  }
}
