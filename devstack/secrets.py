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
    """What RDS does: AWSPENDING, ALTER ROLE, (window), AWSCURRENT moves. Returns the version id."""
    say = log or (lambda *_: None)
    current = client.describe_secret(SecretId=secret_id)["VersionIdsToStages"]
    old_version = next(v for v, stages in current.items() if "AWSCURRENT" in stages)
    token = secrets.token_hex(16)
    client.put_secret_value(
        SecretId=secret_id,
        ClientRequestToken=token,
        SecretString=json.dumps({"username": role, "password": new_password}),
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
