"""`python -m devstack rotate [--secret app|master|replica]`: rotate one secret of the running stack.

Each secret is rotated the way AWS rotates it in that shape (docs/deployment-shapes.md):

- ``app``: alternating users, as the multi-user function does. The secret's ``username``
  flips between ``commng_app`` and ``commng_app_clone``; only the other user's password
  changes, so there is no window.
- ``master``: single user, as RDS rotates its managed master secret: AWSPENDING, ALTER
  ROLE, a window (``--pause``) in which AWSCURRENT is already refused, AWSCURRENT moves.
- ``replica``: alternating users too, between ``commng_ro`` and ``commng_ro_clone``
  (AWS's single-user function would log in at the secret's host, the standby, which
  refuses ALTER ROLE); the password changes on the primary, physical replication
  carries it to the standby, and the secret keeps the standby's host.

Without ``--secret``, the one the service logs in with. Once AWSCURRENT moved, the event
Secrets Manager emits goes to the rotation-events queue, for the secrets the service reads
only (EventBridge's rule in infra/events.tf names those): a master rotation in the app
shape is one the service never hears of.
"""

from __future__ import annotations

from typing import Any

from devstack import events
from devstack.postgres import new_password
from devstack.secrets import rotate_alternating, rotate_secret, secrets_client
from devstack.stack import (
    LOCAL,
    MASTER_ROLE,
    primary,
    require_running,
    service_secret,
    watched_secrets,
)

__all__ = ["rotate"]


def rotate(which: str | None = None, pause_s: float = 5.0) -> int:
    """Rotate ``which`` secret (default: the service's) of the running local stack."""
    import botocore.exceptions
    import psycopg2

    from commng_rotation import describe_error

    _, state = require_running()
    which = which or service_secret(state)
    arn = state["secrets"].get(which)
    if arn is None:
        raise SystemExit(_not_in_stack(which, state))
    client = secrets_client(state["endpoint"])
    cluster = primary(state)
    try:
        if which in ("app", "replica"):
            version, _ = rotate_alternating(client, arn, cluster, new_password(), log=print)
        else:
            version = rotate_secret(client, arn, cluster, MASTER_ROLE, new_password(), pause_s, log=print)
        _announce(state, which, arn, version)
    except botocore.exceptions.EndpointConnectionError:
        raise SystemExit(
            f"the local Secrets Manager at {state['endpoint']} does not answer: restart the stack"
        ) from None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code") or type(exc).__name__
        raise SystemExit(f"the rotation stopped: Secrets Manager call failed ({code})") from None
    except psycopg2.Error as exc:
        raise SystemExit(f"the rotation stopped: PostgreSQL: {describe_error(exc)}") from None
    return 0


def _announce(state: dict[str, Any], which: str, arn: str, version: str) -> None:
    """What EventBridge delivers once AWSCURRENT moved, for a secret the service reads."""
    if which not in watched_secrets(state):
        print(f"no event: the service does not read the {which} secret, EventBridge's rule leaves it out")
        return
    if state.get("queue_url"):
        events.send_rotation_event(events.sqs_client(state["endpoint"]), state["queue_url"], arn, version)
        print("event: Secret Label Updated (AWSCURRENT) sent to the rotation-events queue")


def _not_in_stack(which: str, state: dict[str, Any]) -> str:
    """The one line for a secret this stack does not have."""
    if state.get("auth") == "iam":
        return (
            f"the local stack (state in {LOCAL}) runs AUTH=iam: the service logs in with IAM tokens and "
            f"has no {which} secret to rotate (SECRET=master rotates the master's)"
        )
    if state.get("shape") == "master":
        return (
            f"the local stack (state in {LOCAL}) runs SHAPE=master, which has no {which} secret "
            "(the service logs in with the master secret): `make rotate` rotates that one"
        )
    return (
        f"the local stack (state in {LOCAL}) runs without a replica (REPLICA=0), so it has no "
        "replica secret: restart it without REPLICA=0 to have one"
    )
