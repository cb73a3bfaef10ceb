"""Secrets Manager side of the local stack: a client for moto, and a realistic rotation."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from devstack.postgres import PostgresCluster


def secrets_client(endpoint: str, config: Any = None) -> Any:
    """A boto3 client for the moto server at ``endpoint`` (dummy local credentials).

    ``config`` is an optional ``botocore.config.Config`` (the bench marks its own calls).
    """
    import boto3

    return boto3.client(
        "secretsmanager",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="local",
        aws_secret_access_key="local",
        config=config,
    )


def rotate_secret(
    client: Any,
    secret_id: str,
    cluster: PostgresCluster,
    role: str,
    new_password: str,
    pause_s: float = 0.0,
    log: Any = None,
    before_current: Any = None,
) -> str:
    """What RDS does: AWSPENDING, ALTER ROLE, (window), AWSCURRENT moves. Returns the version id.

    The new version is AWSCURRENT's value with the new password, as AWS's single-user
    function writes it: a ``host``/``port`` in the secret (a replica's) stays.
    """
    say = log or (lambda *_: None)
    current = client.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")
    old_version = current["VersionId"]
    token = secrets.token_hex(16)
    client.put_secret_value(
        SecretId=secret_id,
        ClientRequestToken=token,
        SecretString=json.dumps(
            {**_json_object(current.get("SecretString")), "username": role, "password": new_password}
        ),
        VersionStages=["AWSPENDING"],
    )
    say(f"1/4 AWSPENDING written (version {token})")
    cluster.set_password(role, new_password)
    say(f"2/4 ALTER ROLE {role}: the database now wants the new password")
    if before_current is not None:
        before_current()
    if pause_s:
        say(f"3/4 the rotation window: {pause_s:.0f} s with AWSCURRENT still old")
        time.sleep(pause_s)
    client.update_secret_version_stage(
        SecretId=secret_id, VersionStage="AWSCURRENT", MoveToVersionId=token, RemoveFromVersionId=old_version
    )
    client.update_secret_version_stage(
        SecretId=secret_id, VersionStage="AWSPENDING", RemoveFromVersionId=token
    )
    say(f"4/4 AWSCURRENT moved to {token}")
    return token


def rotate_alternating(
    client: Any, secret_id: str, cluster: PostgresCluster, new_password: str, log: Any = None
) -> tuple[str, str]:
    """What Secrets Manager's alternating-users rotation does; returns (version id, user).

    createSecret: AWSPENDING is AWSCURRENT's value with the *other* user (``<user>_clone``,
    or ``<user>`` when AWSCURRENT holds the clone) and a new password. setSecret: ALTER
    ROLE of that other user only; the user in AWSCURRENT keeps its password. finishSecret:
    AWSCURRENT moves to the new version. The clone role must exist (AWS creates it, with
    ``GRANT <user> TO <user>_clone``, when it is missing).
    """
    say = log or (lambda *_: None)
    current = client.get_secret_value(SecretId=secret_id, VersionStage="AWSCURRENT")
    value = json.loads(current["SecretString"])
    user = value["username"]
    other = user.removesuffix("_clone") if user.endswith("_clone") else f"{user}_clone"
    token = secrets.token_hex(16)
    client.put_secret_value(
        SecretId=secret_id,
        ClientRequestToken=token,
        SecretString=json.dumps({**value, "username": other, "password": new_password}),
        VersionStages=["AWSPENDING"],
    )
    say(f"1/3 AWSPENDING written for {other} (version {token})")
    cluster.set_password(other, new_password)
    say(f"2/3 ALTER ROLE {other}; {user} keeps its password")
    client.update_secret_version_stage(
        SecretId=secret_id,
        VersionStage="AWSCURRENT",
        MoveToVersionId=token,
        RemoveFromVersionId=current["VersionId"],
    )
    client.update_secret_version_stage(
        SecretId=secret_id, VersionStage="AWSPENDING", RemoveFromVersionId=token
    )
    say(f"3/3 AWSCURRENT moved to {token} ({other})")
    return token, other


def _json_object(text: str | None) -> dict[str, Any]:
    """The secret's JSON object, or {} when it is not one (a test may have stored anything)."""
    try:
        value = json.loads(text or "")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
