# Addresses that gained `count` with the existing-VPC option (var.existing_vpc_id) and the
# optional VPC endpoints (var.create_vpc_endpoints). A stack applied before keeps its
# resources: Terraform moves them in the state instead of destroying and recreating them.

moved {
  from = aws_vpc.main
  to   = aws_vpc.main[0]
}

moved {
  from = aws_default_security_group.default
  to   = aws_default_security_group.default[0]
}

moved {
  from = aws_internet_gateway.main
  to   = aws_internet_gateway.main[0]
}

moved {
  from = aws_route_table.public
  to   = aws_route_table.public[0]
}

moved {
  from = aws_route_table.private
  to   = aws_route_table.private[0]
}

moved {
  from = aws_cloudwatch_log_group.flow_logs
  to   = aws_cloudwatch_log_group.flow_logs[0]
}

moved {
  from = aws_flow_log.main
  to   = aws_flow_log.main[0]
}

moved {
  from = aws_iam_role.flow_logs
  to   = aws_iam_role.flow_logs[0]
}

moved {
  from = aws_iam_role_policy.flow_logs
  to   = aws_iam_role_policy.flow_logs[0]
}

moved {
  from = aws_vpc_endpoint.s3
  to   = aws_vpc_endpoint.s3[0]
}

moved {
  from = aws_security_group.endpoints
  to   = aws_security_group.endpoints[0]
}

moved {
  from = aws_vpc_security_group_ingress_rule.endpoints_from_tasks
  to   = aws_vpc_security_group_ingress_rule.endpoints_from_tasks[0]
}

moved {
  from = aws_vpc_security_group_egress_rule.tasks_to_endpoints
  to   = aws_vpc_security_group_egress_rule.tasks_to_endpoints[0]
}

moved {
  from = aws_vpc_security_group_egress_rule.tasks_to_s3
  to   = aws_vpc_security_group_egress_rule.tasks_to_s3[0]
}
