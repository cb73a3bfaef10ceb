"""Assertions on the Terraform in infra/, read with python-hcl2 (no AWS, no terraform binary).

Run by scripts/lint-infra.sh in its own venv (.local/venvs/hcl2): checkov's bc-python-hcl2
installs a module also named ``hcl2`` and would shadow python-hcl2.

python-hcl2 8.x keeps string quotes (``'"app"'``) and wraps expressions in ``${...}``;
``_clean`` turns a parsed file into plain values: ``"app"`` and ``"var.name"``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hcl2
import pytest

INFRA = Path(__file__).resolve().parents[1]
DB = "aws_db_instance.main"
DB_SECRET = f"{DB}.master_user_secret[0].secret_arn"
MASTER_SECRET = "local.db_master_secret_arn"
APP_SECRET = "aws_secretsmanager_secret.db_app[0].arn"
REPLICA_SECRETS = "aws_secretsmanager_secret.db_replica[*].arn"
META_KEYS = {"__is_block__", "__comments__", "__inline_comments__"}


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    if text.startswith("${") and text.endswith("}") and text.count("${") == 1:
        return text[2:-1]
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {_unquote(k): _clean(v) for k, v in value.items() if k not in META_KEYS}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, str):
        return _unquote(value)
    return value


def _load() -> dict[str, Any]:
    model: dict[str, Any] = {
        "resource": {}, "data": {}, "locals": {}, "variable": {}, "output": {}, "terraform": [],
        "ephemeral": {}, "moved": [], "files": {},
    }
    for path in sorted(INFRA.glob("*.tf")):
        with path.open() as handle:
            parsed = _clean(hcl2.load(handle))
        model["files"][path.name] = parsed
        for kind in ("resource", "data", "ephemeral"):
            for block in parsed.get(kind, []):
                for rtype, named in block.items():
                    for name, body in named.items():
                        model[kind][(rtype, name)] = body
        for block in parsed.get("locals", []):
            model["locals"].update(block)
        for block in parsed.get("variable", []):
            model["variable"].update(block)
        for block in parsed.get("output", []):
            model["output"].update(block)
        model["terraform"].extend(parsed.get("terraform", []))
        model["moved"].extend(parsed.get("moved", []))
    return model


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    return _load()


def _resolve(tf: dict[str, Any], expr: Any) -> Any:
    """Replace a bare ``local.x`` (or ``local.x`` inside an interpolation) by its definition."""
    if isinstance(expr, list):
        return [_resolve(tf, e) for e in expr]
    if not isinstance(expr, str):
        return expr
    if expr.startswith("local.") and re.fullmatch(r"local\.\w+", expr):
        return _resolve(tf, tf["locals"][expr.split(".", 1)[1]])
    return re.sub(
        r"\$\{local\.(\w+)\}",
        lambda m: "${" + str(_resolve(tf, tf["locals"][m.group(1)])) + "}",
        expr,
    )


def _resolve_deep(tf: dict[str, Any], expr: Any, depth: int = 0) -> Any:
    """Like _resolve, also for ``local.x`` anywhere inside an expression, to a fixed depth."""
    if isinstance(expr, list):
        return [_resolve_deep(tf, e, depth) for e in expr]
    if not isinstance(expr, str) or depth > 5:
        return expr
    found = re.findall(r"\blocal\.(\w+)", expr)
    if not found:
        return expr
    return [expr] + [_resolve_deep(tf, tf["locals"][n], depth + 1) for n in found if n in tf["locals"]]


def _statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    """All statements of an aws_iam_policy_document, dynamic ones included (with for_each)."""
    found = [dict(s, _dynamic=None) for s in document.get("statement", [])]
    for dyn in document.get("dynamic", []):
        for label, spec in dyn.items():
            if label == "statement":
                for content in spec["content"]:
                    found.append(dict(content, _dynamic=spec["for_each"]))
    return found


def _role_documents(tf: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """Policy documents attached inline (aws_iam_role_policy) to aws_iam_role.<role>."""
    docs = []
    for (rtype, _), body in tf["resource"].items():
        if rtype == "aws_iam_role_policy" and body["role"] == f"aws_iam_role.{role}.id":
            match = re.fullmatch(r"data\.aws_iam_policy_document\.(\w+)(?:\[0\])?\.json", body["policy"])
            assert match, f"inline policy of {role} must come from an aws_iam_policy_document"
            docs.append(tf["data"][("aws_iam_policy_document", match.group(1))])
    return docs


def _container(tf: dict[str, Any], iam: bool = False) -> dict[str, Any]:
    """The service's container; its environment that of db_auth = "secret" (the default), or ``iam``."""
    taskdef = tf["resource"][("aws_ecs_task_definition", "app")]
    assert taskdef["container_definitions"] == "jsonencode([local.app_container])"
    container = dict(tf["locals"]["app_container"])
    assert container["environment"] == (
        "concat(local.app_environment, local.app_login_environment, local.app_replica_environment)"
    )
    assert tf["locals"]["app_login_environment"] == (
        "local.iam_auth ? local.app_iam_login_environment : local.app_secret_login_environment"
    )
    login = tf["locals"]["app_iam_login_environment" if iam else "app_secret_login_environment"]
    container["environment"] = tf["locals"]["app_environment"] + login
    return container


# --- versions ---------------------------------------------------------------------------------


def test_versions(tf):
    (block,) = tf["terraform"]
    # 1.11 for write-only arguments; the AWS provider 5.100 for the ephemeral password.
    assert block["required_version"] == ">= 1.11"
    aws = block["required_providers"][0]["aws"]
    assert aws["source"] == "hashicorp/aws"
    assert aws["version"] == "~> 5.100"


def test_s3_backend_is_partial_and_uses_the_native_lock_file(tf):
    (block,) = tf["terraform"]
    (backend,) = block["backend"]
    assert list(backend) == ["s3"]
    s3 = backend["s3"]
    assert s3["use_lockfile"] is True
    assert s3["encrypt"] is True
    # Partial configuration: everything environment specific comes from -backend-config.
    assert not {"bucket", "key", "region", "dynamodb_table", "profile"} & set(s3)


def test_every_variable_is_documented(tf):
    undocumented = [n for n, v in tf["variable"].items() if not str(v.get("description", "")).strip()]
    assert not undocumented


def test_every_output_is_documented(tf):
    assert all(str(o.get("description", "")).strip() for o in tf["output"].values())


def _strings(value: Any) -> list[str]:
    """Every string (expression or literal) anywhere inside a parsed block."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _validations(tf: dict[str, Any], variable: str) -> list[dict[str, Any]]:
    return tf["variable"][variable].get("validation", [])


# --- network ----------------------------------------------------------------------------------

VPC_OR_SUBNET = re.compile(r"\baws_vpc\.main\b|\baws_subnet\.(private|public)\b")


def test_vpc_and_subnets_come_from_locals_that_switch_to_an_existing_vpc(tf):
    locals_ = tf["locals"]
    assert locals_["create_vpc"] == "var.existing_vpc_id == null"
    assert locals_["vpc_id"] == "local.create_vpc ? aws_vpc.main[0].id : var.existing_vpc_id"
    assert (
        locals_["private_subnet_ids"]
        == "local.create_vpc ? aws_subnet.private[*].id : var.existing_private_subnet_ids"
    )
    assert (
        locals_["public_subnet_ids"]
        == "local.create_vpc ? aws_subnet.public[*].id : var.existing_public_subnet_ids"
    )
    for name in ("existing_vpc_id",):
        assert tf["variable"][name]["default"] is None
    for name in ("existing_private_subnet_ids", "existing_public_subnet_ids"):
        assert tf["variable"][name]["default"] == []
    # The stack's own VPC and everything only it needs exist only when no VPC is given.
    for address in (
        ("aws_vpc", "main"),
        ("aws_default_security_group", "default"),
        ("aws_internet_gateway", "main"),
        ("aws_route_table", "public"),
        ("aws_route_table", "private"),
        ("aws_flow_log", "main"),
        ("aws_cloudwatch_log_group", "flow_logs"),
        ("aws_iam_role", "flow_logs"),
    ):
        assert tf["resource"][address]["count"] == "local.create_vpc ? 1 : 0", address
    for name in ("public", "private"):
        subnet = tf["resource"][("aws_subnet", name)]
        assert subnet["count"] == "local.create_vpc ? length(local.azs) : 0"


def test_own_vpc_has_flow_logs_and_a_closed_default_group(tf):
    """What checkov's CKV2_AWS_11/12 would check, skipped on aws_vpc.main (see network.tf)."""
    flow = tf["resource"][("aws_flow_log", "main")]
    assert flow["count"] == "local.create_vpc ? 1 : 0"
    assert flow["vpc_id"] == "local.vpc_id"
    assert flow["traffic_type"] == "ALL"
    default = tf["resource"][("aws_default_security_group", "default")]
    assert default["count"] == "local.create_vpc ? 1 : 0"
    assert default["vpc_id"] == "local.vpc_id"
    assert not {"ingress", "egress"} & set(default)


def test_no_direct_vpc_or_subnet_reference_outside_the_locals(tf):
    offenders = []
    for filename, parsed in tf["files"].items():
        for kind, blocks in parsed.items():
            if kind in {"locals", "moved"}:
                continue
            offenders += [(filename, kind, s) for s in _strings(blocks) if VPC_OR_SUBNET.search(s)]
    assert not offenders
    # The locals that do name them are exactly the three switches.
    naming = sorted(k for k, v in tf["locals"].items() if any(VPC_OR_SUBNET.search(s) for s in _strings(v)))
    assert naming == ["private_subnet_ids", "public_subnet_ids", "vpc_id"]


def test_consumers_read_the_network_locals(tf):
    r = tf["resource"]
    assert r[("aws_ecs_service", "app")]["network_configuration"][0]["subnets"] == "local.private_subnet_ids"
    assert r[("aws_db_subnet_group", "main")]["subnet_ids"] == "local.private_subnet_ids"
    assert r[("aws_vpc_endpoint", "interface")]["subnet_ids"] == "local.private_subnet_ids"
    assert r[("aws_vpc_endpoint", "s3")]["route_table_ids"] == "local.private_route_table_ids"
    assert r[("aws_lb", "main")]["subnets"] == "local.public_subnet_ids"
    with_vpc = [
        (rtype, name)
        for (rtype, name), body in r.items()
        if "vpc_id" in body and rtype != "aws_flow_log"
    ]
    assert len(with_vpc) >= 9
    assert all(r[a]["vpc_id"] == "local.vpc_id" for a in with_vpc), with_vpc
    assert r[("aws_flow_log", "main")]["vpc_id"] == "local.vpc_id"


def test_half_given_existing_vpc_fails_validation(tf):
    for name in ("existing_private_subnet_ids", "existing_public_subnet_ids"):
        conditions = [v["condition"] for v in _validations(tf, name)]
        assert (
            f"(var.existing_vpc_id == null) == (length(var.{name}) == 0)" in conditions
        ), name
        assert any("length(distinct(var." + name + ")) >= 2" in c for c in conditions), name
    conditions = [v["condition"] for v in _validations(tf, "create_vpc_endpoints")]
    assert conditions == ["var.create_vpc_endpoints || var.existing_vpc_id != null"]


def test_existing_vpc_is_checked_at_plan_time(tf):
    vpc = tf["data"][("aws_vpc", "existing")]
    (post,) = vpc["lifecycle"][0]["postcondition"]
    assert post["condition"] == "self.enable_dns_support && self.enable_dns_hostnames"
    subnet = tf["data"][("aws_subnet", "existing")]
    (post,) = subnet["lifecycle"][0]["postcondition"]
    assert post["condition"] == "self.vpc_id == var.existing_vpc_id"


def test_moved_blocks_keep_a_stack_applied_before_the_existing_vpc_option(tf):
    moves = {m["from"]: m["to"] for m in tf["moved"]}
    for address in ("aws_vpc.main", "aws_route_table.private", "aws_flow_log.main", "aws_vpc_endpoint.s3"):
        assert moves[address] == address + "[0]"
    # Each move lands on a resource that now has a count (no move to a typo).
    counted = {
        f"{rtype}.{name}"
        for (rtype, name), body in tf["resource"].items()
        if str(body.get("count", "")).endswith("? 1 : 0") or str(body.get("count", "")).endswith("? 0 : 1")
    }
    assert set(moves) <= counted


def test_prometheus_may_scrape_the_tasks_on_the_container_port(tf):
    r = tf["resource"]
    by_cidr = r[("aws_vpc_security_group_ingress_rule", "tasks_from_prometheus_cidr")]
    by_sg = r[("aws_vpc_security_group_ingress_rule", "tasks_from_prometheus_sg")]
    assert by_cidr["for_each"] == "toset(var.prometheus_cidr_blocks)"
    assert by_cidr["cidr_ipv4"] == "each.value"
    assert by_sg["for_each"] == "toset(var.prometheus_security_group_ids)"
    assert by_sg["referenced_security_group_id"] == "each.value"
    for rule in (by_cidr, by_sg):
        assert rule["security_group_id"] == "aws_security_group.tasks.id"
        assert rule["ip_protocol"] == "tcp"
        assert rule["from_port"] == rule["to_port"] == "local.container_port"
    for name in ("prometheus_cidr_blocks", "prometheus_security_group_ids"):
        assert tf["variable"][name]["default"] == []
    # Nothing else may reach the tasks' port: the ALB and these two.
    ingress = sorted(
        name
        for (rtype, name), body in r.items()
        if rtype == "aws_vpc_security_group_ingress_rule"
        and body["security_group_id"] == "aws_security_group.tasks.id"
    )
    assert ingress == ["tasks_from_alb", "tasks_from_prometheus_cidr", "tasks_from_prometheus_sg"]


def test_tasks_reach_aws_apis_through_endpoints_or_https_egress(tf):
    r = tf["resource"]
    assert r[("aws_vpc_endpoint", "interface")]["for_each"] == (
        "var.create_vpc_endpoints ? local.interface_endpoints : toset([])"
    )
    assert r[("aws_vpc_endpoint", "s3")]["count"] == "var.create_vpc_endpoints ? 1 : 0"
    anywhere = r[("aws_vpc_security_group_egress_rule", "tasks_https_anywhere")]
    assert anywhere["count"] == "var.create_vpc_endpoints ? 0 : 1"
    assert (anywhere["from_port"], anywhere["to_port"]) == (443, 443)


# --- outputs ----------------------------------------------------------------------------------


def test_outputs_cover_the_readme_commands(tf):
    out = {name: body["value"] for name, body in tf["output"].items()}
    assert out["private_subnet_ids"] == "local.private_subnet_ids"
    assert out["public_subnet_ids"] == "local.public_subnet_ids"
    assert out["vpc_id"] == "local.vpc_id"
    assert out["tasks_security_group_id"] == "aws_security_group.tasks.id"
    assert out["ecs_cluster_name"] == "aws_ecs_cluster.main.name"
    assert out["ecs_service_name"] == "aws_ecs_service.app.name"
    assert out["ecs_task_definition_family"] == "aws_ecs_task_definition.app.family"
    assert out["ecs_task_definition_arn"] == "aws_ecs_task_definition.app.arn"
    assert out["db_secret_arn"] == "local.db_secret_arn"
    assert out["admin_token_secret_arn"] == "aws_secretsmanager_secret.admin_token.arn"
    assert out["aws_region"] == "local.region"
    network = out["migration_network_configuration"]
    assert network == (
        "awsvpcConfiguration={subnets=[${join(\",\", local.private_subnet_ids)}],"
        "securityGroups=[${aws_security_group.tasks.id}],assignPublicIp=DISABLED}"
    )
    assert out["migration_task_definition_arn"] == "aws_ecs_task_definition.migrate.arn"
    assert out["db_app_secret_arn"] == "one(aws_secretsmanager_secret.db_app[*].arn)"
    assert out["db_master_secret_arn"] == "local.db_master_secret_arn"
    # The service's task definition no longer doubles as the migration (its role cannot DDL).
    assert "migration_overrides" not in out


def test_readme_commands_only_use_outputs_that_exist(tf):
    readme = (INFRA / "README.md").read_text()
    used = set(re.findall(r"terraform output (?:-raw |-json )?([a-z0-9_]+)", readme))
    assert {"migration_network_configuration", "migration_task_definition_arn", "admin_token_secret_arn"} <= used
    assert used <= set(tf["output"]), used - set(tf["output"])
    # No placeholder left for a value an output provides.
    assert not re.search(r"<(private-subnet-ids|tasks-sg-id|db_secret_arn|url)>", readme)


# --- database ---------------------------------------------------------------------------------


def test_db_uses_rds_managed_master_password_unless_told_otherwise(tf):
    db = tf["resource"][("aws_db_instance", "main")]
    assert db["manage_master_user_password"] == "var.db_master_password_managed_by_rds ? true : null"
    assert tf["variable"]["db_master_password_managed_by_rds"]["default"] is True
    # Never a password in state: only the write-only argument, from the ephemeral password.
    assert "password" not in db
    assert db["password_wo"] == "one(ephemeral.aws_secretsmanager_random_password.db_master[*].random_password)"
    assert db["password_wo_version"] == (
        "var.db_master_password_managed_by_rds ? null : var.db_master_password_version"
    )
    assert db["master_user_secret_kms_key_id"] == (
        "var.db_master_password_managed_by_rds ? var.master_user_secret_kms_key_id : null"
    )
    assert tf["variable"]["master_user_secret_kms_key_id"]["default"] is None


def test_db_is_private_encrypted_and_protected(tf):
    db = tf["resource"][("aws_db_instance", "main")]
    assert db["storage_encrypted"] is True
    assert db["publicly_accessible"] is False
    assert db["deletion_protection"] == "var.db_deletion_protection"
    assert db["backup_retention_period"] == "var.db_backup_retention_days"
    assert db["parameter_group_name"] == "aws_db_parameter_group.main.name"


def test_parameter_group_forces_ssl(tf):
    params = tf["resource"][("aws_db_parameter_group", "main")]["parameter"]
    assert {"name": "rds.force_ssl", "value": "1"} in params


def test_db_secret_locals_switch_on_the_credentials_mode(tf):
    locals_ = tf["locals"]
    assert locals_["app_role"] == 'var.db_credentials_mode == "app_role"'
    assert locals_["db_master_secret_arn"] == (
        f"var.db_master_password_managed_by_rds ? {DB_SECRET} : aws_secretsmanager_secret.db_master[0].arn"
    )
    # The service's login: the app secret in app_role mode, the master secret in master mode,
    # none with IAM authentication.
    assert locals_["db_secret_arn"] == f"local.iam_auth ? null : (local.app_role ? {APP_SECRET} : {MASTER_SECRET})"
    assert locals_["service_secret_arns"] == (
        f"concat(local.iam_auth ? [] : [local.db_secret_arn], {REPLICA_SECRETS})"
    )


def test_rotation_schedule_targets_the_master_secret_without_lambda(tf):
    rotation = tf["resource"][("aws_secretsmanager_secret_rotation", "db_master")]
    assert rotation["count"] == (
        "var.db_master_password_managed_by_rds && var.db_secret_rotation_schedule != null ? 1 : 0"
    )
    assert _resolve(tf, rotation["secret_id"]) == DB_SECRET
    assert "rotation_lambda_arn" not in rotation
    assert rotation["rotate_immediately"] is False


# --- IAM --------------------------------------------------------------------------------------


def test_task_role_reads_exactly_the_db_secret(tf):
    statements = [
        s
        for doc in _role_documents(tf, "task")
        for s in _statements(doc)
        if any(a.startswith("secretsmanager:") for a in s["actions"])
    ]
    assert len(statements) == 2
    (statement,) = [s for s in statements if s["sid"] == "ReadOwnDbSecrets"]
    (tokens,) = [s for s in statements if s["sid"] == "ReadTokensAtStart"]
    assert sorted(statement["actions"]) == [
        "secretsmanager:DescribeSecret",
        "secretsmanager:GetSecretValue",
    ]
    # Its own login secret and the replica's, never the master secret by name (and no statement
    # when there is none: IAM authentication without a replica).
    assert statement["resources"] == "statement.value"
    assert statement["_dynamic"] == "local.service_reads_secrets ? [local.service_secret_arns] : []"
    assert tf["locals"]["service_reads_secrets"] == "!local.iam_auth || var.db_replica_enabled"
    assert MASTER_SECRET not in str(statements)
    assert statement.get("effect", "Allow") == "Allow"
    # And the two tokens, read once at start-up.
    assert tokens["actions"] == ["secretsmanager:GetSecretValue"]
    assert _resolve(tf, tokens["resources"]) == [
        "aws_secretsmanager_secret.admin_token.arn",
        "aws_secretsmanager_secret.metrics_token.arn",
    ]


def test_execution_role_is_not_the_task_role(tf):
    taskdef = tf["resource"][("aws_ecs_task_definition", "app")]
    assert taskdef["execution_role_arn"] == "aws_iam_role.execution.arn"
    assert taskdef["task_role_arn"] == "aws_iam_role.task.arn"
    assert ("aws_iam_role", "execution") in tf["resource"]
    assert ("aws_iam_role", "task") in tf["resource"]


def test_execution_role_has_the_managed_policy_and_reads_no_secret(tf):
    attachments = [
        body["policy_arn"]
        for (rtype, _), body in tf["resource"].items()
        if rtype == "aws_iam_role_policy_attachment"
        and body["role"] == "aws_iam_role.execution.name"
    ]
    assert len(attachments) == 1
    assert attachments[0].endswith(":iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy")
    # ECS injects nothing (the app reads its login and its tokens itself): no inline policy.
    assert _role_documents(tf, "execution") == []


def test_task_role_has_no_managed_policies(tf):
    assert not [
        body
        for (rtype, _), body in tf["resource"].items()
        if rtype == "aws_iam_role_policy_attachment" and body["role"].startswith("aws_iam_role.task.")
    ]


def test_kms_decrypt_only_when_a_customer_key_is_set(tf):
    assert (
        tf["locals"]["secrets_kms_key_arns"]
        == "var.master_user_secret_kms_key_id == null ? [] : [var.master_user_secret_kms_key_id]"
    )
    for role in ("migrate", "task"):
        kms = [
            s
            for doc in _role_documents(tf, role)
            for s in _statements(doc)
            if any(a.startswith("kms:") for a in s["actions"])
        ]
        assert len(kms) == 1, role
        assert kms[0]["_dynamic"] == "local.secrets_kms_key_arns"
        assert kms[0]["actions"] == ["kms:Decrypt"]
        assert kms[0]["resources"] == ["statement.value"]


def test_no_wildcard_resource_for_secretsmanager_or_kms(tf):
    """No IAM policy document grants a secretsmanager or kms action on "*" (or any pattern).

    KMS *key policies* (aws_kms_key.policy) are not IAM policies: there Resource "*" means
    "this key", so they are out of scope here.
    """
    checked = 0
    for (rtype, name), body in tf["data"].items():
        if rtype != "aws_iam_policy_document":
            continue
        for statement in _statements(body):
            actions = statement.get("actions", [])
            if not any(a.split(":")[0] in {"secretsmanager", "kms"} for a in actions):
                continue
            checked += 1
            assert "*" not in "".join(actions), (name, actions)
            resources = statement.get("resources", [])
            assert resources, name
            # A local (local.service_secret_arns, ...) is resolved to its definition; a splat
            # ([*]) there selects the stack's own resources and is not a wildcard ARN.
            resolved = _resolve_deep(tf, resources)
            assert not any("*" in r.replace("[*]", "") for r in _strings(resolved)), (name, resolved)
            assert "not_resources" not in statement
    assert checked >= 8
    # And no policy is written around aws_iam_policy_document as raw JSON.
    for (rtype, name), body in tf["resource"].items():
        if rtype in {"aws_iam_role_policy", "aws_iam_policy"}:
            assert str(body["policy"]).startswith("data.aws_iam_policy_document."), name


# --- ECS --------------------------------------------------------------------------------------


def test_db_secret_id_references_the_master_user_secret(tf):
    env = {e["name"]: e["value"] for e in _container(tf)["environment"]}
    assert env["DB_SECRET_ID"] == "local.db_secret_arn"
    for name in (
        "AWS_REGION",
        "DB_SECRET_REFRESH_INTERVAL_MS",
        "DB_POOL_GRACE_PERIOD_MS",
        "POSTGRES_HOST",
        "POSTGRES_PORT",
        "POSTGRES_DB",
    ):
        assert name in env


def test_database_tls_is_verify_full_against_the_bundled_rds_ca(tf):
    env = {e["name"]: e["value"] for e in _container(tf)["environment"]}
    assert env["POSTGRES_SSL"] == "verify-full"
    assert env["POSTGRES_SSL_ROOT_CERT"] == "/opt/commng/certs/rds-global-bundle.pem"
    # verify-full checks the host name: it must be the instance endpoint the certificate names.
    assert env["POSTGRES_HOST"] == f"{DB}.address"


def test_metrics_are_not_public(tf):
    env = {e["name"]: e["value"] for e in _container(tf)["environment"]}
    assert env["METRICS_PUBLIC"] == "false"


def test_no_secret_is_injected_into_the_container(tf):
    # Injected, a value stays in /proc/1/environ for the task's life: the app reads its login
    # (DB_SECRET_ID) and its tokens (*_TOKEN_SECRET_ID) from Secrets Manager itself.
    assert "secrets" not in _container(tf)
    env = {e["name"]: e["value"] for e in _container(tf)["environment"]}
    assert not set(env) & {"POSTGRES_USER", "POSTGRES_PASSWORD", "ADMIN_TOKEN", "METRICS_TOKEN"}
    assert env["DB_SECRET_ID"] == "local.db_secret_arn"
    assert env["ADMIN_TOKEN_SECRET_ID"] == "aws_secretsmanager_secret.admin_token.arn"
    assert env["METRICS_TOKEN_SECRET_ID"] == "aws_secretsmanager_secret.metrics_token.arn"


def test_admin_token_is_generated_write_only_and_never_in_state(tf):
    password = tf["ephemeral"][("aws_secretsmanager_random_password", "admin_token")]
    # Bearer-safe: letters and digits, well over the app's 16-character minimum.
    assert password["exclude_punctuation"] is True
    assert password["include_space"] is False
    assert password["password_length"] >= 32

    version = tf["resource"][("aws_secretsmanager_secret_version", "admin_token")]
    assert version["secret_id"] == "aws_secretsmanager_secret.admin_token.id"
    assert (
        version["secret_string_wo"]
        == "ephemeral.aws_secretsmanager_random_password.admin_token.random_password"
    )
    assert version["secret_string_wo_version"] == "var.admin_token_version"
    assert "secret_string" not in version
    assert tf["variable"]["admin_token_version"]["default"] == 1
    # No non-ephemeral random source anywhere (its result would be in the state).
    assert not [r for r in tf["resource"] if r[0].startswith("random_")]


def test_service_starts_after_the_admin_token_and_restarts_when_it_changes(tf):
    service = tf["resource"][("aws_ecs_service", "app")]
    assert "aws_secretsmanager_secret_version.admin_token" in service["depends_on"]
    env = {e["name"]: e["value"] for e in _container(tf)["environment"]}
    assert env["ADMIN_TOKEN_VERSION"] == (
        "tostring(aws_secretsmanager_secret_version.admin_token.secret_string_wo_version)"
    )


def test_container_health_check_is_healthz_without_curl(tf):
    container = _container(tf)
    command = container["healthCheck"]["command"]
    assert command[:3] == ["CMD", "python", "-c"]
    assert "urllib.request" in command[3]
    assert "http://127.0.0.1:8000/healthz" in command[3]
    assert container["stopTimeout"] == 30


def test_target_group_health_check_is_healthz_so_a_database_outage_replaces_no_task(tf):
    """The ALB's check (and so ECS's task replacement) never touches the database: /readyz
    fails on every task at once during an outage, and ECS would restart the whole fleet."""
    target_group = tf["resource"][("aws_lb_target_group", "app")]
    (health_check,) = target_group["health_check"]
    assert health_check["path"] == "/healthz"
    assert "/readyz" not in str(tf["resource"][("aws_lb_target_group", "app")])
    assert target_group["port"] == "local.container_port"
    assert tf["locals"]["container_port"] == 8000


def test_container_logs_to_awslogs(tf):
    logging = _container(tf)["logConfiguration"]
    assert logging["logDriver"] == "awslogs"
    assert logging["options"]["awslogs-group"] == "aws_cloudwatch_log_group.app.name"


def test_service_runs_in_private_subnets_behind_the_alb(tf):
    service = tf["resource"][("aws_ecs_service", "app")]
    (network,) = service["network_configuration"]
    assert network["assign_public_ip"] is False
    assert network["subnets"] == "local.private_subnet_ids"
    (lb,) = service["load_balancer"]
    assert lb["target_group_arn"] == "aws_lb_target_group.app.arn"


def test_http_redirects_to_https(tf):
    http = tf["resource"][("aws_lb_listener", "http")]
    (action,) = http["default_action"]
    assert action["type"] == "redirect"
    assert action["redirect"][0]["protocol"] == "HTTPS"
    https = tf["resource"][("aws_lb_listener", "https")]
    assert https["protocol"] == "HTTPS"
    assert https["certificate_arn"] == "var.acm_certificate_arn"


def _listener_rules(tf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: body
        for (rtype, name), body in tf["resource"].items()
        if rtype == "aws_lb_listener_rule" and body["listener_arn"] == "aws_lb_listener.https.arn"
    }


def _paths(rule: dict[str, Any]) -> list[str]:
    return [v for c in rule["condition"] for p in c.get("path_pattern", []) for v in p["values"]]


def test_admin_is_forwarded_only_from_the_allowed_cidrs(tf):
    rules = _listener_rules(tf)
    allowed, denied = rules["admin_allowed"], rules["admin_denied"]

    assert allowed["count"] == "length(var.admin_allowed_cidrs) > 0 ? 1 : 0"
    assert _paths(allowed) == ["/admin*"]
    source_ips = [s["values"] for c in allowed["condition"] for s in c.get("source_ip", [])]
    assert source_ips == ["var.admin_allowed_cidrs"]
    (action,) = allowed["action"]
    assert action["type"] == "forward"
    assert action["target_group_arn"] == "aws_lb_target_group.app.arn"

    # The catch-all for /admin* from anywhere else: no count, no source condition, 404.
    assert "count" not in denied
    assert _paths(denied) == ["/admin*"]
    assert all("source_ip" not in c for c in denied["condition"])
    (action,) = denied["action"]
    assert action["type"] == "fixed-response"
    assert action["fixed_response"][0]["status_code"] in {"403", "404"}

    # Evaluated in this order (lowest priority first), and before the default forward.
    assert allowed["priority"] < denied["priority"]
    assert len({r["priority"] for r in rules.values()}) == len(rules)

    variable = tf["variable"]["admin_allowed_cidrs"]
    assert variable["default"] == []
    conditions = [v["condition"] for v in variable["validation"]]
    # 5 condition values per rule, one taken by the path pattern.
    assert "length(var.admin_allowed_cidrs) <= 4" in conditions


# --- events -----------------------------------------------------------------------------------


def test_rotation_events_reach_the_queue_from_these_rules_only(tf):
    label = tf["resource"][("aws_cloudwatch_event_rule", "db_secret_current_updated")]
    assert label["count"] == "local.service_reads_secrets ? 1 : 0"
    assert '"Secret Label Updated"' in label["event_pattern"]
    assert '["AWSCURRENT"]' in label["event_pattern"]
    assert "resources = local.service_secret_arns" in label["event_pattern"]
    outcome = tf["resource"][("aws_cloudwatch_event_rule", "db_secret_rotation_outcome")]
    assert '"RotationSucceeded"' in outcome["event_pattern"]

    queue = tf["resource"][("aws_sqs_queue", "rotation_events")]
    assert queue["sqs_managed_sse_enabled"] is True

    allow = next(
        s
        for s in _statements(tf["data"][("aws_iam_policy_document", "rotation_events_queue")])
        if s["sid"] == "EventBridgeRotationRulesOnly"
    )
    assert "local.rotation_event_rules" in allow["_dynamic"]
    assert allow["actions"] == ["sqs:SendMessage"]
    assert allow["principals"][0]["identifiers"] == ["events.amazonaws.com"]
    (condition,) = allow["condition"]
    assert condition["variable"] == "aws:SourceArn"
    assert condition["values"] == "statement.value"
    assert "rotation_events_queue_url" in tf["output"]


def test_the_app_consumes_the_rotation_events_queue_with_a_dead_letter_queue(tf):
    queue = tf["resource"][("aws_sqs_queue", "rotation_events")]
    assert "aws_sqs_queue.rotation_events_dlq.arn" in queue["redrive_policy"]
    assert queue["visibility_timeout_seconds"] == 60
    dlq = tf["resource"][("aws_sqs_queue", "rotation_events_dlq")]
    assert dlq["sqs_managed_sse_enabled"] is True
    env = {e["name"]: e["value"] for e in _container(tf)["environment"]}
    assert env["DB_ROTATION_QUEUE_URL"] == "aws_sqs_queue.rotation_events.url"
    statements = [
        s
        for doc in _role_documents(tf, "task")
        for s in _statements(doc)
        if any(a.startswith("sqs:") for a in s["actions"])
    ]
    (statement,) = statements
    # No GetQueueAttributes: nothing in the app asks for them.
    assert sorted(statement["actions"]) == ["sqs:DeleteMessage", "sqs:ReceiveMessage"]
    assert statement["resources"] == ["aws_sqs_queue.rotation_events.arn"]
    assert "sqs" in tf["locals"]["interface_endpoints"]
    alarm = tf["resource"][("aws_cloudwatch_metric_alarm", "rotation_events_dead_letters")]
    assert "aws_sqs_queue.rotation_events_dlq.name" in str(alarm["dimensions"])


# --- alarms -----------------------------------------------------------------------------------

TOPIC = "local.alarm_topic_arn"


def test_alarm_topic_is_created_encrypted_unless_one_is_given(tf):
    assert tf["variable"]["alarm_sns_topic_arn"]["default"] is None
    assert tf["locals"]["create_alarm_topic"] == "var.alarm_sns_topic_arn == null"
    assert (
        tf["locals"]["alarm_topic_arn"]
        == "local.create_alarm_topic ? aws_sns_topic.alarms[0].arn : var.alarm_sns_topic_arn"
    )
    topic = tf["resource"][("aws_sns_topic", "alarms")]
    assert topic["count"] == "local.create_alarm_topic ? 1 : 0"
    # A customer key: CloudWatch and EventBridge cannot publish through aws/sns.
    assert topic["kms_master_key_id"] == "aws_kms_key.alarms[0].arn"
    key = tf["resource"][("aws_kms_key", "alarms")]
    assert key["enable_key_rotation"] is True
    assert "cloudwatch.amazonaws.com" in key["policy"] and "events.amazonaws.com" in key["policy"]
    assert tf["output"]["alarm_sns_topic_arn"]["value"] == TOPIC


def test_alarm_topic_policy_lets_only_the_stacks_rule_and_alarms_publish(tf):
    policy = tf["resource"][("aws_sns_topic_policy", "alarms")]
    assert policy["policy"] == "data.aws_iam_policy_document.alarm_topic[0].json"
    statements = {s["sid"]: s for s in _statements(tf["data"][("aws_iam_policy_document", "alarm_topic")])}
    events = statements["RotationFailedRule"]
    assert events["actions"] == ["sns:Publish"]
    assert events["principals"][0]["identifiers"] == ["events.amazonaws.com"]
    (condition,) = events["condition"]
    assert condition["variable"] == "aws:SourceArn"
    assert condition["values"] == ["aws_cloudwatch_event_rule.db_secret_rotation_failed.arn"]
    alarms = statements["StackAlarms"]
    assert alarms["principals"][0]["identifiers"] == ["cloudwatch.amazonaws.com"]
    source_arn = next(c for c in alarms["condition"] if c["variable"] == "aws:SourceArn")
    assert source_arn["values"][0].endswith(":alarm:${local.alarm_name_prefix}*")


def test_rotation_failed_event_goes_to_the_alarm_topic(tf):
    rule = tf["resource"][("aws_cloudwatch_event_rule", "db_secret_rotation_failed")]
    pattern = rule["event_pattern"]
    assert '"AWS Service Event via CloudTrail"' in pattern
    assert 'eventName = ["RotationFailed"]' in pattern
    assert "RotationSucceeded" not in pattern
    # Every rotated DB secret: master, app, replica.
    assert "SecretId = local.rotated_secret_arns" in pattern
    assert tf["locals"]["rotated_secret_arns"] == (
        "distinct(concat([local.db_master_secret_arn], local.service_secret_arns))"
    )
    target = tf["resource"][("aws_cloudwatch_event_target", "db_secret_rotation_failed")]
    assert target["rule"] == "aws_cloudwatch_event_rule.db_secret_rotation_failed.name"
    assert target["arn"] == TOPIC
    assert target["depends_on"] == ["aws_sns_topic_policy.alarms"]


def _alarms(tf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: body
        for (rtype, name), body in tf["resource"].items()
        if rtype == "aws_cloudwatch_metric_alarm"
    }


def test_every_alarm_notifies_the_topic_and_is_named_for_its_policy(tf):
    alarms = _alarms(tf)
    assert set(alarms) == {
        "refresh_failed",
        "unhealthy_targets",
        "no_healthy_targets",
        "target_5xx",
        "rotation_events_dead_letters",
    }
    for name, alarm in alarms.items():
        assert alarm["alarm_actions"] == [TOPIC], name
        assert alarm["ok_actions"] == [TOPIC], name
        assert alarm["alarm_name"].startswith("${local.alarm_name_prefix}"), name
        assert str(alarm.get("alarm_description", "")).strip(), name


def test_refresh_failed_log_events_raise_an_alarm(tf):
    metric_filter = tf["resource"][("aws_cloudwatch_log_metric_filter", "refresh_failed")]
    assert metric_filter["log_group_name"] == "aws_cloudwatch_log_group.app.name"
    # A JSON filter on the "event" field of the app's JSON log lines.
    pattern = metric_filter["pattern"].replace('\\"', '"')  # python-hcl2 keeps the HCL escapes
    assert pattern == '{ $.event = "refresh_failed" }'
    (transformation,) = metric_filter["metric_transformation"]
    assert transformation["value"] == "1"
    alarm = _alarms(tf)["refresh_failed"]
    assert alarm["metric_name"] == (
        "aws_cloudwatch_log_metric_filter.refresh_failed.metric_transformation[0].name"
    )
    assert alarm["namespace"] == (
        "aws_cloudwatch_log_metric_filter.refresh_failed.metric_transformation[0].namespace"
    )
    assert alarm["statistic"] == "Sum"
    assert alarm["comparison_operator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["threshold"] == 1
    assert alarm["treat_missing_data"] == "notBreaching"


def test_health_check_failures_and_5xx_behind_the_alb_raise_alarms(tf):
    dims = tf["locals"]["target_group_dimensions"]
    assert dims == {
        "TargetGroup": "aws_lb_target_group.app.arn_suffix",
        "LoadBalancer": "aws_lb.main.arn_suffix",
    }
    alarms = _alarms(tf)
    unhealthy = alarms["unhealthy_targets"]
    assert (unhealthy["namespace"], unhealthy["metric_name"]) == ("AWS/ApplicationELB", "UnHealthyHostCount")
    assert unhealthy["dimensions"] == "local.target_group_dimensions"
    assert (unhealthy["comparison_operator"], unhealthy["threshold"]) == ("GreaterThanThreshold", 0)
    healthy = alarms["no_healthy_targets"]
    assert (healthy["namespace"], healthy["metric_name"]) == ("AWS/ApplicationELB", "HealthyHostCount")
    assert healthy["dimensions"] == "local.target_group_dimensions"
    assert (healthy["comparison_operator"], healthy["threshold"]) == ("LessThanThreshold", 1)
    assert healthy["treat_missing_data"] == "breaching"
    # The target group these watch is the one health-checking /healthz; a database outage
    # shows as 5XX answers instead.
    (health_check,) = tf["resource"][("aws_lb_target_group", "app")]["health_check"]
    assert health_check["path"] == "/healthz"
    errors = alarms["target_5xx"]
    assert (errors["namespace"], errors["metric_name"]) == ("AWS/ApplicationELB", "HTTPCode_Target_5XX_Count")
    assert errors["dimensions"] == "local.target_group_dimensions"


# --- least privilege: app role, rotation functions, migration task, replica (issue 12) ---------

SAR_MULTI = "arn:aws:serverlessrepo:us-east-1:297356227824:applications/SecretsManagerRDSPostgreSQLRotationMultiUser"


def test_credentials_mode_defaults_to_app_role_and_is_validated(tf):
    variable = tf["variable"]["db_credentials_mode"]
    assert variable["default"] == "app_role"
    (validation,) = variable["validation"]
    assert validation["condition"] == 'contains(["app_role", "master"], var.db_credentials_mode)'
    assert "less safe" in variable["description"].lower()
    # Everything app_role-only hangs on the switch.
    r = tf["resource"]
    for address in (
        ("aws_secretsmanager_secret", "db_app"),
        ("aws_secretsmanager_secret_version", "db_app"),
    ):
        assert r[address]["count"] == "local.app_secret ? 1 : 0", address
    assert tf["locals"]["app_secret"] == "local.app_role && !local.iam_auth"
    # Its rotation also waits for the bootstrap (test_deploy.py).
    assert r[("aws_secretsmanager_secret_rotation", "db_app")]["count"] == (
        "local.rotate_role_secrets && local.app_secret ? 1 : 0"
    )
    assert tf["locals"]["rotate_role_secrets"] == "local.app_role && var.bootstrap_completed"
    assert tf["ephemeral"][("aws_secretsmanager_random_password", "db_app")]["count"] == "local.app_secret ? 1 : 0"


def test_app_secret_json_has_the_rotation_functions_keys_and_a_write_only_password(tf):
    version = tf["resource"][("aws_secretsmanager_secret_version", "db_app")]
    assert version["secret_id"] == "aws_secretsmanager_secret.db_app[0].id"
    assert "secret_string" not in version
    assert version["secret_string_wo_version"] == "var.db_app_secret_version"
    body = version["secret_string_wo"]
    assert body.startswith("jsonencode(")
    keys = re.findall(r"(\w+)\s*=", body)
    assert keys == ["engine", "host", "port", "dbname", "username", "password", "masterarn"]
    assert 'engine = "postgres"' in body
    assert "host = aws_db_instance.main.address" in body
    assert "username = local.db_app_username" in body
    assert tf["locals"]["db_app_username"] == "commng_app"
    assert "password = ephemeral.aws_secretsmanager_random_password.db_app[0].random_password" in body
    assert "masterarn = local.db_master_secret_arn" in body


def test_db_passwords_are_libpq_and_url_safe(tf):
    exclude = tf["locals"]["db_password_exclude_characters"]
    for char in ("/", "@", '\\"', "'", " ", "\\\\"):
        assert char in exclude, char
    for name in ("db_app", "db_replica", "db_master"):
        password = tf["ephemeral"][("aws_secretsmanager_random_password", name)]
        assert password["exclude_characters"] == "local.db_password_exclude_characters", name
        assert password["include_space"] is False, name
        assert password["password_length"] >= 32, name


def test_rotation_functions_come_from_the_serverless_application_repository(tf):
    apps = tf["locals"]["rotation_applications"]
    assert apps["multi_user"] == SAR_MULTI.replace("arn:aws:", "arn:${local.partition}:")
    assert apps["single_user"].endswith(":applications/SecretsManagerRDSPostgreSQLRotationSingleUser")
    functions = tf["locals"]["rotation_functions"]
    compact = re.sub(r"\s+", "", functions)
    assert 'local.multi_user_rotation?{multi_user="${local.prefix}-db-rotation-multi-user"}:{}' in compact
    assert tf["locals"]["multi_user_rotation"] == "local.app_secret || var.db_replica_enabled"
    assert "var.db_master_password_managed_by_rds?{}:{single_user=" in compact
    stack = tf["resource"][("aws_serverlessapplicationrepository_cloudformation_stack", "rotation")]
    assert stack["for_each"] == "local.rotation_functions"
    assert stack["application_id"] == "local.rotation_applications[each.key]"
    params = re.sub(r"\s+", "", stack["parameters"])
    for name, value in {
        "functionName": "each.value",
        "endpoint": "local.secretsmanager_endpoint",
        "vpcSubnetIds": 'join(",",local.private_subnet_ids)',
        "vpcSecurityGroupIds": "aws_security_group.rotation[0].id",
    }.items():
        assert f"{name}={value}" in params, name
    assert params.endswith("local.rotation_function_parameters[each.key])")
    assert tf["locals"]["secretsmanager_endpoint"].startswith("https://secretsmanager.${local.region}.")


def test_rotation_functions_reach_the_db_and_the_endpoints_only(tf):
    r = tf["resource"]
    egress = {
        name: body
        for (rtype, name), body in r.items()
        if rtype == "aws_vpc_security_group_egress_rule" and body["security_group_id"] == "aws_security_group.rotation[0].id"
    }
    assert set(egress) == {"rotation_to_db", "rotation_to_endpoints", "rotation_https_anywhere"}
    assert egress["rotation_to_db"]["referenced_security_group_id"] == "aws_security_group.db.id"
    assert egress["rotation_to_db"]["from_port"] == egress["rotation_to_db"]["to_port"] == 5432
    assert egress["rotation_to_endpoints"]["referenced_security_group_id"] == "aws_security_group.endpoints[0].id"
    assert not [
        body for (rtype, _), body in r.items()
        if rtype == "aws_vpc_security_group_ingress_rule" and body["security_group_id"] == "aws_security_group.rotation[0].id"
    ]
    assert r[("aws_vpc_security_group_ingress_rule", "db_from_rotation")]["referenced_security_group_id"] == (
        "aws_security_group.rotation[0].id"
    )
    assert r[("aws_vpc_security_group_ingress_rule", "endpoints_from_rotation")]["security_group_id"] == (
        "aws_security_group.endpoints[0].id"
    )
    assert 'local.app_role ? ["rds"] : []' in tf["locals"]["interface_endpoints"]


def test_app_secret_rotates_every_7_days_with_the_multi_user_function(tf):
    rotation = tf["resource"][("aws_secretsmanager_secret_rotation", "db_app")]
    assert rotation["secret_id"] == "aws_secretsmanager_secret.db_app[0].id"
    assert rotation["rotation_lambda_arn"] == 'local.rotation_lambda_arns["multi_user"]'
    assert 'stack.outputs["RotationLambdaARN"]' in tf["locals"]["rotation_lambda_arns"]
    # Not at creation: the roles exist only after the migration task's bootstrap.
    assert rotation["rotate_immediately"] is False
    (rules,) = rotation["rotation_rules"]
    assert rules["schedule_expression"] == "var.db_app_secret_rotation_schedule"
    assert tf["variable"]["db_app_secret_rotation_schedule"]["default"] == "rate(7 days)"
    assert "aws_iam_role_policy.rotation_multi_user" in rotation["depends_on"]


def test_multi_user_function_reads_only_the_master_secret_besides_its_own(tf):
    policy = tf["resource"][("aws_iam_role_policy", "rotation_multi_user")]
    assert policy["role"] == 'local.rotation_role_names["multi_user"]'
    statements = _statements(tf["data"][("aws_iam_policy_document", "rotation_multi_user")])
    secrets = [s for s in statements if any(a.startswith("secretsmanager:") for a in s["actions"])]
    (read,) = secrets
    assert sorted(read["actions"]) == ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"]
    assert read["resources"] == [MASTER_SECRET]
    (rds,) = [s for s in statements if any(a.startswith("rds:") for a in s["actions"])]
    assert rds["actions"] == ["rds:DescribeDBInstances"]
    assert rds["resources"] == "local.rotation_db_instance_arns"
    (kms,) = [s for s in statements if any(a.startswith("kms:") for a in s["actions"])]
    assert kms["_dynamic"] == "local.secrets_kms_key_arns"
    assert kms["condition"][0]["variable"] == "kms:ViaService"


def test_migration_task_definition_runs_the_bootstrap_with_its_own_role(tf):
    taskdef = tf["resource"][("aws_ecs_task_definition", "migrate")]
    assert taskdef["family"] == "${local.prefix}-migrate"
    assert taskdef["container_definitions"] == "jsonencode([local.migrate_container])"
    assert taskdef["task_role_arn"] == "aws_iam_role.migrate.arn"
    assert taskdef["execution_role_arn"] == "aws_iam_role.execution.arn"
    container = tf["locals"]["migrate_container"]
    assert container["image"] == "var.container_image"
    assert container["command"] == "local.migration_command"
    assert tf["locals"]["migration_command"] == (
        'local.app_role ? ["flask", "--app", "wsgi", "db", "bootstrap"] : ["flask", "--app", "wsgi", "db", "upgrade"]'
    )
    assert container["readonlyRootFilesystem"] is True
    assert "secrets" not in container  # it reads its secrets itself, with its task role
    env = tf["locals"]["migration_environment"]
    fixed = {e["name"]: e["value"] for e in _migration_fixed_env(tf)}
    assert fixed["DB_SECRET_ID"] == MASTER_SECRET
    assert fixed["POSTGRES_SSL"] == "verify-full"
    assert '{name = "DB_APP_SECRET_ID", value = arn}' in env
    assert "for arn in aws_secretsmanager_secret.db_app[*].arn" in env
    assert 'local.app_role ? [{name = "DB_OWNER_ROLE", value = local.db_owner_role}] : []' in env
    assert tf["locals"]["db_owner_role"] == "commng_owner"


def _migration_fixed_env(tf: dict[str, Any]) -> list[dict[str, str]]:
    """The literal list that opens local.migration_environment, parsed from ecs.tf's text."""
    text = (INFRA / "ecs.tf").read_text()
    block = text[text.index("migration_environment = concat("):text.index("migrate_container = {")]
    return [
        {"name": m.group(1), "value": m.group(2).strip().strip('"')}
        for m in re.finditer(r'\{ name = "(\w+)", value = ([^}]+) \}', block)
    ]


def test_migration_role_reads_master_and_role_secrets_and_nothing_else(tf):
    assert re.sub(r"\s+", "", tf["locals"]["migration_secret_arns"]) == (
        "distinct(concat([local.db_master_secret_arn],aws_secretsmanager_secret.db_app[*].arn,"
        "aws_secretsmanager_secret.db_replica[*].arn))"
    )
    statements = [
        s for doc in _role_documents(tf, "migrate") for s in _statements(doc)
        if any(a.startswith("secretsmanager:") for a in s["actions"])
    ]
    (statement,) = statements
    assert sorted(statement["actions"]) == ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"]
    assert statement["resources"] == "local.migration_secret_arns"
    # The service's task role is not the migration's.
    assert tf["resource"][("aws_ecs_task_definition", "app")]["task_role_arn"] == "aws_iam_role.task.arn"


def test_replica_needs_app_role_and_a_terraform_managed_master_password(tf):
    variable = tf["variable"]["db_replica_enabled"]
    assert variable["default"] is False
    (validation,) = variable["validation"]
    assert validation["condition"] == (
        '!var.db_replica_enabled || (var.db_credentials_mode == "app_role" && !var.db_master_password_managed_by_rds)'
    )
    replica = tf["resource"][("aws_db_instance", "replica")]
    assert replica["count"] == "var.db_replica_enabled ? 1 : 0"
    assert replica["replicate_source_db"] == "aws_db_instance.main.identifier"
    assert replica["storage_encrypted"] is True
    assert replica["publicly_accessible"] is False
    assert replica["parameter_group_name"] == "aws_db_parameter_group.main.name"
    (pre,) = replica["lifecycle"][0]["precondition"]
    assert pre["condition"] == "local.app_role && !var.db_master_password_managed_by_rds"
    assert "managed" in pre["error_message"]


def test_terraform_managed_master_secret_is_write_only_and_rotated_single_user(tf):
    version = tf["resource"][("aws_secretsmanager_secret_version", "db_master")]
    assert version["count"] == "var.db_master_password_managed_by_rds ? 0 : 1"
    assert "secret_string" not in version
    body = version["secret_string_wo"]
    assert "password = ephemeral.aws_secretsmanager_random_password.db_master[0].random_password" in body
    assert "host = aws_db_instance.main.address" in body
    assert version["secret_string_wo_version"] == "var.db_master_password_version"
    rotation = tf["resource"][("aws_secretsmanager_secret_rotation", "db_master_single_user")]
    assert rotation["count"] == "var.db_master_password_managed_by_rds ? 0 : 1"
    assert rotation["rotation_lambda_arn"] == 'local.rotation_lambda_arns["single_user"]'
    assert rotation["rotate_immediately"] is False


def test_replica_secret_is_commng_ro_on_the_replica_host_rotated_multi_user(tf):
    assert tf["locals"]["db_replica_username"] == "commng_ro"
    secret = tf["resource"][("aws_secretsmanager_secret", "db_replica")]
    assert secret["count"] == "var.db_replica_enabled ? 1 : 0"
    body = tf["resource"][("aws_secretsmanager_secret_version", "db_replica")]["secret_string_wo"]
    assert "host = aws_db_instance.replica[0].address" in body
    assert "username = local.db_replica_username" in body
    assert "masterarn = local.db_master_secret_arn" in body
    rotation = tf["resource"][("aws_secretsmanager_secret_rotation", "db_replica")]
    assert rotation["rotation_lambda_arn"] == 'local.rotation_lambda_arns["multi_user"]'
    (rules,) = rotation["rotation_rules"]
    assert rules["schedule_expression"] == "var.db_app_secret_rotation_schedule"
    # The service gets DB_REPLICA_SECRET_ID only when the secret exists.
    replica_env = tf["locals"]["app_replica_environment"]
    assert "aws_secretsmanager_secret.db_replica[*].arn" in replica_env
    assert "DB_REPLICA_SECRET_ID" in replica_env


def test_a_secret_on_the_replica_alternates_users_through_the_primary_never_single_user(tf):
    """AWS's single-user function sets the new password logged in as the user at the secret's
    host, and a read replica refuses ALTER ROLE (read-only transaction, SQLSTATE 25006). So a
    secret whose host is the replica is rotated by the multi-user function, which sets it on
    masterarn's instance, the primary; `flask db bootstrap` creates its clone."""
    r = tf["resource"]
    rotated = {}
    for (rtype, _), rotation in r.items():
        if rtype != "aws_secretsmanager_secret_rotation" or "rotation_lambda_arn" not in rotation:
            continue  # RDS's managed rotation of its own master secret
        secret = re.fullmatch(r"aws_secretsmanager_secret\.(\w+)\[0\]\.id", rotation["secret_id"]).group(1)
        body = r[("aws_secretsmanager_secret_version", secret)]["secret_string_wo"]
        rotated[secret] = (rotation["rotation_lambda_arn"], body)
    assert set(rotated) == {"db_app", "db_replica", "db_master"}
    for secret, (function, body) in rotated.items():
        on_replica = "aws_db_instance.replica" in body
        if function == 'local.rotation_lambda_arns["single_user"]':
            assert not on_replica, secret
            assert "host = aws_db_instance.main.address" in body, secret
        if on_replica:
            assert function == 'local.rotation_lambda_arns["multi_user"]', secret
            assert "masterarn = local.db_master_secret_arn" in body, secret
    assert "aws_db_instance.replica" in rotated["db_replica"][1]
    # The function checks that the secret's host replicates masterarn's instance.
    assert tf["locals"]["rotation_db_instance_arns"] == (
        "concat([aws_db_instance.main.arn], aws_db_instance.replica[*].arn)"
    )


# --- IAM database authentication (var.db_auth) -------------------------------------------------


def test_db_auth_is_secret_by_default_and_validated(tf):
    variable = tf["variable"]["db_auth"]
    assert variable["default"] == "secret"
    mode, needs_app_role = variable["validation"]
    assert mode["condition"] == 'contains(["secret", "iam"], var.db_auth)'
    assert "db_auth must be" in mode["error_message"]
    # rds_iam on the master would end its password logins (migrations, rotation).
    assert needs_app_role["condition"] == 'var.db_auth == "secret" || var.db_credentials_mode == "app_role"'
    assert tf["locals"]["iam_auth"] == 'var.db_auth == "iam"'


def test_iam_mode_enables_iam_authentication_on_the_instance(tf):
    assert tf["resource"][("aws_db_instance", "main")]["iam_database_authentication_enabled"] == "local.iam_auth"


def test_the_task_role_may_connect_as_exactly_the_app_user_of_this_instance(tf):
    policy = tf["resource"][("aws_iam_role_policy", "task_db_connect")]
    assert policy["count"] == "local.iam_auth ? 1 : 0"
    assert policy["role"] == "aws_iam_role.task.id"
    document = tf["data"][("aws_iam_policy_document", "task_db_connect")]
    assert document["count"] == "local.iam_auth ? 1 : 0"
    (statement,) = _statements(document)
    assert statement["actions"] == ["rds-db:connect"]
    assert statement.get("effect", "Allow") == "Allow"
    assert statement["resources"] == ["local.db_connect_arn"]
    # dbuser:<DbiResourceId>/<user>: the instance's resource_id (not its identifier), commng_app.
    assert tf["locals"]["db_connect_arn"] == (
        "arn:${local.partition}:rds-db:${local.region}:${local.account_id}:dbuser:"
        "${aws_db_instance.main.resource_id}/${local.db_app_username}"
    )
    assert tf["locals"]["db_app_username"] == "commng_app"
    # No other policy grants rds-db:anything.
    grants = [
        name
        for (rtype, name), body in tf["data"].items()
        if rtype == "aws_iam_policy_document"
        for s in _statements(body)
        if any(a.startswith("rds-db:") for a in s.get("actions", []))
    ]
    assert grants == ["task_db_connect"]


def test_iam_mode_creates_no_app_secret_and_no_rotation_for_it_and_keeps_the_master_secret(tf):
    r = tf["resource"]
    for address in (("aws_secretsmanager_secret", "db_app"), ("aws_secretsmanager_secret_version", "db_app")):
        assert r[address]["count"] == "local.app_secret ? 1 : 0", address
    assert tf["ephemeral"][("aws_secretsmanager_random_password", "db_app")]["count"] == "local.app_secret ? 1 : 0"
    assert tf["locals"]["app_secret"] == "local.app_role && !local.iam_auth"
    assert "local.app_secret" in r[("aws_secretsmanager_secret_rotation", "db_app")]["count"]
    # The alternating-users function only where it has a secret to rotate (app or replica).
    assert tf["locals"]["multi_user_rotation"] == "local.app_secret || var.db_replica_enabled"
    for name in ("rotation_multi_user",):
        assert r[("aws_iam_role_policy", name)]["count"] == "local.multi_user_rotation ? 1 : 0"
    # The master secret does not depend on the mode: the migration task logs in with it.
    master = tf["locals"]["db_master_secret_arn"]
    assert "iam" not in master
    assert "iam" not in r[("aws_secretsmanager_secret", "db_master")]["count"]


def test_iam_mode_gives_the_service_db_auth_and_its_user_and_no_secret_id(tf):
    env = {e["name"]: e["value"] for e in _container(tf, iam=True)["environment"]}
    assert env["DB_AUTH"] == "iam"
    assert env["POSTGRES_USER"] == "local.db_app_username"
    assert "DB_SECRET_ID" not in env
    assert "POSTGRES_PASSWORD" not in env
    # TLS with verify-full, which IAM authentication needs (rds.force_ssl too).
    assert env["POSTGRES_SSL"] == "verify-full"
    secret_mode = {e["name"]: e["value"] for e in _container(tf)["environment"]}
    assert secret_mode["DB_SECRET_ID"] == "local.db_secret_arn"
    assert not {"DB_AUTH", "POSTGRES_USER"} & set(secret_mode)


def test_iam_mode_bootstrap_creates_the_iam_login_and_the_migration_keeps_the_master_secret(tf):
    env = tf["locals"]["migration_environment"]
    assert 'local.iam_auth ? [{name = "DB_APP_IAM_USER", value = local.db_app_username}] : []' in env
    assert '{name = "DB_SECRET_ID", value = local.db_master_secret_arn}' in env
    assert "DB_AUTH" not in env  # the migration itself logs in with the master's password
