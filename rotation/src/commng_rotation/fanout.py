"""Fan-out: a worker that adopted a new version tells every other worker, over LISTEN/NOTIFY.

**Sending.** ``FanOut.on_event`` listens to the ``EventLog``: an event with outcome
``rotated`` and a trigger other than ``notify`` (a worker that learnt from a notification
does not echo it) makes the worker send ``pg_notify(channel, payload)`` with its current
engine's login and connect arguments, in a short autocommit connection of its own (not
one of the pool, which would keep it afterwards: the pool's size is the requests'), from
a thread of its own (a greenlet under gevent) so the refresh never waits for it, bounded
by ``SEND_TIMEOUT_S``. The
payload is JSON ``{"bind", "version", "worker", "stage"}``: a version id, a host:pid and
the stage the sender read that version from (``AWSPENDING`` when adopted in the rotation
window, ``AWSCURRENT`` once AWSCURRENT holds it; null if unknown), never a credential, far
below PostgreSQL's 8000-byte limit. A push the sender relays (it was already on the
event's version) carries ``AWSCURRENT``. Every bind's adoption is announced
(the read replica's too), always over the primary (the default bind, or else the first
rotator given): a hot standby refuses NOTIFY and LISTEN.

**Listening.** One dedicated psycopg2 connection per worker, in autocommit, runs
``LISTEN <channel>`` and waits with ``select`` (gevent's, once gevent patched the
worker) with a timeout, so it is stoppable and pings the backend now and then. It is
built with the rotation layer's current login plus the engine factory's connect
arguments (sslmode, connect_timeout; application_name gets ``-listener``), and TCP
keepalives so a vanished host is noticed; its host name is resolved as the pools' are
(``resolve.with_hostaddr``), so a stalled resolver never stops the worker. A
notification for a watched bind, naming a version the worker does not use, runs a check
of that bind with the trigger ``notify``: the check asks Secrets Manager, so a
notification is only a hint and can never hand over a login. A version whose check
found AWSCURRENT elsewhere (AWSPENDING announced in the window) is not checked again for
further announcements of the window; an announcement with the stage ``AWSCURRENT`` says
that has changed, and is always checked.

**Surviving rotation.** A session outlives ``ALTER ROLE ... PASSWORD``, so the listener
keeps listening across rotations until its backend dies (restart, failover,
``pg_terminate_backend``). Then it reconnects with the credentials the rotator holds at
that moment (after a refused login it asks the rotator's reactive refresh for new ones),
first after 0.5 to 1.5 s (jittered: a restart or failover drops every worker's listener
at once), then, while it cannot log in, every 0.5 s, 1 s, 2 s ... up to 30 s; and it runs
one check after every reconnect, because notifications sent while it was away are lost.
LISTEN is refused on a hot standby: point the rotation layer's host at the primary (RDS's
endpoint is).
"""

from __future__ import annotations

import json
import random
import select
import threading
import time
from collections import deque
from typing import Any

import psycopg2
import structlog
from psycopg2 import sql

from commng_rotation import bounds
from commng_rotation.credentials import AWSCURRENT
from commng_rotation.engines import NoCredentials, error_code, is_auth_failure
from commng_rotation.events import Outcome, RotationEvent, Trigger, worker_name
from commng_rotation.resolve import with_hostaddr
from commng_rotation.rotator import Rotator
from commng_rotation.watcher import SecretWatcher

__all__ = ["FanOut"]

log = structlog.get_logger("commng_rotation.fanout")

SEND_TIMEOUT_S = 5.0
# How long one wait for a notification lasts: the loop's stop latency.
WAIT_S = 1.0
# A listener that heard nothing for this long asks its backend whether it is still there.
PING_EVERY_S = 30.0
PING_TIMEOUT_S = 5.0
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0
STOP_JOIN_TIMEOUT_S = 3.0
MAX_PAYLOAD_BYTES = 7999
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


class FanOut:
    """NOTIFY on adoption, LISTEN for the others' adoptions; one listener connection per worker."""

    def __init__(self, rotators: list[Rotator], watcher: SecretWatcher, channel: str) -> None:
        self.rotators = {r.bind: r for r in rotators}
        self.watcher = watcher
        self.channel = channel
        self.sent = 0
        self.received = 0
        self.reconnects = 0
        self.connected_at: float | None = None
        self._conn: Any = None
        self._last_heard = 0.0
        # Versions a notification named that AWSCURRENT did not hold (e.g. AWSPENDING adopted
        # in the window): repeated notifications for them cost no further check, until one
        # says AWSCURRENT holds the version now.
        self._unchanged: deque[tuple[str | None, str]] = deque(maxlen=32)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._senders: list[threading.Thread] = []

    # -- sending ----------------------------------------------------------------------

    def on_event(self, event: RotationEvent) -> None:
        """EventLog listener: announce a version adopted by any trigger but ``notify``."""
        if event.outcome == Outcome.ROTATED and event.trigger != Trigger.NOTIFY and event.new_version:
            self.announce(event.bind, event.new_version)

    def announce(self, bind: str | None, version: str) -> None:
        """Send the notification from a thread of its own (the caller never waits).

        The stage is read now, from the rotator, while it still describes ``version``.
        """
        rotator = self.rotators.get(bind)
        current = rotator.current if rotator is not None else None
        stage = current.stage if current is not None and current.version_id == version else None
        thread = threading.Thread(
            target=self.send, args=(bind, version, stage), name="commng-notify", daemon=True
        )
        self._senders = [t for t in self._senders if t.is_alive()] + [thread]
        thread.start()

    def send(self, bind: str | None, version: str, stage: str | None = None) -> bool:
        """pg_notify that ``bind`` adopted ``version``, over the primary with its current login
        (a short autocommit connection); True when sent."""
        if bind not in self.rotators:
            return False
        rotator = self._primary()
        credentials = rotator.credentials
        if credentials is None:
            return False
        payload = json.dumps({"bind": bind, "version": version, "worker": worker_name(), "stage": stage})
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            log.warning("rotation_notify_skipped", reason="payload too large", bind=bind)
            return False
        try:
            with bounds.deadline(SEND_TIMEOUT_S):
                conn = self._open(rotator, credentials.connect_params(), listen=False)
                try:
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
                finally:
                    conn.close()
        except Exception as exc:  # the others' poll and reactive refresh remain
            log.warning("rotation_notify_failed", bind=bind, version=version, error=error_code(exc))
            return False
        self.sent += 1
        log.info("rotation_notify_sent", bind=bind, version=version, channel=self.channel)
        return True

    # -- listening: the single steps -----------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the listener connection is open."""
        return self._conn is not None and not self._conn.closed

    def connect(self) -> None:
        """Open the listener connection with the current login and LISTEN (bounded)."""
        rotator = self._primary()
        credentials = rotator.credentials
        if credentials is None:
            raise NoCredentials("no database credentials are known yet")
        try:
            conn = self._open(rotator, credentials.connect_params())
        except psycopg2.OperationalError as exc:
            if not is_auth_failure(exc):
                raise
            # The login was rotated while we were away: the reactive refresh finds the new one.
            fresh = rotator.on_auth_failure(credentials)
            if fresh is None:
                raise
            conn = self._open(rotator, fresh.connect_params())
        self._conn = conn
        self._last_heard = time.monotonic()
        self.connected_at = self._last_heard
        log.info("rotation_listener_connected", channel=self.channel, reconnects=self.reconnects)

    def _open(self, rotator: Rotator, login: dict[str, Any], listen: bool = True) -> Any:
        args: dict[str, Any] = {**rotator.factory.options()["connect_args"], **KEEPALIVES, **login}
        role = "listener" if listen else "notify"
        args["application_name"] = f"{args.get('application_name') or 'rotation'}-{role}"[:63]
        timeout = float(args.get("connect_timeout") or 5) + PING_TIMEOUT_S
        with bounds.deadline(timeout):
            # A name is resolved here, cooperatively and bounded, as for the pools: libpq
            # would resolve it with a blocking getaddrinfo, stopping the whole worker.
            conn = psycopg2.connect(**with_hostaddr(args, bounds.remaining() or timeout))
            try:
                conn.autocommit = True
                if listen:
                    with conn.cursor() as cur:
                        cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            except BaseException:
                conn.close()
                raise
        return conn

    def wait_once(self, timeout_s: float = WAIT_S) -> list[str]:
        """Wait up to ``timeout_s`` for notifications and handle them; returns what was done.

        Raises psycopg2.Error or OSError when the backend is gone (the loop reconnects).
        """
        conn = self._conn
        if conn is None or conn.closed:
            raise psycopg2.InterfaceError("the listener is not connected")
        readable, _, _ = select.select([conn], [], [], timeout_s)
        if readable:
            conn.poll()  # a dead backend raises here: "terminating connection ..." or EOF
        elif time.monotonic() - self._last_heard > PING_EVERY_S:
            with bounds.deadline(PING_TIMEOUT_S), conn.cursor() as cur:
                cur.execute("SELECT 1")
            self._last_heard = time.monotonic()
        done = []
        while conn.notifies:
            notify = conn.notifies.pop(0)
            self._last_heard = time.monotonic()
            done.append(self.handle(notify.payload))
        return done

    def handle(self, payload: str) -> str:
        """Check now when ``payload`` names a watched bind and a version not in use."""
        try:
            data = json.loads(payload)
            bind, version, sender = data.get("bind"), data["version"], data.get("worker")
            if not isinstance(version, str) or not (bind is None or isinstance(bind, str)):
                raise TypeError
            # Absent from older senders' payloads: they are remembered as before.
            now_current = data.get("stage") == AWSCURRENT
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("rotation_notify_ignored", reason="malformed")
            return "malformed"
        rotator = self.rotators.get(bind)
        if rotator is None:
            return "other_bind"
        if rotator.current is not None and rotator.current.version_id == version:
            return "in_use"
        if now_current:
            # What an earlier check found (AWSCURRENT elsewhere) is no longer true: ask again.
            while (bind, version) in self._unchanged:
                self._unchanged.remove((bind, version))
        elif (bind, version) in self._unchanged:
            return "already_checked"
        self.received += 1
        log.info("rotation_notify_received", bind=bind, version=version, from_worker=sender)
        results = self.watcher.check_once(Trigger.NOTIFY, binds=[bind])
        if not now_current and all(r.change == "unchanged" for r in results):
            self._unchanged.append((bind, version))
        return "checked"

    def catch_up(self) -> None:
        """The check after a reconnect: notifications sent while away are lost."""
        log.info("rotation_listener_catch_up", reconnects=self.reconnects)
        self.watcher.check_once(Trigger.NOTIFY)

    def close(self) -> None:
        """Close the listener connection (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already dead: nothing to release
                log.debug("rotation_listener_close_failed")

    def _primary(self) -> Rotator:
        return self.rotators.get(None) or next(iter(self.rotators.values()))

    # -- the loop ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the listener loop is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the listener loop (a greenlet under gunicorn's gevent worker)."""
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="commng-rotation-listener", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = STOP_JOIN_TIMEOUT_S) -> None:
        """Stop the loop, close the listener and wait for sends in flight (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None
        self.close()
        for thread in self._senders:
            thread.join(timeout_s)

    def _run(self) -> None:
        delay = FIRST_RETRY_S
        first = True
        while not self._stop.is_set():
            if not self.connected:
                try:
                    self.connect()
                except Exception as exc:
                    log.warning("rotation_listener_connect_failed", error=error_code(exc), retry_in_s=delay)
                    if self._stop.wait(delay):
                        break
                    delay = min(delay * 2, MAX_RETRY_S)
                    continue
                delay = FIRST_RETRY_S
                if not first:
                    self.reconnects += 1
                    self.catch_up()
                first = False
            try:
                self.wait_once()
                continue
            except (psycopg2.Error, OSError, TimeoutError, ValueError) as exc:
                log.warning("rotation_listener_lost", error=error_code(exc))
            except Exception as exc:  # a bug must not end fan-out for this worker
                log.exception("rotation_listener_crashed", error=type(exc).__name__)
            self.close()
            # Not at once: every worker lost its listener together (restart, failover), and a
            # request that needs a login does the reactive refresh in its own context first.
            if self._stop.wait(FIRST_RETRY_S * random.uniform(1.0, 3.0)):
                break
        self.close()
