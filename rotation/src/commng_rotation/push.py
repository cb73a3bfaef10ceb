"""Push: Secrets Manager's own events tell a worker within seconds that AWSCURRENT moved.

EventBridge puts the secret's events on an SQS queue, the event JSON itself as the body:

- ``Secret Label Updated`` (native, no CloudTrail needed): ``resources`` holds the secret's
  ARN, ``detail`` holds ``name``, ``labelUpdated`` and ``versionId``; it is sent for every
  staging label except AWSPENDING and AWSPREVIOUS. ``labelUpdated == "AWSCURRENT"`` for a
  watched secret starts an immediate check with the trigger ``push``.
- ``AWS Service Event via CloudTrail`` with ``detail.eventName`` ``RotationSucceeded``
  (a check too), ``RotationFailed`` or ``RotationAbandoned`` (logged as
  ``rotation_failed_upstream`` at ERROR and told to ``upstream_failure_listeners``: the
  rotation needs an operator). The secret id is ``detail.additionalEventData.SecretId``,
  or ``detail.serviceEventDetails.SecretId`` in some sources; either is matched.

**Several secrets.** Each bind reads its own secret (a read replica may have its own), and
one queue carries the events of all of them. An event is routed to the binds whose secret
it names: the check it starts covers those binds only (the primary's, the replica's, or
both when they share one secret), and an event naming none of them is ``other_secret``.

**One consumer per worker.** Every gunicorn worker long-polls the queue itself. An SQS
message goes to one consumer, so one worker of the fleet learns of the rotation; it
adopts the new version and announces it over LISTEN/NOTIFY (``commng_rotation.fanout``),
which reaches every other worker of every task within a round trip. A consumer per task
would need one worker elected among forked siblings (or the master, which must never
import boto3 before gevent patches the workers) and a hand-off to the others, i.e. the
same fan-out plus an election that can fail; per worker needs neither, and a worker that
dies mid-message only delays that message by the visibility timeout, after which another
worker receives it. The price is one idle ``ReceiveMessage`` per worker every 20 s.

**Delete semantics.** A message is deleted once its check ran, whether the check adopted
the version, found it already in use, or failed: a failed check is retried by the
watcher's backoff (1 s, 2 s, 4 s...) and the reactive refresh still covers the window,
while redelivering the message would only make another worker fail the same way until
the dead-letter queue takes it. A message received while the worker stops is left
alone: after the visibility timeout it goes to another worker. Events for other secrets,
other labels and malformed bodies are logged (the event's name, never the body) and
deleted. A message is only a hint: the check asks Secrets Manager itself, so a forged or
replayed message costs one ``DescribeSecret`` and nothing else.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from commng_rotation.credentials import aws_error_code
from commng_rotation.events import Outcome, Trigger
from commng_rotation.settings import RotationSettings
from commng_rotation.watcher import SecretWatcher

__all__ = ["Handled", "PushConsumer", "QueueUnavailable", "SecretMatcher", "classify", "make_sqs_client"]

log = structlog.get_logger("commng_rotation.push")

LABEL_UPDATED = "Secret Label Updated"
CLOUDTRAIL = "AWS Service Event via CloudTrail"
AWSCURRENT = "AWSCURRENT"
FAILED_UPSTREAM = frozenset({"RotationFailed", "RotationAbandoned"})
# SQS's longest long poll; the client's read timeout must outlast it.
WAIT_S = 20
# Long enough for a check (a refresh joins for at most 15 s) before another worker sees it.
VISIBILITY_S = 60
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 60.0
# An empty answer faster than this (an endpoint that ignores WaitTimeSeconds) is paced.
MIN_POLL_S = 1.0
# A long poll in flight holds nothing: stopping does not wait it out.
STOP_JOIN_TIMEOUT_S = 0.5
_NAME_MAX = 64

Kind = Literal["label_updated", "rotation_succeeded", "rotation_failed", "ignored"]


class QueueUnavailable(RuntimeError):
    """SQS could not be asked; ``code`` is the AWS error code or the client's error class."""

    def __init__(self, code: str) -> None:
        super().__init__(f"SQS call failed: {code}")
        self.code = code


@dataclass(frozen=True)
class Handled:
    """One message: what it was, why it was ignored, whether a check ran and it was deleted."""

    message_id: str
    kind: Kind
    event_name: str | None = None
    reason: str | None = None
    version: str | None = None
    checked: bool = False
    deleted: bool = False
    # The binds whose secret the event names (the binds a check covered).
    binds: tuple[str | None, ...] = ()


class SecretMatcher:
    """Is an ARN or a name from an event the watched secret (given by ARN or by name)?"""

    def __init__(self, secret_id: str) -> None:
        self.secret_id = secret_id
        self.name = _secret_name(secret_id)

    def matches(self, value: object) -> bool:
        if not isinstance(value, str) or not value:
            return False
        return value == self.secret_id or _secret_name(value) == self.name


def _secret_name(value: str) -> str:
    """The name in a secret ARN (``arn:...:secret:NAME-AbCdEf``), or ``value`` itself."""
    if not value.startswith("arn:") or ":secret:" not in value:
        return value
    tail = value.split(":secret:", 1)[1]
    head, _, suffix = tail.rpartition("-")
    return head if head and len(suffix) == 6 else tail  # the 6 random characters AWS appends


def _short(value: object) -> str | None:
    """An event name fit for a log field: a bounded string, or None."""
    return value[:_NAME_MAX] if isinstance(value, str) else None


def classify(body: str, secret: SecretMatcher) -> tuple[Kind, str | None, str | None, str | None]:
    """(kind, event name, reason when ignored, version id) of one message body."""
    kind, name, reason, version, named = _parse(body)
    if named is not None and not any(secret.matches(n) for n in named):
        return "ignored", name, "other_secret", None
    return kind, name, reason, version


def _parse(body: str) -> tuple[Kind, str | None, str | None, str | None, list[object] | None]:
    """``classify`` before the secret is matched, plus the secret ids and names the event holds.

    The last item is None when the event is ignored whatever secret it names (malformed,
    another event); otherwise the kind is what it is for a watched secret.
    """
    try:
        event = json.loads(body)
    except ValueError:
        return "ignored", None, "malformed", None, None
    if not isinstance(event, dict):
        return "ignored", None, "malformed", None, None
    detail_type, detail = event.get("detail-type"), event.get("detail")
    name = _short(detail_type)
    if not isinstance(detail_type, str) or not isinstance(detail, dict):
        return "ignored", name, "malformed", None, None
    if detail_type == LABEL_UPDATED:
        resources = event.get("resources")
        named = [*(resources if isinstance(resources, list) else []), detail.get("name")]
        if detail.get("labelUpdated") != AWSCURRENT:
            return "ignored", name, "other_label", None, named
        version = detail.get("versionId")
        return "label_updated", name, None, version if isinstance(version, str) else None, named
    if detail_type == CLOUDTRAIL:
        event_name = detail.get("eventName")
        name = _short(event_name) or name
        if event_name != "RotationSucceeded" and event_name not in FAILED_UPSTREAM:
            return "ignored", name, "other_event", None, None
        named = [
            extra.get("SecretId") or extra.get("secretId")
            for extra in (detail.get("additionalEventData"), detail.get("serviceEventDetails"))
            if isinstance(extra, dict)
        ]
        kind: Kind = "rotation_succeeded" if event_name == "RotationSucceeded" else "rotation_failed"
        return kind, name, None, None, named
    return "ignored", name, "other_event", None, None


class PushConsumer:
    """Long-polls the rotation-events queue; ``poll_once()`` is the single step tests call.

    ``secret_id``: the secret each bind reads, by bind (binds may share one); a single
    secret id is the default bind's (None).
    """

    def __init__(
        self,
        client: Any,
        queue_url: str,
        secret_id: str | Mapping[str | None, str],
        watcher: SecretWatcher,
        wait_s: int = WAIT_S,
        visibility_s: int = VISIBILITY_S,
    ) -> None:
        self.client = client
        self.queue_url = queue_url
        by_bind = {None: secret_id} if isinstance(secret_id, str) else dict(secret_id)
        if not by_bind:
            raise ValueError("PushConsumer needs the secret of at least one bind")
        self.secrets = {bind: SecretMatcher(each) for bind, each in by_bind.items()}
        self.watcher = watcher
        self.wait_s = wait_s
        self.visibility_s = visibility_s
        # Told the event name of a RotationFailed/RotationAbandoned for the watched secret (metrics).
        self.upstream_failure_listeners: list[Callable[[str], None]] = []
        # Told (bind, version) when a push found this worker already on the event's version
        # (adopted earlier, e.g. in the window): the fan-out announces it to the others.
        self.relay_listeners: list[Callable[[str | None, str], None]] = []
        self.received = 0
        self.consecutive_failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the single step ---------------------------------------------------------------

    def poll_once(self, wait_s: int | None = None) -> list[Handled]:
        """Receive up to 10 messages (long poll), handle and delete each; raise QueueUnavailable."""
        try:
            answer = self.client.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=self.wait_s if wait_s is None else wait_s,
                VisibilityTimeout=self.visibility_s,
            )
        except Exception as exc:  # botocore raises many unrelated classes
            raise QueueUnavailable(aws_error_code(exc)) from None
        handled = []
        for message in answer.get("Messages") or []:
            if self._stop.is_set():
                break  # stopping: after the visibility timeout another worker gets it
            self.received += 1
            handled.append(self.handle(message))
        return handled

    def handle(self, message: dict[str, Any]) -> Handled:
        """Classify one message, act on it, delete it; never raises."""
        message_id = str(message.get("MessageId", ""))
        body = message.get("Body")
        kind, name, reason, version, binds = self.route(body if isinstance(body, str) else "")
        checked = False
        if kind == "ignored":
            level = log.warning if reason == "malformed" else log.info
            level("rotation_event_ignored", event_name=name, reason=reason, message_id=message_id)
        elif kind == "rotation_failed":
            self._failed_upstream(name or "?", binds)
        else:
            log.info(
                "rotation_event_received",
                event_name=name,
                version=version,
                binds=binds,
                message_id=message_id,
            )
            self._check(version, binds)
            checked = True
        deleted = self._delete(message, message_id)
        return Handled(message_id, kind, name, reason, version, checked, deleted, binds)

    def route(self, body: str) -> tuple[Kind, str | None, str | None, str | None, tuple[str | None, ...]]:
        """``classify`` for every watched secret at once, plus the binds whose secret the event names."""
        kind, name, reason, version, named = _parse(body)
        if named is None:
            return kind, name, reason, version, ()
        binds = tuple(b for b, secret in self.secrets.items() if any(secret.matches(n) for n in named))
        if not binds:
            return "ignored", name, "other_secret", None, ()
        return kind, name, reason, version, binds

    def _check(self, version: str | None, binds: tuple[str | None, ...]) -> None:
        results = self.watcher.check_once(Trigger.PUSH, binds=binds)
        if version is None:
            return
        rotators = {r.bind: r for r in self.watcher.rotators}
        for result in results:
            rotator = rotators[result.bind]
            current = rotator.current.version_id if rotator.current else None
            if result.outcome != Outcome.ROTATED and current == version:
                for listener in list(self.relay_listeners):
                    try:
                        listener(rotator.bind, version)
                    except Exception:
                        log.exception("push_listener_failed", listener=getattr(listener, "__name__", "?"))

    def _failed_upstream(self, event_name: str, binds: tuple[str | None, ...]) -> None:
        log.error(
            "rotation_failed_upstream",
            message="Secrets Manager reports that the rotation of a watched secret did not complete",
            event_name=event_name,
            binds=binds,
        )
        for listener in list(self.upstream_failure_listeners):
            try:
                listener(event_name)
            except Exception:
                log.exception("push_listener_failed", listener=getattr(listener, "__name__", "?"))

    def _delete(self, message: dict[str, Any], message_id: str) -> bool:
        handle = message.get("ReceiptHandle")
        if not isinstance(handle, str):
            return False
        try:
            self.client.delete_message(QueueUrl=self.queue_url, ReceiptHandle=handle)
        except Exception as exc:  # redelivered after the visibility timeout: one more check
            log.warning("rotation_queue_delete_failed", error=aws_error_code(exc), message_id=message_id)
            return False
        return True

    # -- the loop ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the loop is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the loop (a greenlet under gunicorn's gevent worker, a thread elsewhere)."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="commng-rotation-push", daemon=True)
        self._thread.start()
        log.info("rotation_push_started", wait_s=self.wait_s)

    def stop(self, timeout_s: float = STOP_JOIN_TIMEOUT_S) -> None:
        """Stop the loop; a long poll in flight is not waited for beyond ``timeout_s``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        delay = FIRST_RETRY_S
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                handled = self.poll_once()
            except QueueUnavailable as exc:
                self.consecutive_failures += 1
                log.warning("rotation_queue_receive_failed", error=exc.code, retry_in_s=delay)
            except Exception as exc:  # a bug here must not end push for this worker
                self.consecutive_failures += 1
                log.exception("rotation_queue_poll_crashed", error=type(exc).__name__, retry_in_s=delay)
            else:
                self.consecutive_failures = 0
                delay = FIRST_RETRY_S
                pace = MIN_POLL_S - (time.monotonic() - started)
                if not handled and pace > 0 and self._stop.wait(pace):
                    return
                continue
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, MAX_RETRY_S)


def make_sqs_client(settings: RotationSettings) -> Any:
    """The SQS client (honours AWS_ENDPOINT_URL_SQS). Call only inside a worker, after gevent patching."""
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=2,
        read_timeout=WAIT_S + 10,
        retries={"max_attempts": 2, "mode": "standard"},
    )
    return boto3.client("sqs", region_name=settings.aws_region, config=config)
