# RDS PostgreSQL with an RDS-managed master password in Secrets Manager, SSL forced.

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

  # RDS generates the master password and keeps it in a Secrets Manager secret it owns
  # ("rds!db-..."): JSON {"username": ..., "password": ...}. The password never appears in
  # Terraform state. RDS rotates it (7 days by default; see aws_secretsmanager_secret_rotation
  # below). The app reads this secret itself (DB_SECRET_ID) and swaps its pool on rotation.
  manage_master_user_password   = true
  master_user_secret_kms_key_id = var.master_user_secret_kms_key_id

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
  enabled_cloudwatch_logs_exports = ["postgresql", "upgrade"]

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
  count = var.db_secret_rotation_schedule == null ? 0 : 1

  secret_id          = local.db_secret_arn
  rotate_immediately = false

  rotation_rules {
    schedule_expression = var.db_secret_rotation_schedule
    duration            = var.db_secret_rotation_window
  }
}
