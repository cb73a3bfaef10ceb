# IAM roles (ECS execution, ECS task, migration task, VPC flow logs, RDS monitoring) and the
# stack's KMS keys. (The rotation functions' roles come from AWS's templates; their extra
# grants are in credentials.tf.)
#
# Least privilege: no secretsmanager or kms action on a "*" resource in any IAM policy. (A KMS
# *key policy* necessarily says Resource "*", which there means "this key".)

locals {
  # kms:Decrypt on the customer key of the secrets, only when one is configured; with the
  # AWS-managed aws/secretsmanager key no KMS permission is needed.
  secrets_kms_key_arns = var.master_user_secret_kms_key_id == null ? [] : [var.master_user_secret_kms_key_id]
}

# --- ECS execution role: used by the ECS agent, before and around the container -------------

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    sid     = "EcsTasksAssume"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }

    # Confused-deputy protection: only ECS acting for this account.
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:ecs:${local.region}:${local.account_id}:*"]
    }
  }
}

resource "aws_iam_role" "execution" {
  name               = "${local.prefix}-ecs-execution"
  description        = "ECS agent for ${local.prefix}: pull the image, write logs"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

# ECR pull and CloudWatch Logs writes (AWS-managed, scoped by the service). Nothing else: ECS
# injects no secret into the container (ecs.tf), so this role reads none.
resource "aws_iam_role_policy_attachment" "execution_managed" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

# --- ECS task role: what the application itself (boto3) runs as ----------------------------

resource "aws_iam_role" "task" {
  name               = "${local.prefix}-ecs-task"
  description        = "CommNG application: read its own DB login secret(s) at runtime to follow rotations"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "task_db_secret" {
  # With IAM authentication and no replica the service reads no database secret at all.
  # The app polls its login secret (DB_SECRET_ID: the app secret in app_role mode, the master
  # secret in master mode) and the replica's (DB_REPLICA_SECRET_ID) if any and, after a failed
  # login, reads AWSCURRENT again and then AWSPENDING (GetSecretValue with VersionStage).
  # DescribeSecret shows which version carries which label. Nothing else: in app_role mode not
  # the master secret, and no write.
  dynamic "statement" {
    for_each = local.service_reads_secrets ? [local.service_secret_arns] : []
    content {
      sid = "ReadOwnDbSecrets"
      actions = [
        "secretsmanager:GetSecretValue",
        "secretsmanager:DescribeSecret",
      ]
      resources = statement.value
    }
  }

  # ADMIN_TOKEN and METRICS_TOKEN, read once when a worker starts (commng/tokens.py).
  statement {
    sid       = "ReadTokensAtStart"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = local.token_secret_arns
  }

  dynamic "statement" {
    for_each = local.secrets_kms_key_arns
    content {
      sid       = "DecryptSecretsKey"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["secretsmanager.${local.region}.amazonaws.com"]
      }

      # Only to decrypt these secrets: Secrets Manager names the secret in the context.
      condition {
        test     = "StringEquals"
        variable = "kms:EncryptionContext:SecretARN"
        values   = concat(local.service_secret_arns, local.token_secret_arns)
      }
    }
  }
}

resource "aws_iam_role_policy" "task_db_secret" {
  name   = "read-db-secret"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.task_db_secret.json
}

data "aws_iam_policy_document" "task_rotation_events" {
  # Each worker long-polls the rotation-events queue and deletes what it handled. Nothing
  # else: no send, no other queue (the dead-letter queue is for operators), and no
  # GetQueueAttributes (nothing in the app asks for them).
  statement {
    sid       = "ConsumeRotationEvents"
    actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage"]
    resources = [aws_sqs_queue.rotation_events.arn]
  }
}

# IAM database authentication (var.db_auth = "iam"): the app signs a token for commng_app on
# the primary, and RDS checks that this role may connect as exactly that user. Nothing else:
# not the master, not the replica's login, not another instance ("dbuser:<DbiResourceId>/<user>").
data "aws_iam_policy_document" "task_db_connect" {
  count = local.iam_auth ? 1 : 0

  statement {
    sid       = "ConnectAsTheAppUser"
    actions   = ["rds-db:connect"]
    resources = [local.db_connect_arn]
  }
}

resource "aws_iam_role_policy" "task_db_connect" {
  count = local.iam_auth ? 1 : 0

  name   = "rds-db-connect"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.task_db_connect[0].json
}

resource "aws_iam_role_policy" "task_rotation_events" {
  name   = "consume-rotation-events"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.task_rotation_events.json
}

# --- Migration task role: the master secret and the secrets whose roles it creates ------------

resource "aws_iam_role" "migrate" {
  name               = "${local.prefix}-ecs-migrate"
  description        = "CommNG migration task: log in as the master user, create the app roles with their secrets' passwords"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

data "aws_iam_policy_document" "migrate_db_secrets" {
  # Read only: the master secret (to log in) and, in app_role mode, the app and replica
  # secrets (their first passwords become the roles' passwords). No write: the rotation
  # functions own the values.
  statement {
    sid = "ReadMasterAndRoleSecrets"
    actions = [
      "secretsmanager:GetSecretValue",
      "secretsmanager:DescribeSecret",
    ]
    resources = local.migration_secret_arns
  }

  dynamic "statement" {
    for_each = local.secrets_kms_key_arns
    content {
      sid       = "DecryptSecretsKey"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["secretsmanager.${local.region}.amazonaws.com"]
      }

      # Only to decrypt these secrets: Secrets Manager names the secret in the context.
      condition {
        test     = "StringEquals"
        variable = "kms:EncryptionContext:SecretARN"
        values   = local.migration_secret_arns
      }
    }
  }
}

resource "aws_iam_role_policy" "migrate_db_secrets" {
  name   = "read-db-secrets"
  role   = aws_iam_role.migrate.id
  policy = data.aws_iam_policy_document.migrate_db_secrets.json
}

# --- VPC flow logs (only in the stack's own VPC) ------------------------------------------------

data "aws_iam_policy_document" "flow_logs_assume" {
  statement {
    sid     = "FlowLogsAssume"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "flow_logs" {
  count = local.create_vpc ? 1 : 0

  name               = "${local.prefix}-flow-logs"
  description        = "VPC flow logs of ${local.prefix} to CloudWatch Logs"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume.json
}

data "aws_iam_policy_document" "flow_logs" {
  count = local.create_vpc ? 1 : 0

  statement {
    sid = "WriteFlowLogs"
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogStreams",
    ]
    resources = [
      aws_cloudwatch_log_group.flow_logs[0].arn,
      "${aws_cloudwatch_log_group.flow_logs[0].arn}:*",
    ]
  }
}

resource "aws_iam_role_policy" "flow_logs" {
  count = local.create_vpc ? 1 : 0

  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs[0].id
  policy = data.aws_iam_policy_document.flow_logs[0].json
}

# --- RDS Enhanced Monitoring --------------------------------------------------------------------

data "aws_iam_policy_document" "rds_monitoring_assume" {
  statement {
    sid     = "RdsMonitoringAssume"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "rds_monitoring" {
  count = var.db_monitoring_interval > 0 ? 1 : 0

  name               = "${local.prefix}-rds-monitoring"
  description        = "RDS Enhanced Monitoring of ${local.prefix}"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_assume.json
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  count = var.db_monitoring_interval > 0 ? 1 : 0

  role       = aws_iam_role.rds_monitoring[0].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

# --- KMS keys owned by the stack ------------------------------------------------------------------
# (The secrets' key is the optional var.master_user_secret_kms_key_id, managed elsewhere.)

# Database storage and Performance Insights. Only the account (through IAM) administers and
# uses it; RDS uses it through grants made on the caller's behalf.
resource "aws_kms_key" "data" {
  description             = "${local.prefix}: RDS storage and Performance Insights"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "AccountAdministersThroughIam"
      Effect    = "Allow"
      Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
      Action    = "kms:*"
      Resource  = "*"
    }]
  })
}

resource "aws_kms_alias" "data" {
  name          = "alias/${local.prefix}-data"
  target_key_id = aws_kms_key.data.key_id
}

# CloudWatch log groups of the stack (application logs, VPC flow logs).
resource "aws_kms_key" "logs" {
  description             = "${local.prefix}: CloudWatch Logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministersThroughIam"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogsForThisStackOnly"
        Effect    = "Allow"
        Principal = { Service = "logs.${local.region}.amazonaws.com" }
        Action = [
          "kms:Encrypt*",
          "kms:Decrypt*",
          "kms:ReEncrypt*",
          "kms:GenerateDataKey*",
          "kms:Describe*",
        ]
        Resource = "*"
        Condition = {
          ArnLike = {
            "kms:EncryptionContext:aws:logs:arn" = [
              "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:/ecs/${local.prefix}",
              "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:/vpc/${local.prefix}/*",
              "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:/aws/rds/instance/${local.prefix}/*",
              "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:/aws/rds/instance/${local.prefix}-replica/*",
            ]
          }
        }
      },
    ]
  })
}

resource "aws_kms_alias" "logs" {
  name          = "alias/${local.prefix}-logs"
  target_key_id = aws_kms_key.logs.key_id
}
