# VPC (two AZs), subnets, VPC endpoints, security groups, flow logs and the public ALB.
#
# Egress choice: no NAT gateway. The private subnets reach AWS only through VPC endpoints
# (Secrets Manager, ECR, CloudWatch Logs as interface endpoints, S3 as a gateway endpoint for
# the ECR layers). The tasks therefore cannot open arbitrary outbound connections, and there
# is no per-AZ NAT cost. Consequence: the image must be in ECR in this region, and any new
# AWS API the app calls needs its endpoint added here.

# --- VPC and subnets: created here, or an existing VPC's (var.existing_vpc_id) -------------

locals {
  create_vpc = var.existing_vpc_id == null

  # Every consumer reads these three, never aws_vpc.main or aws_subnet.* directly, so the
  # stack runs the same in its own VPC and in an existing one.
  vpc_id             = local.create_vpc ? aws_vpc.main[0].id : var.existing_vpc_id
  private_subnet_ids = local.create_vpc ? aws_subnet.private[*].id : var.existing_private_subnet_ids
  public_subnet_ids  = local.create_vpc ? aws_subnet.public[*].id : var.existing_public_subnet_ids

  # Route tables of the private subnets, for the S3 gateway endpoint. In an existing VPC: the
  # table explicitly associated with each subnet, else the VPC's main route table.
  private_route_table_ids = local.create_vpc ? aws_route_table.private[*].id : distinct([
    for id in var.existing_private_subnet_ids :
    try(data.aws_route_tables.existing_private[id].ids[0], data.aws_vpc.existing[0].main_route_table_id)
  ])
}

resource "aws_vpc" "main" {
  # Both attach through local.vpc_id, a conditional checkov's graph does not follow; the
  # python-hcl2 tests assert the wiring (test_own_vpc_has_flow_logs_and_a_closed_default_group).
  #checkov:skip=CKV2_AWS_11: flow logs are aws_flow_log.main (vpc_id = local.vpc_id), created with this VPC
  #checkov:skip=CKV2_AWS_12: the default group is aws_default_security_group.default (no rules), created with this VPC
  count = local.create_vpc ? 1 : 0

  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true # required by interface endpoints with private DNS

  tags = { Name = local.prefix }
}

# The default security group of the VPC allows nothing (nothing uses it). Only in the
# stack's own VPC: an existing VPC's default group belongs to its owner.
resource "aws_default_security_group" "default" {
  count = local.create_vpc ? 1 : 0

  vpc_id = local.vpc_id

  tags = { Name = "${local.prefix}-default-deny" }
}

resource "aws_internet_gateway" "main" {
  count = local.create_vpc ? 1 : 0

  vpc_id = local.vpc_id

  tags = { Name = local.prefix }
}

# Public subnets: only the ALB lives here; nothing gets a public IP automatically.
resource "aws_subnet" "public" {
  count = local.create_vpc ? length(local.azs) : 0

  vpc_id                  = local.vpc_id
  availability_zone       = local.azs[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, 8, count.index)
  map_public_ip_on_launch = false

  tags = { Name = "${local.prefix}-public-${local.azs[count.index]}", Tier = "public" }
}

# Private subnets: ECS tasks, the database and the interface endpoints.
resource "aws_subnet" "private" {
  count = local.create_vpc ? length(local.azs) : 0

  vpc_id            = local.vpc_id
  availability_zone = local.azs[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 8, count.index + 10)

  tags = { Name = "${local.prefix}-private-${local.azs[count.index]}", Tier = "private" }
}

resource "aws_route_table" "public" {
  count = local.create_vpc ? 1 : 0

  vpc_id = local.vpc_id

  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.main[0].id
  }

  tags = { Name = "${local.prefix}-public" }
}

resource "aws_route_table_association" "public" {
  count = local.create_vpc ? length(local.azs) : 0

  subnet_id      = local.public_subnet_ids[count.index]
  route_table_id = aws_route_table.public[0].id
}

# No default route: private traffic stays in the VPC or goes through the endpoints below.
resource "aws_route_table" "private" {
  count = local.create_vpc ? 1 : 0

  vpc_id = local.vpc_id

  tags = { Name = "${local.prefix}-private" }
}

resource "aws_route_table_association" "private" {
  count = local.create_vpc ? length(local.azs) : 0

  subnet_id      = local.private_subnet_ids[count.index]
  route_table_id = aws_route_table.private[0].id
}

# --- Existing VPC: checked at plan time ------------------------------------------------------

data "aws_vpc" "existing" {
  count = local.create_vpc ? 0 : 1

  id = var.existing_vpc_id

  lifecycle {
    postcondition {
      condition     = self.enable_dns_support && self.enable_dns_hostnames
      error_message = "existing_vpc_id must have DNS support and DNS hostnames enabled (private DNS of the interface endpoints, the RDS endpoint name)."
    }
  }
}

data "aws_subnet" "existing" {
  for_each = toset(concat(var.existing_private_subnet_ids, var.existing_public_subnet_ids))

  id = each.value

  lifecycle {
    postcondition {
      condition     = self.vpc_id == var.existing_vpc_id
      error_message = "Every subnet in existing_private_subnet_ids and existing_public_subnet_ids must belong to existing_vpc_id."
    }
  }
}

# Explicit route-table association of each existing private subnet (none: the main table).
data "aws_route_tables" "existing_private" {
  for_each = local.create_vpc || !var.create_vpc_endpoints ? toset([]) : toset(var.existing_private_subnet_ids)

  vpc_id = var.existing_vpc_id

  filter {
    name   = "association.subnet-id"
    values = [each.value]
  }
}

# --- VPC flow logs (the stack's own VPC; an existing VPC's flow logs are its owner's) ---------

resource "aws_cloudwatch_log_group" "flow_logs" {
  count = local.create_vpc ? 1 : 0

  name              = "/vpc/${local.prefix}/flow-logs"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.logs.arn
}

resource "aws_flow_log" "main" {
  count = local.create_vpc ? 1 : 0

  vpc_id          = local.vpc_id
  traffic_type    = "ALL"
  log_destination = aws_cloudwatch_log_group.flow_logs[0].arn
  iam_role_arn    = aws_iam_role.flow_logs[0].arn
}

# --- VPC endpoints ---------------------------------------------------------------------------

locals {
  # Interface endpoints Fargate and the app need without a NAT:
  #   secretsmanager - ECS injects the secrets at start; the app polls the DB secret;
  #   sqs - the app long-polls the rotation-events queue;
  #   ecr.api/ecr.dkr - image pull; logs - the awslogs driver;
  #   rds (app_role mode) - the alternating-users rotation function describes the instances
  #   (credentials.tf).
  interface_endpoints = toset(concat(
    ["secretsmanager", "sqs", "ecr.api", "ecr.dkr", "logs"],
    local.app_role ? ["rds"] : [],
  ))
}

# Every interface endpoint carries a policy, as the S3 one does: only this account's
# principals, on this account's resources. Without it a task could use its own credentials
# through the endpoint to send data to another account's queues, log groups or secrets, which
# the no-NAT egress design is meant to prevent. ResourceAccount "IfExists": calls that name
# no resource (ecr:GetAuthorizationToken before every image pull, the rotation functions'
# secretsmanager:GetRandomPassword) may carry no such key, and cannot reach another
# account's resource anyway.
locals {
  endpoint_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "ThisAccountOnly"
      Effect    = "Allow"
      Principal = "*"
      Action    = "*"
      Resource  = "*"
      Condition = {
        StringEquals         = { "aws:PrincipalAccount" = local.account_id }
        StringEqualsIfExists = { "aws:ResourceAccount" = local.account_id }
      }
    }]
  })
}

resource "aws_vpc_endpoint" "interface" {
  for_each = var.create_vpc_endpoints ? local.interface_endpoints : toset([])

  vpc_id              = local.vpc_id
  service_name        = "com.amazonaws.${local.region}.${each.value}"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = local.private_subnet_ids
  security_group_ids  = [aws_security_group.endpoints[0].id]
  private_dns_enabled = true
  policy              = local.endpoint_policy

  tags = { Name = "${local.prefix}-${each.value}" }
}

# ECR stores image layers in S3; the gateway endpoint only lets the tasks read those layers.
resource "aws_vpc_endpoint" "s3" {
  count = var.create_vpc_endpoints ? 1 : 0

  vpc_id            = local.vpc_id
  service_name      = "com.amazonaws.${local.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = local.private_route_table_ids

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "EcrLayersOnly"
      Effect    = "Allow"
      Principal = "*"
      Action    = ["s3:GetObject"]
      Resource  = ["arn:${local.partition}:s3:::prod-${local.region}-starport-layer-bucket/*"]
    }]
  })

  tags = { Name = "${local.prefix}-s3" }
}

# --- Security groups -------------------------------------------------------------------------
# Rules are separate resources so the groups can reference each other without a cycle.

resource "aws_security_group" "alb" {
  name        = "${local.prefix}-alb"
  description = "Public ALB: HTTPS (and HTTP, redirected) in; the tasks' port out"
  vpc_id      = local.vpc_id

  tags = { Name = "${local.prefix}-alb" }
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each = toset(var.alb_ingress_cidrs)

  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from clients"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_ingress_rule" "alb_http" {
  for_each = toset(var.alb_ingress_cidrs)

  security_group_id = aws_security_group.alb.id
  description       = "HTTP from clients, answered with a redirect to HTTPS"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
}

resource "aws_vpc_security_group_egress_rule" "alb_to_tasks" {
  security_group_id            = aws_security_group.alb.id
  description                  = "Requests and health checks to the tasks"
  referenced_security_group_id = aws_security_group.tasks.id
  ip_protocol                  = "tcp"
  from_port                    = local.container_port
  to_port                      = local.container_port
}

resource "aws_security_group" "tasks" {
  name        = "${local.prefix}-tasks"
  description = "ECS tasks: the ALB in; PostgreSQL and the VPC endpoints out"
  vpc_id      = local.vpc_id

  tags = { Name = "${local.prefix}-tasks" }
}

resource "aws_vpc_security_group_ingress_rule" "tasks_from_alb" {
  security_group_id            = aws_security_group.tasks.id
  description                  = "Requests and health checks from the ALB"
  referenced_security_group_id = aws_security_group.alb.id
  ip_protocol                  = "tcp"
  from_port                    = local.container_port
  to_port                      = local.container_port
}

# Prometheus scrapes each task directly (its private IP, the container port): /metrics is
# blocked at the ALB, and the ALB would spread scrapes over tasks anyway. The app still wants
# the admin Bearer token there (METRICS_PUBLIC=false).
resource "aws_vpc_security_group_ingress_rule" "tasks_from_prometheus_cidr" {
  for_each = toset(var.prometheus_cidr_blocks)

  security_group_id = aws_security_group.tasks.id
  description       = "Prometheus scrape (/metrics) from ${each.value}"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = local.container_port
  to_port           = local.container_port
}

resource "aws_vpc_security_group_ingress_rule" "tasks_from_prometheus_sg" {
  for_each = toset(var.prometheus_security_group_ids)

  security_group_id            = aws_security_group.tasks.id
  description                  = "Prometheus scrape (/metrics) from ${each.value}"
  referenced_security_group_id = each.value
  ip_protocol                  = "tcp"
  from_port                    = local.container_port
  to_port                      = local.container_port
}

resource "aws_vpc_security_group_egress_rule" "tasks_to_db" {
  security_group_id            = aws_security_group.tasks.id
  description                  = "PostgreSQL"
  referenced_security_group_id = aws_security_group.db.id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_vpc_security_group_egress_rule" "tasks_to_endpoints" {
  count = var.create_vpc_endpoints ? 1 : 0

  security_group_id            = aws_security_group.tasks.id
  description                  = "HTTPS to the interface endpoints (Secrets Manager, ECR, Logs)"
  referenced_security_group_id = aws_security_group.endpoints[0].id
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
}

resource "aws_vpc_security_group_egress_rule" "tasks_to_s3" {
  count = var.create_vpc_endpoints ? 1 : 0

  security_group_id = aws_security_group.tasks.id
  description       = "HTTPS to S3 through the gateway endpoint (ECR image layers)"
  prefix_list_id    = aws_vpc_endpoint.s3[0].prefix_list_id
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

# Existing VPC without the stack's endpoints (create_vpc_endpoints = false): the AWS APIs are
# reached through that VPC's own endpoints or its NAT, whose addresses the stack cannot know.
resource "aws_vpc_security_group_egress_rule" "tasks_https_anywhere" {
  count = var.create_vpc_endpoints ? 0 : 1

  security_group_id = aws_security_group.tasks.id
  description       = "HTTPS to AWS APIs through the existing VPC's endpoints or NAT"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_security_group" "db" {
  name        = "${local.prefix}-db"
  description = "PostgreSQL: the tasks and the rotation functions in; nothing out"
  vpc_id      = local.vpc_id

  tags = { Name = "${local.prefix}-db" }
}

resource "aws_vpc_security_group_ingress_rule" "db_from_tasks" {
  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from the ECS tasks"
  referenced_security_group_id = aws_security_group.tasks.id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_security_group" "endpoints" {
  count = var.create_vpc_endpoints ? 1 : 0

  name        = "${local.prefix}-endpoints"
  description = "Interface VPC endpoints: HTTPS from the tasks and the rotation functions"
  vpc_id      = local.vpc_id

  tags = { Name = "${local.prefix}-endpoints" }
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_from_tasks" {
  count = var.create_vpc_endpoints ? 1 : 0

  security_group_id            = aws_security_group.endpoints[0].id
  description                  = "HTTPS from the ECS tasks"
  referenced_security_group_id = aws_security_group.tasks.id
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
}

# --- Application Load Balancer ---------------------------------------------------------------

resource "aws_lb" "main" {
  name               = local.prefix
  internal           = false
  load_balancer_type = "application"
  subnets            = local.public_subnet_ids
  security_groups    = [aws_security_group.alb.id]

  drop_invalid_header_fields = true
  enable_deletion_protection = var.alb_deletion_protection
  # gunicorn's keepalive (75 s) outlasts this, so the ALB always closes idle connections first.
  idle_timeout = 60

  dynamic "access_logs" {
    for_each = var.alb_access_logs_bucket == null ? [] : [var.alb_access_logs_bucket]
    content {
      bucket  = access_logs.value
      prefix  = local.prefix
      enabled = true
    }
  }
}

resource "aws_wafv2_web_acl_association" "alb" {
  count = var.waf_web_acl_arn == null ? 0 : 1

  resource_arn = aws_lb.main.arn
  web_acl_arn  = var.waf_web_acl_arn
}

resource "aws_lb_target_group" "app" {
  name        = "${local.prefix}-app"
  vpc_id      = local.vpc_id
  target_type = "ip" # Fargate (awsvpc) tasks register by IP
  protocol    = "HTTP"
  port        = local.container_port

  # Stop routing to a task this long before ECS sends it SIGTERM; gunicorn then has its
  # graceful_timeout (25 s) to finish in-flight requests.
  deregistration_delay = 30

  # Liveness, not readiness. /readyz fails on every task at once while the database is down
  # (a failover, a restart), and ECS replaces tasks that fail their load balancer health
  # check: any outage longer than about 45 s would restart the whole fleet, which then comes
  # back at once. /healthz fails only when the worker cannot answer at all. While the
  # database is away the tasks stay, wait it out (DB_OUTAGE_WAIT_MS) and answer 503 with
  # Retry-After past it; the 5XX alarm (alarms.tf) reports the outage instead. docs/faults.md.
  health_check {
    path                = "/healthz"
    protocol            = "HTTP"
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.main.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.alb_ssl_policy
  certificate_arn   = var.acm_certificate_arn

  # HSTS for the whole site, set by the ALB on every response (the app's own, fixed ones
  # and redirects alike), not only on /admin's.
  routing_http_response_strict_transport_security_header_value = "max-age=31536000; includeSubDomains"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.app.arn
  }
}

# Prometheus metrics are for the internal scraper, not for the internet.
resource "aws_lb_listener_rule" "block_metrics" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 10

  condition {
    path_pattern {
      values = ["/metrics", "/metrics/*"]
    }
  }

  action {
    type = "fixed-response"
    fixed_response {
      content_type = "text/plain"
      message_body = "Not Found"
      status_code  = "404"
    }
  }
}

# The admin page and API (/admin*) answer only to var.admin_allowed_cidrs; to everyone else
# the ALB itself answers 404, before the app's token check. With the list empty (default)
# only the 404 rule exists: nobody reaches /admin through the ALB.
resource "aws_lb_listener_rule" "admin_allowed" {
  count = length(var.admin_allowed_cidrs) > 0 ? 1 : 0

  listener_arn = aws_lb_listener.https.arn
  priority     = 20

  condition {
    path_pattern {
      values = ["/admin*"]
    }
  }

  condition {
    source_ip {
      values = var.admin_allowed_cidrs
    }
  }

  action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.app.arn
  }
}

resource "aws_lb_listener_rule" "admin_denied" {
  listener_arn = aws_lb_listener.https.arn
  priority     = 21

  condition {
    path_pattern {
      values = ["/admin*"]
    }
  }

  action {
    type = "fixed-response"
    fixed_response {
      content_type = "text/plain"
      message_body = "Not Found"
      status_code  = "404"
    }
  }
}

resource "aws_lb_listener" "http" {
  load_balancer_arn = aws_lb.main.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"
    redirect {
      protocol    = "HTTPS"
      port        = "443"
      status_code = "HTTP_301"
    }
  }
}
