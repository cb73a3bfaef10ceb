# `terraform test`: plans the whole configuration against a mocked AWS provider, offline (no
# credentials, no API call), in the stack's own VPC and in an existing one, and checks that a
# bad combination of variables fails validation. Run by tests/test_terraform_plan.py (so by
# scripts/lint-infra.sh) after `terraform init -backend=false`.

mock_provider "aws" {
  # Data sources whose values the configuration parses or compares.
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}" }
  }
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_region" {
    defaults = { name = "us-east-1" }
  }
  mock_data "aws_vpc" {
    defaults = { enable_dns_support = true, enable_dns_hostnames = true, main_route_table_id = "rtb-0main" }
  }
  mock_data "aws_subnet" {
    defaults = { vpc_id = "vpc-0123456789abcdef0" }
  }
  mock_data "aws_route_tables" {
    defaults = { ids = [] }
  }
}

variables {
  container_image     = "123456789012.dkr.ecr.us-east-1.amazonaws.com/commng@sha256:0000000000000000000000000000000000000000000000000000000000000000"
  acm_certificate_arn = "arn:aws:acm:us-east-1:123456789012:certificate/00000000-0000-0000-0000-000000000000"
}

run "own_vpc" {
  command = plan

  assert {
    condition     = length(aws_vpc.main) == 1 && length(aws_subnet.private) == 2 && length(aws_subnet.public) == 2
    error_message = "Without existing_vpc_id the stack creates its VPC and two subnets of each tier."
  }
  assert {
    condition     = length(aws_vpc_endpoint.interface) == 4 && length(aws_vpc_security_group_egress_rule.tasks_https_anywhere) == 0
    error_message = "The stack's own VPC reaches AWS through its endpoints only."
  }
}

run "existing_vpc" {
  command = plan

  variables {
    existing_vpc_id             = "vpc-0123456789abcdef0"
    existing_private_subnet_ids = ["subnet-0a000000000000000", "subnet-0b000000000000000"]
    existing_public_subnet_ids  = ["subnet-1a000000000000000", "subnet-1b000000000000000"]
  }

  assert {
    condition     = length(aws_vpc.main) == 0 && length(aws_subnet.private) == 0 && length(aws_flow_log.main) == 0
    error_message = "With existing_vpc_id the stack creates no VPC, subnets or flow logs."
  }
  assert {
    condition     = aws_security_group.tasks.vpc_id == "vpc-0123456789abcdef0" && aws_lb_target_group.app.vpc_id == "vpc-0123456789abcdef0"
    error_message = "Security groups and the target group go into the existing VPC."
  }
  assert {
    condition     = tolist(aws_ecs_service.app.network_configuration[0].subnets) == tolist(["subnet-0a000000000000000", "subnet-0b000000000000000"])
    error_message = "The service runs in the existing private subnets."
  }
  assert {
    condition     = tolist(aws_lb.main.subnets) == tolist(["subnet-1a000000000000000", "subnet-1b000000000000000"])
    error_message = "The ALB uses the existing public subnets."
  }
  assert {
    # The mocked subnets have no explicit route-table association: the main table is used.
    condition     = tolist(aws_vpc_endpoint.s3[0].route_table_ids) == tolist(["rtb-0main"])
    error_message = "The S3 gateway endpoint goes on the private subnets' route tables."
  }
}

run "existing_vpc_without_endpoints" {
  command = plan

  variables {
    existing_vpc_id             = "vpc-0123456789abcdef0"
    existing_private_subnet_ids = ["subnet-0a000000000000000", "subnet-0b000000000000000"]
    existing_public_subnet_ids  = ["subnet-1a000000000000000", "subnet-1b000000000000000"]
    create_vpc_endpoints        = false
  }

  assert {
    condition     = length(aws_vpc_endpoint.interface) == 0 && length(aws_vpc_endpoint.s3) == 0 && length(aws_security_group.endpoints) == 0
    error_message = "create_vpc_endpoints = false creates no endpoint."
  }
  assert {
    condition     = length(aws_vpc_security_group_egress_rule.tasks_https_anywhere) == 1
    error_message = "Without the stack's endpoints the tasks need HTTPS egress."
  }
}

run "existing_vpc_without_subnets_fails" {
  command = plan

  variables {
    existing_vpc_id = "vpc-0123456789abcdef0"
  }

  expect_failures = [var.existing_private_subnet_ids, var.existing_public_subnet_ids]
}

run "subnets_without_existing_vpc_fail" {
  command = plan

  variables {
    existing_private_subnet_ids = ["subnet-0a000000000000000", "subnet-0b000000000000000"]
  }

  expect_failures = [var.existing_private_subnet_ids]
}

run "own_vpc_without_endpoints_fails" {
  command = plan

  variables {
    create_vpc_endpoints = false
  }

  expect_failures = [var.create_vpc_endpoints]
}
