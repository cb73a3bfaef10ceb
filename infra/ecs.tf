# ECS Fargate: cluster, log group, the ADMIN_TOKEN secret, task definition and service.

resource "aws_ecs_cluster" "main" {
  name = local.prefix

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_cloudwatch_log_group" "app" {
  name              = "/ecs/${local.prefix}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.logs.arn
}

# Bearer token of the admin API. Terraform creates the secret but never its value, so the
# token stays out of state. Set it once before the first deploy (tasks fail to start with
# ResourceInitializationError until a value exists):
#   aws secretsmanager put-secret-value --secret-id <admin_token_secret_arn output> \
#     --secret-string "$(openssl rand -hex 32)"
# To change it: put a new value, then force a new deployment (it is injected at task start).
resource "aws_secretsmanager_secret" "admin_token" {
  name_prefix             = "${local.prefix}/admin-token-"
  description             = "CommNG ADMIN_TOKEN (value set out of band, see infra/README.md)"
  kms_key_id              = var.master_user_secret_kms_key_id
  recovery_window_in_days = 7
}

locals {
  # Exactly the secrets ECS injects at task start; the execution role may read only these.
  injected_secret_arns = [local.db_secret_arn, aws_secretsmanager_secret.admin_token.arn]

  app_container = {
    name      = "app"
    image     = var.container_image
    essential = true

    portMappings = [{ containerPort = local.container_port, protocol = "tcp" }]

    environment = [
      { name = "AWS_REGION", value = local.region },
      # The app polls this secret itself (task role) and swaps its pool on rotation.
      { name = "DB_SECRET_ID", value = aws_db_instance.main.master_user_secret[0].secret_arn },
      { name = "DB_SECRET_REFRESH_INTERVAL_MS", value = tostring(var.db_secret_refresh_interval_ms) },
      { name = "DB_POOL_GRACE_PERIOD_MS", value = tostring(var.db_pool_grace_period_ms) },
      { name = "POSTGRES_HOST", value = aws_db_instance.main.address },
      { name = "POSTGRES_PORT", value = tostring(aws_db_instance.main.port) },
      { name = "POSTGRES_DB", value = var.db_name },
      { name = "POSTGRES_SSL", value = "true" },
      { name = "POSTGRES_POOL_SIZE", value = tostring(var.postgres_pool_size) },
      { name = "PORT", value = tostring(local.container_port) },
      { name = "WEB_CONCURRENCY", value = tostring(var.web_concurrency) },
      { name = "LOG_LEVEL", value = var.log_level },
      { name = "LOG_FORMAT", value = "json" },
    ]

    # ECS resolves these ONCE, when the task starts. After a rotation the injected
    # POSTGRES_PASSWORD is stale for the rest of the task's life; that is why the app does
    # not rely on it but polls DB_SECRET_ID (and re-reads it when a login fails). They
    # remain as the credentials of the very first connection and as a fallback.
    secrets = [
      { name = "POSTGRES_USER", valueFrom = "${local.db_secret_arn}:username::" },
      { name = "POSTGRES_PASSWORD", valueFrom = "${local.db_secret_arn}:password::" },
      { name = "ADMIN_TOKEN", valueFrom = aws_secretsmanager_secret.admin_token.arn },
    ]

    # Liveness. The slim image has no curl, so Python's urllib does the request; urlopen
    # raises (non-zero exit) on any non-2xx answer or a timeout.
    healthCheck = {
      command = [
        "CMD", "python", "-c",
        "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)",
      ]
      interval    = 15
      timeout     = 5
      retries     = 3
      startPeriod = 30
    }

    # SIGTERM, then SIGKILL after 30 s: gunicorn's graceful_timeout is 25 s.
    stopTimeout = 30

    # The root filesystem is read-only; /tmp (Prometheus multiprocess files, gunicorn's
    # worker heartbeat files) is a task-local volume.
    readonlyRootFilesystem = true
    mountPoints            = [{ sourceVolume = "tmp", containerPath = "/tmp", readOnly = false }]

    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.app.name
        awslogs-region        = local.region
        awslogs-stream-prefix = "app"
      }
    }
  }
}

resource "aws_ecs_task_definition" "app" {
  family                   = local.prefix
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.task_cpu
  memory                   = var.task_memory

  # Two roles on purpose: the execution role is used by the ECS agent (pull, logs, inject
  # secrets at start); the task role is what the application's boto3 runs as.
  execution_role_arn = aws_iam_role.execution.arn
  task_role_arn      = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "tmp"
  }

  container_definitions = jsonencode([local.app_container])
}

resource "aws_ecs_service" "app" {
  name             = local.prefix
  cluster          = aws_ecs_cluster.main.id
  task_definition  = aws_ecs_task_definition.app.arn
  desired_count    = var.desired_count
  launch_type      = "FARGATE"
  platform_version = "LATEST"

  # Rolling deploys never drop below the desired count; a failing deploy rolls back.
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }
  health_check_grace_period_seconds = 60

  enable_execute_command = false
  propagate_tags         = "SERVICE"

  network_configuration {
    subnets          = local.private_subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.app.arn
    container_name   = local.app_container.name
    container_port   = local.container_port
  }

  depends_on = [aws_lb_listener.https, aws_iam_role_policy.execution_secrets]
}
