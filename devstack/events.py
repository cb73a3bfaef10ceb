"""The local stack's rotation-events queue: SQS on the same moto server, and the events on it.

In AWS, an EventBridge rule sends the secret's events to an SQS queue, the event JSON
itself as the message body. Locally nothing emits them, so ``make rotate`` sends the one
Secrets Manager emits when AWSCURRENT moves, in the exact shape EventBridge delivers.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "QUEUE_NAME",
    "cloudtrail_event",
    "create_rotation_queue",
    "label_updated_event",
    "send_rotation_event",
    "sqs_client",
]

QUEUE_NAME = "commng-local-rotation-events"


def sqs_client(endpoint: str) -> Any:
    """A boto3 SQS client for the moto server at ``endpoint`` (dummy local credentials)."""
    import boto3

    return boto3.client(
        "sqs",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )


def create_rotation_queue(client: Any, name: str = QUEUE_NAME) -> str:
    """Create (or find) the queue; returns its URL. Long polling is the queue's default, as in infra/."""
    created = client.create_queue(QueueName=name, Attributes={"ReceiveMessageWaitTimeSeconds": "20"})
    url: str = created["QueueUrl"]
    return url


def _arn_parts(secret_arn: str) -> tuple[str, str, str]:
    """(region, account, secret name) of ``arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-XXXXXX``."""
    parts = secret_arn.split(":", 6)
    if len(parts) != 7 or parts[5] != "secret":
        raise ValueError("not a Secrets Manager secret ARN")
    name, _, suffix = parts[6].rpartition("-")
    return parts[3], parts[4], name if name and len(suffix) == 6 else parts[6]


def _envelope(
    secret_arn: str, detail_type: str, detail: dict[str, Any], resources: list[str]
) -> dict[str, Any]:
    region, account, _ = _arn_parts(secret_arn)
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": "aws.secretsmanager",
        "account": account,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": resources,
        "detail": detail,
    }


def label_updated_event(secret_arn: str, version_id: str, label: str = "AWSCURRENT") -> dict[str, Any]:
    """Secrets Manager's native "Secret Label Updated" event, as EventBridge delivers it."""
    _, _, name = _arn_parts(secret_arn)
    detail = {"name": name, "labelUpdated": label, "versionId": version_id}
    return _envelope(secret_arn, "Secret Label Updated", detail, [secret_arn])


def cloudtrail_event(secret_arn: str, event_name: str = "RotationFailed") -> dict[str, Any]:
    """A rotation outcome as CloudTrail reports it (RotationSucceeded, RotationFailed...)."""
    detail = {
        "eventSource": "secretsmanager.amazonaws.com",
        "eventName": event_name,
        "eventType": "AwsServiceEvent",
        "additionalEventData": {"SecretId": secret_arn},
    }
    return _envelope(secret_arn, "AWS Service Event via CloudTrail", detail, [])


def send_rotation_event(client: Any, queue_url: str, secret_arn: str, version_id: str) -> str:
    """Put the event "AWSCURRENT moved to ``version_id``" on the queue; returns the message id."""
    body = json.dumps(label_updated_event(secret_arn, version_id))
    sent = client.send_message(QueueUrl=queue_url, MessageBody=body)
    message_id: str = sent["MessageId"]
    return message_id
