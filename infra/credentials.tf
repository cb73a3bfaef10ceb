# Database logins other than RDS's own master secret, and the functions that rotate them
# (docs/deployment-shapes.md, infra/README.md "Database roles"):
#
#   - app secret (app_role mode): login role commng_app, alternating with commng_app_clone,
#     rotated by AWS's SecretsManagerRDSPostgreSQLRotationMultiUser function with the master
#     secret (masterarn);
#   - replica secret (db_replica_enabled): login role commng_ro (SELECT only) on the replica,
#     alternating with commng_ro_clone, rotated by the same function. Not by the single-user
#     function: it sets the new password logged in as the user at the secret's host, and the
#     replica refuses ALTER ROLE (read-only); the multi-user function sets it on the primary;
#   - master secret of the stack's own (db_master_password_managed_by_rds = false): the
#     master password Terraform writes, rotated by SecretsManagerRDSPostgreSQLRotationSingleUser.
#
# Every first password is an ephemeral aws_secretsmanager_random_password written through a
# write-only argument: it is in neither the plan nor the state.

locals {
  # Characters a password never contains, so it is safe in a libpq key=value string and in a
  # postgresql:// URL without quoting: / @ " ' space and backslash.
  db_password_exclude_characters = "/@\"' \\"

  # AWS's rotation functions, published in the Serverless Application Repository by AWS. The
  # partition comes from aws_partition (aws, aws-cn, aws-us-gov), not a literal "aws".
  rotation_applications = {
    multi_user  = "arn:${local.partition}:serverlessrepo:us-east-1:297356227824:applications/SecretsManagerRDSPostgreSQLRotationMultiUser"
    single_user = "arn:${local.partition}:serverlessrepo:us-east-1:297356227824:applications/SecretsManagerRDSPostgreSQLRotationSingleUser"
  }

  # Parameters of AWS's templates beyond the network ones, as AWS CDK passes them:
  # masterSecretArn (the multi-user function logs in with it; CDK refuses to build that
  # function without it), the customer key of the rotated secret (kmsKeyArn) and of the master
  # secret (masterSecretKmsKeyArn) when there is one, and the characters a password never
  # contains (the same as the first passwords').
  rotation_function_parameters = {
    multi_user = merge(
      { masterSecretArn = local.db_master_secret_arn },
      var.master_user_secret_kms_key_id == null ? {} : {
        kmsKeyArn             = var.master_user_secret_kms_key_id
        masterSecretKmsKeyArn = var.master_user_secret_kms_key_id
      },
    )
    single_user = var.master_user_secret_kms_key_id == null ? {} : { kmsKeyArn = var.master_user_secret_kms_key_id }
  }

  # The app and replica secrets hold logins the bootstrap task creates: rotating them before
  # it ran fails (Secrets Manager runs testSecret as soon as rotation is configured, even
  # with rotate_immediately = false). var.bootstrap_completed turns their rotation on.
  rotate_role_secrets = local.app_role && var.bootstrap_completed

  # The alternating-users function rotates the app secret (none with IAM) and the replica's.
  multi_user_rotation = local.app_secret || var.db_replica_enabled

  # Which functions this stack deploys: alternating users for the app (and replica) secret in
  # app_role mode; single user for a master secret Terraform writes.
  rotation_functions = merge(
    local.multi_user_rotation ? { multi_user = "${local.prefix}-db-rotation-multi-user" } : {},
    var.db_master_password_managed_by_rds ? {} : { single_user = "${local.prefix}-db-rotation-single-user" },
  )

  # The regional Secrets Manager endpoint. In the stack's VPC it resolves to the interface
  # endpoint (private DNS), so the functions need no NAT.
  secretsmanager_endpoint = "https://secretsmanager.${local.region}.${data.aws_partition.current.dns_suffix}"

  # The instances the multi-user function may describe: it looks up the host of an
  # RDS-managed master secret, and whether a secret's host is a replica of the master's.
  rotation_db_instance_arns = concat([aws_db_instance.main.arn], aws_db_instance.replica[*].arn)

  # The secrets the multi-user function rotates (it reads and writes only those whose rotation
  # names it; see infra/README.md "Database roles").
  multi_user_rotated_secret_arns = concat(aws_secretsmanager_secret.db_app[*].arn, aws_secretsmanager_secret.db_replica[*].arn)
}

# --- Master secret written by Terraform (db_master_password_managed_by_rds = false) ------------

ephemeral "aws_secretsmanager_random_password" "db_master" {
  count = var.db_master_password_managed_by_rds ? 0 : 1

  password_length    = 40
  exclude_characters = local.db_password_exclude_characters
  include_space      = false
}

resource "aws_secretsmanager_secret" "db_master" {
  count = var.db_master_password_managed_by_rds ? 0 : 1

  name_prefix             = "${local.prefix}/db-master-"
  description             = "CommNG database master user (${var.db_username}); rotated by the single-user function. Read only by the migration task and the rotation functions in app_role mode."
  kms_key_id              = var.master_user_secret_kms_key_id
  recovery_window_in_days = 7
}

# The same ephemeral value as aws_db_instance.main's password_wo (one value per apply).
resource "aws_secretsmanager_secret_version" "db_master" {
  count = var.db_master_password_managed_by_rds ? 0 : 1

  secret_id = aws_secretsmanager_secret.db_master[0].id
  secret_string_wo = jsonencode({
    engine   = "postgres"
    host     = aws_db_instance.main.address
    port     = aws_db_instance.main.port
    dbname   = var.db_name
    username = var.db_username
    password = ephemeral.aws_secretsmanager_random_password.db_master[0].random_password
  })
  secret_string_wo_version = var.db_master_password_version
}

# --- App secret (app_role mode) -------------------------------------------------------------------

ephemeral "aws_secretsmanager_random_password" "db_app" {
  count = local.app_secret ? 1 : 0

  password_length    = 40
  exclude_characters = local.db_password_exclude_characters
  include_space      = false
}

resource "aws_secretsmanager_secret" "db_app" {
  count = local.app_secret ? 1 : 0

  name_prefix             = "${local.prefix}/db-app-"
  description             = "CommNG service login (${local.db_app_username} / ${local.db_app_username}_clone, alternating); DB_SECRET_ID of the service."
  kms_key_id              = var.master_user_secret_kms_key_id
  recovery_window_in_days = 7
}

# The first password. The migration task's bootstrap creates commng_app with it; from then on
# the rotation function owns the value (and flips `username` between commng_app and its
# clone). Terraform writes it again only when db_app_secret_version changes.
resource "aws_secretsmanager_secret_version" "db_app" {
  count = local.app_secret ? 1 : 0

  secret_id = aws_secretsmanager_secret.db_app[0].id
  secret_string_wo = jsonencode({
    engine    = "postgres"
    host      = aws_db_instance.main.address
    port      = aws_db_instance.main.port
    dbname    = var.db_name
    username  = local.db_app_username
    password  = ephemeral.aws_secretsmanager_random_password.db_app[0].random_password
    masterarn = local.db_master_secret_arn
  })
  secret_string_wo_version = var.db_app_secret_version
}

# --- Replica secret (db_replica_enabled) ----------------------------------------------------------

ephemeral "aws_secretsmanager_random_password" "db_replica" {
  count = var.db_replica_enabled ? 1 : 0

  password_length    = 40
  exclude_characters = local.db_password_exclude_characters
  include_space      = false
}

resource "aws_secretsmanager_secret" "db_replica" {
  count = var.db_replica_enabled ? 1 : 0

  name_prefix             = "${local.prefix}/db-replica-"
  description             = "CommNG read-only login on the read replica (${local.db_replica_username} / ${local.db_replica_username}_clone, alternating); DB_REPLICA_SECRET_ID of the service."
  kms_key_id              = var.master_user_secret_kms_key_id
  recovery_window_in_days = 7
}

# host is the replica; the roles commng_ro and commng_ro_clone (GRANT commng_ro TO
# commng_ro_clone, so the clone has exactly its SELECT rights) are created on the primary by
# the bootstrap (a replica is read-only) and reach the replica by replication. The multi-user
# function sees that the host is a replica of masterarn's instance and changes passwords on
# the primary.
resource "aws_secretsmanager_secret_version" "db_replica" {
  count = var.db_replica_enabled ? 1 : 0

  secret_id = aws_secretsmanager_secret.db_replica[0].id
  secret_string_wo = jsonencode({
    engine    = "postgres"
    host      = aws_db_instance.replica[0].address
    port      = aws_db_instance.replica[0].port
    dbname    = var.db_name
    username  = local.db_replica_username
    password  = ephemeral.aws_secretsmanager_random_password.db_replica[0].random_password
    masterarn = local.db_master_secret_arn
  })
  secret_string_wo_version = var.db_app_secret_version
}

# --- The rotation functions -----------------------------------------------------------------------

# AWS's functions, deployed as CloudFormation stacks from the Serverless Application Repository.
# Each runs in the private subnets with the security group below and creates its own execution
# role (AWS's template: read/write only secrets whose rotation names this function, plus
# GetRandomPassword and its network interfaces) and the permission for Secrets Manager to invoke
# it. The extra grants it needs here are the inline policies further down.
resource "aws_serverlessapplicationrepository_cloudformation_stack" "rotation" {
  for_each = local.rotation_functions

  name             = each.value
  application_id   = local.rotation_applications[each.key]
  semantic_version = var.rotation_function_semantic_version
  capabilities     = ["CAPABILITY_IAM", "CAPABILITY_RESOURCE_POLICY"]

  parameters = merge(
    {
      functionName        = each.value
      endpoint            = local.secretsmanager_endpoint
      vpcSubnetIds        = join(",", local.private_subnet_ids)
      vpcSecurityGroupIds = aws_security_group.rotation[0].id
      excludeCharacters   = local.db_password_exclude_characters
    },
    local.rotation_function_parameters[each.key],
  )
}

# The function each stack created, to find its execution role.
data "aws_lambda_function" "rotation" {
  for_each = local.rotation_functions

  function_name = aws_serverlessapplicationrepository_cloudformation_stack.rotation[each.key].outputs["RotationLambdaARN"]
}

locals {
  rotation_lambda_arns = {
    for key, stack in aws_serverlessapplicationrepository_cloudformation_stack.rotation : key => stack.outputs["RotationLambdaARN"]
  }
  # Role name = the last path segment of the function's role ARN.
  rotation_role_names = {
    for key, fn in data.aws_lambda_function.rotation : key => regex("[^/]+$", fn.role)
  }
}

# --- Security group of the functions: PostgreSQL and the AWS APIs, nothing in ---------------

resource "aws_security_group" "rotation" {
  #checkov:skip=CKV2_AWS_5: attached to the rotation functions through the SAR stack's vpcSecurityGroupIds parameter, which checkov cannot follow
  count = length(local.rotation_functions) > 0 ? 1 : 0

  name        = "${local.prefix}-db-rotation"
  description = "Secrets Manager rotation functions: PostgreSQL and the AWS API endpoints out; nothing in"
  vpc_id      = local.vpc_id

  tags = { Name = "${local.prefix}-db-rotation" }
}

resource "aws_vpc_security_group_egress_rule" "rotation_to_db" {
  count = length(local.rotation_functions) > 0 ? 1 : 0

  security_group_id            = aws_security_group.rotation[0].id
  description                  = "PostgreSQL (primary and replica)"
  referenced_security_group_id = aws_security_group.db.id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_vpc_security_group_egress_rule" "rotation_to_endpoints" {
  count = length(local.rotation_functions) > 0 && var.create_vpc_endpoints ? 1 : 0

  security_group_id            = aws_security_group.rotation[0].id
  description                  = "HTTPS to the interface endpoints (Secrets Manager, RDS)"
  referenced_security_group_id = aws_security_group.endpoints[0].id
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
}

# Existing VPC without the stack's endpoints: as for the tasks (network.tf).
resource "aws_vpc_security_group_egress_rule" "rotation_https_anywhere" {
  count = length(local.rotation_functions) > 0 && !var.create_vpc_endpoints ? 1 : 0

  security_group_id = aws_security_group.rotation[0].id
  description       = "HTTPS to AWS APIs through the existing VPC's endpoints or NAT"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_ingress_rule" "db_from_rotation" {
  count = length(local.rotation_functions) > 0 ? 1 : 0

  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from the Secrets Manager rotation functions"
  referenced_security_group_id = aws_security_group.rotation[0].id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_from_rotation" {
  count = length(local.rotation_functions) > 0 && var.create_vpc_endpoints ? 1 : 0

  security_group_id            = aws_security_group.endpoints[0].id
  description                  = "HTTPS from the Secrets Manager rotation functions"
  referenced_security_group_id = aws_security_group.rotation[0].id
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
}

# --- Extra grants of the functions' roles -----------------------------------------------------

# Multi-user function: it logs in with the master secret (masterarn) to set the inactive
# user's password. GetSecretValue on exactly that secret; DescribeSecret there and
# rds:DescribeDBInstances on the stack's instances because, for an RDS-managed master secret
# (no host in it), the function finds the instance from the secret's tags, and for the replica
# secret it checks that the host replicates masterarn's instance. No write to the master secret.
data "aws_iam_policy_document" "rotation_multi_user" {
  count = local.multi_user_rotation ? 1 : 0

  statement {
    sid       = "ReadMasterSecret"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [local.db_master_secret_arn]
  }

  statement {
    sid       = "DescribeTheStacksInstances"
    actions   = ["rds:DescribeDBInstances"]
    resources = local.rotation_db_instance_arns
  }

  dynamic "statement" {
    for_each = local.secrets_kms_key_arns
    content {
      sid       = "SecretsKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["secretsmanager.${local.region}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role_policy" "rotation_multi_user" {
  count = local.multi_user_rotation ? 1 : 0

  name   = "read-master-secret"
  role   = local.rotation_role_names["multi_user"]
  policy = data.aws_iam_policy_document.rotation_multi_user[0].json
}

# Single-user function: AWS's template already covers the secret it rotates; with a customer
# key it also needs that key (write a new version, read it back).
data "aws_iam_policy_document" "rotation_single_user" {
  count = !var.db_master_password_managed_by_rds && length(local.secrets_kms_key_arns) > 0 ? 1 : 0

  statement {
    sid       = "SecretsKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = local.secrets_kms_key_arns

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "rotation_single_user" {
  count = !var.db_master_password_managed_by_rds && length(local.secrets_kms_key_arns) > 0 ? 1 : 0

  name   = "secrets-key"
  role   = local.rotation_role_names["single_user"]
  policy = data.aws_iam_policy_document.rotation_single_user[0].json
}

# --- Rotation schedules ---------------------------------------------------------------------------

# Only once var.bootstrap_completed is true (local.rotate_role_secrets): configuring rotation
# makes Secrets Manager run the function's testSecret step at once, even with
# rotate_immediately = false, and that logs in as commng_app, which only the bootstrap task
# creates (infra/README.md, "First deployment", steps 3-5). The first rotation itself then
# waits for the schedule.
resource "aws_secretsmanager_secret_rotation" "db_app" {
  count = local.rotate_role_secrets && local.app_secret ? 1 : 0

  secret_id           = aws_secretsmanager_secret.db_app[0].id
  rotation_lambda_arn = local.rotation_lambda_arns["multi_user"]
  rotate_immediately  = false

  rotation_rules {
    schedule_expression = var.db_app_secret_rotation_schedule
    duration            = var.db_secret_rotation_window
  }

  depends_on = [aws_secretsmanager_secret_version.db_app, aws_iam_role_policy.rotation_multi_user]
}

resource "aws_secretsmanager_secret_rotation" "db_replica" {
  count = local.rotate_role_secrets && var.db_replica_enabled ? 1 : 0

  secret_id           = aws_secretsmanager_secret.db_replica[0].id
  rotation_lambda_arn = local.rotation_lambda_arns["multi_user"]
  rotate_immediately  = false

  rotation_rules {
    schedule_expression = var.db_app_secret_rotation_schedule
    duration            = var.db_secret_rotation_window
  }

  depends_on = [aws_secretsmanager_secret_version.db_replica, aws_iam_role_policy.rotation_multi_user]
}

resource "aws_secretsmanager_secret_rotation" "db_master_single_user" {
  count = var.db_master_password_managed_by_rds ? 0 : 1

  secret_id           = aws_secretsmanager_secret.db_master[0].id
  rotation_lambda_arn = local.rotation_lambda_arns["single_user"]
  rotate_immediately  = false

  rotation_rules {
    schedule_expression = coalesce(var.db_secret_rotation_schedule, "rate(7 days)")
    duration            = var.db_secret_rotation_window
  }

  depends_on = [aws_secretsmanager_secret_version.db_master, aws_iam_role_policy.rotation_single_user]
}
