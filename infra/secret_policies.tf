# Resource policies on the stack's own secrets: GetSecretValue is denied to every principal
# but the secret's readers (the roles below), its rotation function and
# var.secret_admin_role_arns. IAM already limits the stack's roles; this also stops any other
# identity in the account whose IAM policy happens to allow secretsmanager:* on "*".
#
# Opt-in (var.secret_admin_role_arns non-null): Terraform itself reads each secret version
# back (GetSecretValue) on every plan, and operators read the tokens (infra/README.md), so the
# roles that apply the stack and that operate it must be listed, or they are locked out.
# aws:PrincipalArn is the role's ARN for an assumed-role session. RDS's own master secret
# ("rds!db-...") is RDS's to manage and gets none.

locals {
  secret_policies_enabled = var.secret_admin_role_arns != null

  rotation_role_arns = { for key, fn in data.aws_lambda_function.rotation : key => fn.role }

  # Secret (by name) -> the roles that read it at runtime, besides the admins.
  multi_user_role = lookup(local.rotation_role_arns, "multi_user", "")
  secret_readers = {
    admin_token   = [aws_iam_role.task.arn]
    metrics_token = [aws_iam_role.task.arn]
    db_app        = compact([aws_iam_role.task.arn, aws_iam_role.migrate.arn, local.multi_user_role])
    db_replica    = compact([aws_iam_role.task.arn, aws_iam_role.migrate.arn, local.multi_user_role])
    # The service reads the master secret only in master mode.
    db_master = compact([
      local.app_role ? "" : aws_iam_role.task.arn,
      aws_iam_role.migrate.arn,
      local.multi_user_role,
      lookup(local.rotation_role_arns, "single_user", ""),
    ])
  }

  # Keyed by a name known at plan time (for_each cannot take the ARNs).
  secret_policy_targets = local.secret_policies_enabled ? merge(
    { admin_token = aws_secretsmanager_secret.admin_token.arn, metrics_token = aws_secretsmanager_secret.metrics_token.arn },
    local.app_secret ? { db_app = aws_secretsmanager_secret.db_app[0].arn } : {},
    var.db_replica_enabled ? { db_replica = aws_secretsmanager_secret.db_replica[0].arn } : {},
    var.db_master_password_managed_by_rds ? {} : { db_master = aws_secretsmanager_secret.db_master[0].arn },
  ) : {}
}

data "aws_iam_policy_document" "secret" {
  for_each = local.secret_policy_targets

  statement {
    sid       = "OnlyItsReaders"
    effect    = "Deny"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [each.value] # this secret ("*" in a secret's policy means the same)

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "StringNotEquals"
      variable = "aws:PrincipalArn"
      values   = concat(local.secret_readers[each.key], coalesce(var.secret_admin_role_arns, []))
    }
  }
}

resource "aws_secretsmanager_secret_policy" "secret" {
  for_each = local.secret_policy_targets

  secret_arn = each.value
  policy     = data.aws_iam_policy_document.secret[each.key].json
}
