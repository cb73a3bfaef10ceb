# Values operators and CI need after `terraform apply`.

output "alb_dns_name" {
  description = "DNS name of the ALB; point the service's DNS record (alias) at it."
  value       = aws_lb.main.dns_name
}

output "alb_zone_id" {
  description = "Hosted zone id of the ALB, for a Route 53 alias record."
  value       = aws_lb.main.zone_id
}

output "ecs_cluster_name" {
  description = "ECS cluster name (for `aws ecs update-service --force-new-deployment`)."
  value       = aws_ecs_cluster.main.name
}

output "ecs_service_name" {
  description = "ECS service name."
  value       = aws_ecs_service.app.name
}

output "db_endpoint" {
  description = "Hostname of the database (POSTGRES_HOST)."
  value       = aws_db_instance.main.address
}

output "db_secret_arn" {
  description = "ARN of the RDS-managed master secret (DB_SECRET_ID). Rotate now with: aws secretsmanager rotate-secret --secret-id <this>"
  value       = local.db_secret_arn
}

output "admin_token_secret_arn" {
  description = "ARN of the ADMIN_TOKEN secret. Terraform does not set its value: put-secret-value before the first deploy."
  value       = aws_secretsmanager_secret.admin_token.arn
}

output "rotation_events_queue_url" {
  description = "URL of the SQS queue receiving the DB secret's rotation events."
  value       = aws_sqs_queue.rotation_events.url
}

output "rotation_events_queue_arn" {
  description = "ARN of the SQS queue receiving the DB secret's rotation events."
  value       = aws_sqs_queue.rotation_events.arn
}

output "log_group_name" {
  description = "CloudWatch log group of the application."
  value       = aws_cloudwatch_log_group.app.name
}

output "task_role_arn" {
  description = "IAM role the application runs as (reads the DB secret)."
  value       = aws_iam_role.task.arn
}

output "execution_role_arn" {
  description = "IAM role of the ECS agent (image pull, logs, secrets injected at start)."
  value       = aws_iam_role.execution.arn
}

output "vpc_id" {
  description = "VPC of the stack (created, or existing_vpc_id)."
  value       = local.vpc_id
}

output "private_subnet_ids" {
  description = "Private subnets of the tasks, the database and the endpoints."
  value       = local.private_subnet_ids
}

output "public_subnet_ids" {
  description = "Public subnets of the ALB."
  value       = local.public_subnet_ids
}

output "tasks_security_group_id" {
  description = "Security group of the ECS tasks (the service's, and the one a one-off task such as the migration must use)."
  value       = aws_security_group.tasks.id
}
