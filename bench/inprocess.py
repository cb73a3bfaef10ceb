"""`python -m bench.inprocess`: app-side CPU per request, the service's app against the yardstick's.

No gunicorn, no sockets: both Flask apps are built in this process (gevent patched first,
as in a worker) against one database of the bench's own PostgreSQL, and the Flask test
client drives the cost bench's request pair (post a message, read the channel's 20 newest)
through each, interleaved in blocks. The difference is what the service's Flask-level
features cost (request id, metrics, retry, pinned session, bounded wait, xid noting),
without the access log and the server. The wait callback is process-wide: the service's
bounded one is installed last and serves both apps, so its cost is not in the difference.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from bench.stack import BenchStack  # noqa: E402


def _pair(client: Any, channel: int, n: int) -> None:
    for i in range(n):
        posted = client.post(f"/api/channels/{channel}/messages", json={"body": f"m{i}"})
        assert posted.status_code == 201, posted.status_code
        listed = client.get(f"/api/channels/{channel}/messages?limit=20")
        assert listed.status_code == 200, listed.status_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__)
    parser.add_argument("--blocks", type=int, default=6, help="interleaved blocks per app")
    parser.add_argument("--pairs", type=int, default=200, help="post+read pairs per block")
    args = parser.parse_args(argv)
    stack = BenchStack()
    metrics_dir = tempfile.TemporaryDirectory(prefix="commng-inprocess-")
    try:
        stack.open()
        db = stack.new_database("inprocess")
        os.environ.update(stack.postgres_env(db.name))
        os.environ.update(
            POSTGRES_USER=db.role,
            POSTGRES_PASSWORD=db.password,
            LOG_LEVEL="WARNING",
            PROMETHEUS_MULTIPROC_DIR=metrics_dir.name,
            POSTGRES_POOL_SIZE="5",
            POSTGRES_MAX_OVERFLOW="0",
        )
        os.environ.pop("DB_SECRET_ID", None)
        from bench import baseline
        from commng.app import create_app

        apps = {"baseline": baseline.create_app(), "service": create_app()}
        clients = {name: app.test_client() for name, app in apps.items()}
        channels = {
            name: client.post("/api/channels", json={"name": name}).get_json()["id"]
            for name, client in clients.items()
        }
        for name, client in clients.items():
            _pair(client, channels[name], 50)  # warm up
        cpu = dict.fromkeys(clients, 0.0)
        for _ in range(args.blocks):
            for name, client in clients.items():
                started = time.process_time()
                _pair(client, channels[name], args.pairs)
                cpu[name] += time.process_time() - started
        per_request = {name: cpu[name] / (args.blocks * args.pairs * 2) * 1e6 for name in cpu}
        for name, us in per_request.items():
            print(f"{name}: {us:.0f} us CPU per request (client and app, in process)")
        print(f"service - baseline: {per_request['service'] - per_request['baseline']:.0f} us per request")
    finally:
        stack.close()
        metrics_dir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
