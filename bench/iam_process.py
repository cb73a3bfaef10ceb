"""The IAM-checking endpoint in a process of its own, for the bench's ``iam`` scenarios.

In the bench process, the endpoint's asyncio thread would share one GIL with the load
generator's client threads, and each would slow the other. In its own process it competes
for the cores like PostgreSQL and gunicorn do, and the bench's clients are measured as in
every other scenario. Both scenarios of the pair (``iam`` and ``iam-password``) run one,
identical but for ``check_tokens``.

The parent talks to it over pipes, one JSON line at a time: the endpoint's arguments (the
backend password among them: never on the command line, where ``ps`` would show it) go to
its stdin; it answers ``{"port": N}`` once it listens; each ``stats`` line is answered with
``{"connects": N, "refusals": {cause: N}, "cpu_s": seconds}`` (its process's CPU time); end of input stops it.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from devstack.processes import ROOT

__all__ = ["EndpointProcess"]

_START_TIMEOUT_S = 30.0
_ANSWER_TIMEOUT_S = 10.0


class EndpointProcess:
    """``python -m bench.iam_process``: an ``IamEndpoint`` on 127.0.0.1, answering ``stats``."""

    def __init__(self, config: dict[str, Any], logfile: Path) -> None:
        """``config``: IamEndpoint's arguments as JSON (see ``_serve``)."""
        self.config = config
        self.logfile = logfile
        self.port = 0
        self._process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None

    def start(self) -> EndpointProcess:
        self._log = open(self.logfile, "a")  # noqa: SIM115 - closed by stop()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.iam_process"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        try:
            self.port = int(self._ask(json.dumps(self.config), _START_TIMEOUT_S)["port"])
        except BaseException:
            self.stop()
            raise
        return self

    def stats(self) -> dict[str, Any]:
        """Completed logins, refusals by cause and CPU seconds, counted since the endpoint started."""
        return self._ask("stats", _ANSWER_TIMEOUT_S)

    def stop(self) -> None:
        """Close its input (it stops the endpoint and exits); killed if it does not."""
        process, self._process = self._process, None
        if process is not None:
            assert process.stdin is not None
            try:
                process.stdin.close()
                process.wait(_ANSWER_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _ask(self, line: str, timeout_s: float) -> dict[str, Any]:
        process = self._process
        assert process is not None
        assert process.stdin is not None
        assert process.stdout is not None
        process.stdin.write(line + "\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        answer = process.stdout.readline() if ready else ""
        if not answer:
            raise RuntimeError(
                f"the bench's IAM endpoint did not answer within {timeout_s:.0f} s: see {self.logfile}"
            )
        result: dict[str, Any] = json.loads(answer)
        return result


def _serve() -> None:
    """The child: one endpoint until its input ends."""
    from devstack.iam_endpoint import IamEndpoint

    config = json.loads(sys.stdin.readline())
    backend = ("127.0.0.1", int(config["backend_port"]))
    endpoint = IamEndpoint(
        backend=lambda: backend,
        logins=config["logins"],
        hostname=config["hostname"],
        region=config["region"],
        access_key=config["access_key"],
        secret_key=config["secret_key"],
        certfile=Path(config["certfile"]),
        keyfile=Path(config["keyfile"]),
        token_lifetime_s=float(config["token_lifetime_s"]),
        check_tokens=bool(config["check_tokens"]),
    )
    with endpoint:
        print(json.dumps({"port": endpoint.port}), flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                counts = {
                    "connects": endpoint.connects,
                    "refusals": dict(endpoint.refusals),
                    "cpu_s": time.process_time(),
                }
                print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    _serve()
