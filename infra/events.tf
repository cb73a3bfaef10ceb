# Rotation of the service's DB secrets (DB_SECRET_ID, and DB_REPLICA_SECRET_ID if any) as events: EventBridge rules -> an SQS queue that the app
# consumes (DB_ROTATION_QUEUE_URL): the worker that receives an event checks the secret at
# once and tells the other workers with NOTIFY. What no worker could handle lands in a
# dead-letter queue.

# Native Secrets Manager event (no CloudTrail needed): a staging label other than
# AWSPENDING/AWSPREVIOUS moved to a new version. AWSCURRENT moving is "the new password is
# now the current one"; `resources` carries the secret's ARN.
# None with IAM authentication and no replica (var.db_auth): the service reads no secret then.
resource "aws_cloudwatch_event_rule" "db_secret_current_updated" {
  count = local.service_reads_secrets ? 1 : 0

  name        = "${local.prefix}-db-secret-current-updated"
  description = "AWSCURRENT of a ${local.prefix} DB secret the service reads moved to a new version"

  event_pattern = jsonencode({
    source        = ["aws.secretsmanager"]
    "detail-type" = ["Secret Label Updated"]
    resources     = local.service_secret_arns
    detail = {
      labelUpdated = ["AWSCURRENT"]
    }
  })
}

# Rotation outcome, from CloudTrail (needs CloudTrail management events, which every account
# records by default into its event history). RotationSucceeded is the end of a rotation;
# RotationFailed/RotationAbandoned need an operator.
resource "aws_cloudwatch_event_rule" "db_secret_rotation_outcome" {
  count = local.service_reads_secrets ? 1 : 0

  name        = "${local.prefix}-db-secret-rotation-outcome"
  description = "Rotation of a ${local.prefix} DB secret the service reads succeeded, failed or was abandoned"

  event_pattern = jsonencode({
    source        = ["aws.secretsmanager"]
    "detail-type" = ["AWS Service Event via CloudTrail"]
    detail = {
      eventSource = ["secretsmanager.amazonaws.com"]
      eventName   = ["RotationSucceeded", "RotationFailed", "RotationAbandoned"]
      additionalEventData = {
        SecretId = local.service_secret_arns
      }
    }
  })
}

locals {
  rotation_event_rules = local.service_reads_secrets ? {
    current_updated  = aws_cloudwatch_event_rule.db_secret_current_updated[0]
    rotation_outcome = aws_cloudwatch_event_rule.db_secret_rotation_outcome[0]
  } : {}
}

# SSE-SQS (service-owned key): EventBridge can deliver to it with no key policy to maintain;
# the events carry the secret's name and version id, never its value.
resource "aws_sqs_queue" "rotation_events" {
  name                      = "${local.prefix}-db-secret-rotation-events"
  sqs_managed_sse_enabled   = true
  message_retention_seconds = 1209600 # 14 days, the maximum: rotations are weekly
  receive_wait_time_seconds = 20
  # A worker deletes a message once its check ran; one that died mid-check lets the message
  # come back to another worker after this long.
  visibility_timeout_seconds = 60
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.rotation_events_dlq.arn
    maxReceiveCount     = 5
  })
}

# Messages received 5 times without being deleted (every worker crashed on them).
resource "aws_sqs_queue" "rotation_events_dlq" {
  name                      = "${local.prefix}-db-secret-rotation-events-dlq"
  sqs_managed_sse_enabled   = true
  message_retention_seconds = 1209600
}

resource "aws_sqs_queue_redrive_allow_policy" "rotation_events_dlq" {
  queue_url = aws_sqs_queue.rotation_events_dlq.id
  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.rotation_events.arn]
  })
}

data "aws_iam_policy_document" "rotation_events_queue" {
  # Only these two rules may send, and only through EventBridge (nobody without them).
  dynamic "statement" {
    for_each = local.service_reads_secrets ? [[for rule in local.rotation_event_rules : rule.arn]] : []
    content {
      sid       = "EventBridgeRotationRulesOnly"
      actions   = ["sqs:SendMessage"]
      resources = [aws_sqs_queue.rotation_events.arn]

      principals {
        type        = "Service"
        identifiers = ["events.amazonaws.com"]
      }

      condition {
        test     = "ArnEquals"
        variable = "aws:SourceArn"
        values   = statement.value
      }
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sqs:*"]
    resources = [aws_sqs_queue.rotation_events.arn]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_sqs_queue_policy" "rotation_events" {
  queue_url = aws_sqs_queue.rotation_events.id
  policy    = data.aws_iam_policy_document.rotation_events_queue.json
}

resource "aws_cloudwatch_event_target" "rotation_events" {
  for_each = local.rotation_event_rules

  rule      = each.value.name
  target_id = "sqs"
  arn       = aws_sqs_queue.rotation_events.arn

  retry_policy {
    maximum_event_age_in_seconds = 86400
    maximum_retry_attempts       = 185
  }

  depends_on = [aws_sqs_queue_policy.rotation_events]
}
