# Alarms, all notifying one SNS topic (created here unless var.alarm_sns_topic_arn names one):
#   - a rotation of a DB secret failed (EventBridge, CloudTrail RotationFailed);
#   - the app keeps failing to refresh its DB credentials (log metric on event=refresh_failed);
#   - tasks fail the ALB's /healthz check (a worker that cannot answer), or none passes;
#   - the service answers 5XX (a database outage past DB_OUTAGE_WAIT_MS, among others).

locals {
  create_alarm_topic = var.alarm_sns_topic_arn == null
  alarm_topic_arn    = local.create_alarm_topic ? aws_sns_topic.alarms[0].arn : var.alarm_sns_topic_arn

  # Every CloudWatch alarm of the stack is named "<prefix>-..."; the topic policy allows
  # exactly these to publish.
  alarm_name_prefix = "${local.prefix}-"
}

# --- The topic ----------------------------------------------------------------------------------

# CloudWatch and EventBridge cannot publish to a topic encrypted with the AWS-managed
# aws/sns key, so the topic has its own customer key. The service principals get only what
# publishing needs; who may publish at all is decided by the topic policy below (EventBridge
# does not pass aws:SourceArn to KMS, so the key policy cannot narrow it further).
resource "aws_kms_key" "alarms" {
  count = local.create_alarm_topic ? 1 : 0

  description             = "${local.prefix}: alarm notifications (SNS)"
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
        Sid       = "AlarmPublishersEncrypt"
        Effect    = "Allow"
        Principal = { Service = ["cloudwatch.amazonaws.com", "events.amazonaws.com"] }
        Action    = ["kms:Decrypt", "kms:GenerateDataKey*"]
        Resource  = "*"
      },
    ]
  })
}

resource "aws_kms_alias" "alarms" {
  count = local.create_alarm_topic ? 1 : 0

  name          = "alias/${local.prefix}-alarms"
  target_key_id = aws_kms_key.alarms[0].key_id
}

resource "aws_sns_topic" "alarms" {
  count = local.create_alarm_topic ? 1 : 0

  name              = "${local.prefix}-alarms"
  kms_master_key_id = aws_kms_key.alarms[0].arn
}

data "aws_iam_policy_document" "alarm_topic" {
  count = local.create_alarm_topic ? 1 : 0

  statement {
    sid       = "RotationFailedRule"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms[0].arn]

    principals {
      type        = "Service"
      identifiers = ["events.amazonaws.com"]
    }

    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = [aws_cloudwatch_event_rule.db_secret_rotation_failed.arn]
    }
  }

  statement {
    sid       = "StackAlarms"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms[0].arn]

    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${local.partition}:cloudwatch:${local.region}:${local.account_id}:alarm:${local.alarm_name_prefix}*"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sns:Publish", "sns:Subscribe"]
    resources = [aws_sns_topic.alarms[0].arn]

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

resource "aws_sns_topic_policy" "alarms" {
  count = local.create_alarm_topic ? 1 : 0

  arn    = aws_sns_topic.alarms[0].arn
  policy = data.aws_iam_policy_document.alarm_topic[0].json
}

# --- (a) Rotation of a DB secret failed (master, app, replica) ------------------------------------------------

# The same CloudTrail-delivered event as the rotation-outcome rule in events.tf, only
# RotationFailed, straight to the topic: a failed rotation needs an operator.
resource "aws_cloudwatch_event_rule" "db_secret_rotation_failed" {
  name        = "${local.prefix}-db-secret-rotation-failed"
  description = "Rotation of a ${local.prefix} DB secret (master, app or replica) failed"

  event_pattern = jsonencode({
    source        = ["aws.secretsmanager"]
    "detail-type" = ["AWS Service Event via CloudTrail"]
    detail = {
      eventSource = ["secretsmanager.amazonaws.com"]
      eventName   = ["RotationFailed"]
      additionalEventData = {
        SecretId = local.rotated_secret_arns
      }
    }
  })
}

resource "aws_cloudwatch_event_target" "db_secret_rotation_failed" {
  rule      = aws_cloudwatch_event_rule.db_secret_rotation_failed.name
  target_id = "alarm-topic"
  arn       = local.alarm_topic_arn

  retry_policy {
    maximum_event_age_in_seconds = 86400
    maximum_retry_attempts       = 185
  }

  depends_on = [aws_sns_topic_policy.alarms]
}

# --- (b) Credential refresh keeps failing -------------------------------------------------------

# The app logs JSON lines; a failed pool swap is {"event": "refresh_failed", ...}.
resource "aws_cloudwatch_log_metric_filter" "refresh_failed" {
  name           = "${local.prefix}-refresh-failed"
  log_group_name = aws_cloudwatch_log_group.app.name
  pattern        = "{ $.event = \"refresh_failed\" }"

  metric_transformation {
    name      = "RefreshFailed"
    namespace = "CommNG/${local.prefix}"
    value     = "1"
    unit      = "Count"
  }
}

# One failure can be a blip that the next poll or login repairs; failures in two
# consecutive 5-minute periods mean a worker is stuck on credentials that do not work.
resource "aws_cloudwatch_metric_alarm" "refresh_failed" {
  alarm_name        = "${local.alarm_name_prefix}db-credential-refresh-failing"
  alarm_description = "CommNG workers failed to refresh their DB credentials (log event refresh_failed) in two consecutive 5-minute periods: check the DB secret, its rotation and the app logs."

  namespace           = aws_cloudwatch_log_metric_filter.refresh_failed.metric_transformation[0].namespace
  metric_name         = aws_cloudwatch_log_metric_filter.refresh_failed.metric_transformation[0].name
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 2
  datapoints_to_alarm = 2
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  treat_missing_data  = "notBreaching" # no matching log line: nothing failed

  alarm_actions = [local.alarm_topic_arn]
  ok_actions    = [local.alarm_topic_arn]
}

# --- (c) tasks failing the ALB's health check (/healthz), and 5XX answers ---------------------------

locals {
  target_group_dimensions = {
    TargetGroup  = aws_lb_target_group.app.arn_suffix
    LoadBalancer = aws_lb.main.arn_suffix
  }
}

# A task out of rotation for 3 minutes (health check every 15 s, 3 failures to go
# unhealthy): its worker cannot answer /healthz (the database plays no part in it).
resource "aws_cloudwatch_metric_alarm" "unhealthy_targets" {
  alarm_name        = "${local.alarm_name_prefix}unhealthy-targets"
  alarm_description = "At least one CommNG task has failed the ALB's /healthz check for 3 minutes."

  namespace           = "AWS/ApplicationELB"
  metric_name         = "UnHealthyHostCount"
  dimensions          = local.target_group_dimensions
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"

  alarm_actions = [local.alarm_topic_arn]
  ok_actions    = [local.alarm_topic_arn]
}

# No task ready at all: the service is down. Missing data (no registered target) counts too.
resource "aws_cloudwatch_metric_alarm" "no_healthy_targets" {
  alarm_name        = "${local.alarm_name_prefix}no-healthy-targets"
  alarm_description = "No CommNG task has passed the ALB's /healthz check for 3 minutes: the service is down."

  namespace           = "AWS/ApplicationELB"
  metric_name         = "HealthyHostCount"
  dimensions          = local.target_group_dimensions
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  comparison_operator = "LessThanThreshold"
  threshold           = 1
  treat_missing_data  = "breaching"

  alarm_actions = [local.alarm_topic_arn]
  ok_actions    = [local.alarm_topic_arn]
}

# --- (d) rotation events nobody could handle ----------------------------------------------------

# The tasks answer 5XX for 3 minutes: the database has been away longer than the requests
# wait (DB_OUTAGE_WAIT_MS), or something else fails them. The health check no longer
# reports a database outage (see network.tf), this does.
resource "aws_cloudwatch_metric_alarm" "target_5xx" {
  alarm_name        = "${local.alarm_name_prefix}target-5xx"
  alarm_description = "CommNG tasks answered 5XX for 3 minutes (database unavailable past DB_OUTAGE_WAIT_MS?)."

  namespace           = "AWS/ApplicationELB"
  metric_name         = "HTTPCode_Target_5XX_Count"
  dimensions          = local.target_group_dimensions
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 3
  datapoints_to_alarm = 3
  comparison_operator = "GreaterThanThreshold"
  threshold           = 10
  treat_missing_data  = "notBreaching"

  alarm_actions = [local.alarm_topic_arn]
  ok_actions    = [local.alarm_topic_arn]
}

resource "aws_cloudwatch_metric_alarm" "rotation_events_dead_letters" {
  alarm_name        = "${local.alarm_name_prefix}rotation-events-dead-letters"
  alarm_description = "Rotation events reached the dead-letter queue: workers received them 5 times without finishing a check. Polling still finds the rotation; read the app logs."

  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.rotation_events_dlq.name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"

  alarm_actions = [local.alarm_topic_arn]
  ok_actions    = [local.alarm_topic_arn]
}
