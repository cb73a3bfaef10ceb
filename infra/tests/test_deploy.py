"""python-hcl2 assertions for the edge, the first apply and the supply chain (issue 24).

Same model as test_terraform.py (``_load``, ``_container``, ...); kept apart to keep each file
to one subject.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_terraform import _container, _load, _resolve, _role_documents, _statements

INFRA = Path(__file__).resolve().parents[1]
README = (INFRA / "README.md").read_text()


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    return _load()


def _env(tf: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(tf)["environment"]}


def _hcl_regex(condition: str) -> re.Pattern[str]:
    """The pattern of the first ``regex("...", ...)`` in a validation condition, unescaped."""
    match = re.search(r'regex\("((?:[^"\\]|\\.)*)"', condition)
    assert match, condition
    return re.compile(match.group(1).replace("\\\\", "\\"))


# --- 1, 2, 3: the edge ------------------------------------------------------------------------


def test_the_app_checks_the_admin_cidrs_again_behind_one_trusted_proxy(tf):
    env = _env(tf)
    assert env["ADMIN_ALLOWED_CIDRS"] == (
        'length(var.admin_allowed_cidrs) > 0 ? join(",", var.admin_allowed_cidrs) : "none"'
    )
    assert env["TRUSTED_PROXIES"] == "1"
    # The ALB rules stay, as defence in depth.
    assert ("aws_lb_listener_rule", "admin_denied") in tf["resource"]
    assert ("aws_lb_listener_rule", "block_metrics") in tf["resource"]


def test_metrics_has_its_own_generated_write_only_token(tf):
    password = tf["ephemeral"][("aws_secretsmanager_random_password", "metrics_token")]
    assert password["exclude_punctuation"] is True
    assert password["password_length"] >= 32
    version = tf["resource"][("aws_secretsmanager_secret_version", "metrics_token")]
    assert (
        version["secret_string_wo"]
        == "ephemeral.aws_secretsmanager_random_password.metrics_token.random_password"
    )
    assert version["secret_string_wo_version"] == "var.metrics_token_version"
    assert "secret_string" not in version
    env = _env(tf)
    assert env["METRICS_TOKEN_SECRET_ID"] == "aws_secretsmanager_secret.metrics_token.arn"
    assert env["METRICS_TOKEN_SECRET_ID"] != env["ADMIN_TOKEN_SECRET_ID"]
    assert env["METRICS_TOKEN_VERSION"].endswith(
        "aws_secretsmanager_secret_version.metrics_token.secret_string_wo_version)"
    )
    service = tf["resource"][("aws_ecs_service", "app")]
    assert "aws_secretsmanager_secret_version.metrics_token" in service["depends_on"]
    assert tf["output"]["metrics_token_secret_arn"]["value"] == "aws_secretsmanager_secret.metrics_token.arn"


def test_the_listener_sets_hsts_for_the_whole_site_with_a_tls13_policy(tf):
    listener = tf["resource"][("aws_lb_listener", "https")]
    assert listener["routing_http_response_strict_transport_security_header_value"] == (
        "max-age=31536000; includeSubDomains"
    )
    assert listener["ssl_policy"] == "var.alb_ssl_policy"
    policy = tf["variable"]["alb_ssl_policy"]
    assert policy["default"] == "ELBSecurityPolicy-TLS13-1-2-Res-2021-06"
    pattern = _hcl_regex(policy["validation"][0]["condition"])
    assert pattern.search("ELBSecurityPolicy-TLS13-1-2-Res-2021-06")
    assert not pattern.search("ELBSecurityPolicy-2016-08")
    assert not pattern.search("ELBSecurityPolicy-TLS-1-2-2017-01")


# --- 4, 5, 6: the first apply -------------------------------------------------------------------


def test_the_rotation_functions_get_the_master_secret_and_the_customer_key(tf):
    params = tf["locals"]["rotation_function_parameters"]
    compact = re.sub(r"\s+", "", params["multi_user"])
    assert "{masterSecretArn=local.db_master_secret_arn}" in compact
    assert "kmsKeyArn=var.master_user_secret_kms_key_id" in compact
    assert "masterSecretKmsKeyArn=var.master_user_secret_kms_key_id" in compact
    assert "var.master_user_secret_kms_key_id==null?{}:" in compact
    assert "kmsKeyArn=var.master_user_secret_kms_key_id" in re.sub(r"\s+", "", params["single_user"])
    stack = tf["resource"][("aws_serverlessapplicationrepository_cloudformation_stack", "rotation")]
    assert "excludeCharacters = local.db_password_exclude_characters" in stack["parameters"]
    assert stack["semantic_version"] == "var.rotation_function_semantic_version"
    for arn in tf["locals"]["rotation_applications"].values():
        assert arn.startswith("arn:${local.partition}:serverlessrepo:"), arn


def test_the_rotation_functions_version_is_pinned_and_null_is_refused(tf):
    variable = tf["variable"]["rotation_function_semantic_version"]
    assert "default" not in variable  # required
    (validation,) = variable["validation"]
    assert "var.rotation_function_semantic_version != null" in validation["condition"]
    pattern = _hcl_regex(validation["condition"])
    assert pattern.search("1.2.3")
    assert not pattern.search("latest")
    assert not pattern.search("1.2")


def test_role_secrets_rotate_and_the_service_runs_only_after_the_bootstrap(tf):
    variable = tf["variable"]["bootstrap_completed"]
    assert variable["default"] is False
    assert tf["locals"]["rotate_role_secrets"] == "local.app_role && var.bootstrap_completed"
    r = tf["resource"]
    assert r[("aws_secretsmanager_secret_rotation", "db_app")]["count"] == (
        "local.rotate_role_secrets && local.app_secret ? 1 : 0"
    )
    assert r[("aws_secretsmanager_secret_rotation", "db_replica")]["count"] == (
        "local.rotate_role_secrets && var.db_replica_enabled ? 1 : 0"
    )
    # The master secret's login exists from the start: its rotation does not wait.
    assert r[("aws_secretsmanager_secret_rotation", "db_master_single_user")]["count"] == (
        "var.db_master_password_managed_by_rds ? 0 : 1"
    )
    service = r[("aws_ecs_service", "app")]
    assert service["desired_count"] == "var.bootstrap_completed ? var.desired_count : 0"


def test_the_readme_gives_the_first_deployment_as_numbered_steps_in_order(tf):
    steps = re.findall(r"^(\d+)\. \*\*(.+?)\*\*", README, re.MULTILINE)
    titles = [title for _, title in steps]
    numbers = [int(n) for n, _ in steps[: len(titles)]]
    first = titles.index("Build and push the image")
    order = [
        "Build and push the image",
        "First apply, with `bootstrap_completed = false`",
        "Run the migration task",
        "Second apply, with `bootstrap_completed = true`",
    ]
    assert titles[first : first + 4] == order
    assert numbers[first : first + 4] == [1, 2, 3, 4]
    assert "bootstrap_completed = false" in README
    assert "--build-arg RDS_CA_BUNDLE_SHA256=" in README
    assert "list-application-versions" in README


# --- 7: first-run papercuts -------------------------------------------------------------------


def test_name_and_environment_fit_the_alb_and_target_group_name_limit(tf):
    conditions = [v["condition"] for v in tf["variable"]["environment"]["validation"]]
    assert any('length("${var.name}-${var.environment}-app") <= 32' in c for c in conditions)
    assert tf["resource"][("aws_lb", "main")]["name"] == "local.prefix"
    assert tf["resource"][("aws_lb_target_group", "app")]["name"] == "${local.prefix}-app"
    assert tf["locals"]["prefix"] == "${var.name}-${var.environment}"


def test_rds_log_groups_exist_first_with_retention_and_the_logs_key(tf):
    groups = tf["resource"][("aws_cloudwatch_log_group", "db")]
    assert groups["for_each"] == "local.db_log_groups"
    assert groups["retention_in_days"] == "var.log_retention_days"
    assert groups["kms_key_id"] == "aws_kms_key.logs.arn"
    compact = re.sub(r"\s+", "", tf["locals"]["db_log_groups"])
    assert '"/aws/rds/instance/${local.prefix}/${log}"' in compact
    assert '"/aws/rds/instance/${local.prefix}-replica/${log}"' in compact
    for name in ("main", "replica"):
        instance = tf["resource"][("aws_db_instance", name)]
        assert instance["enabled_cloudwatch_logs_exports"] == "local.db_log_exports"
        assert instance["depends_on"] == ["aws_cloudwatch_log_group.db"]
    key_policy = tf["resource"][("aws_kms_key", "logs")]["policy"]
    assert "log-group:/aws/rds/instance/${local.prefix}/*" in key_policy


# --- 8, 10: least privilege --------------------------------------------------------------------


def test_every_interface_endpoint_admits_only_this_accounts_principals_and_resources(tf):
    endpoint = tf["resource"][("aws_vpc_endpoint", "interface")]
    assert endpoint["policy"] == "local.endpoint_policy"
    policy = re.sub(r"\s+", "", tf["locals"]["endpoint_policy"])
    assert 'StringEquals={"aws:PrincipalAccount"=local.account_id}' in policy
    # IfExists: ecr:GetAuthorizationToken and GetRandomPassword name no resource.
    assert 'StringEqualsIfExists={"aws:ResourceAccount"=local.account_id}' in policy
    assert 'Effect="Allow"' in policy
    assert "Deny" not in policy


@pytest.mark.parametrize(
    ("role", "secrets"),
    [
        ("task", "concat(local.service_secret_arns, local.token_secret_arns)"),
        ("migrate", "local.migration_secret_arns"),
    ],
)
def test_kms_decrypt_is_bound_to_the_secrets_the_role_reads(tf, role, secrets):
    kms = [s for doc in _role_documents(tf, role) for s in _statements(doc) if "kms:Decrypt" in s["actions"]]
    assert kms, role
    for statement in kms:
        conditions = {c["variable"]: c for c in statement["condition"]}
        context = conditions["kms:EncryptionContext:SecretARN"]
        assert context["test"] == "StringEquals"
        assert context["values"] == secrets


# --- 11: the supply chain ---------------------------------------------------------------------


def test_container_image_must_be_a_digest_reference(tf):
    variable = tf["variable"]["container_image"]
    pattern = _hcl_regex(variable["validation"][0]["condition"])
    digest = "a" * 64
    assert pattern.search(f"123456789012.dkr.ecr.us-east-1.amazonaws.com/commng@sha256:{digest}")
    assert pattern.search(f"123456789012.dkr.ecr.us-east-1.amazonaws.com/commng:v1@sha256:{digest}")
    for image in (
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/commng:latest",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com/commng@sha256:" + "A" * 64,
        "commng@sha256:" + digest[:63],
        f"commng@sha256:{digest} ",
    ):
        assert not pattern.search(image), image


def test_the_task_definitions_use_the_validated_image(tf):
    assert _resolve(tf, "local.app_container")["image"] == "var.container_image"
    assert tf["locals"]["migrate_container"]["image"] == "var.container_image"
    assert json.dumps(tf["variable"]["container_image"]).count("sha256") >= 2


def test_each_stack_secret_denies_its_value_to_all_but_its_readers_when_admins_are_named(tf):
    document = tf["data"][("aws_iam_policy_document", "secret")]
    (statement,) = document["statement"]
    assert statement["effect"] == "Deny"
    assert statement["actions"] == ["secretsmanager:GetSecretValue"]
    assert statement["principals"] == [{"type": "*", "identifiers": ["*"]}]
    (condition,) = statement["condition"]
    assert (condition["test"], condition["variable"]) == ("StringNotEquals", "aws:PrincipalArn")
    assert (
        condition["values"]
        == "concat(local.secret_readers[each.key], coalesce(var.secret_admin_role_arns, []))"
    )
    policy = tf["resource"][("aws_secretsmanager_secret_policy", "secret")]
    assert policy["for_each"] == document["for_each"] == "local.secret_policy_targets"
    # Every stack-owned secret, and only when the admins (terraform's role, the operators')
    # are named: otherwise terraform's own read-back on plan would be denied.
    targets = re.sub(r"\s+", "", tf["locals"]["secret_policy_targets"])
    assert targets.startswith("local.secret_policies_enabled?merge(")
    for name in ("admin_token", "metrics_token", "db_app", "db_replica", "db_master"):
        assert f"{name}=aws_secretsmanager_secret.{name}" in targets, name
    assert tf["locals"]["secret_policies_enabled"] == "var.secret_admin_role_arns != null"
    readers = tf["locals"]["secret_readers"]
    assert readers["admin_token"] == readers["metrics_token"] == ["aws_iam_role.task.arn"]
    assert "local.multi_user_role" in readers["db_app"]
    assert 'lookup(local.rotation_role_arns, "single_user", "")' in readers["db_master"]
    assert 'local.app_role ? "" : aws_iam_role.task.arn' in readers["db_master"]
    assert (
        tf["locals"]["rotation_role_arns"]
        == "{for key, fn in data.aws_lambda_function.rotation : key => fn.role}"
    )
