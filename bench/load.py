"""The bench's load: devstack's generator, or a read-heavy mix of it for the replica scenarios.

``ReadHeavyLoad`` keeps the generator's bookkeeping (samples, created ids, bounded run) and
changes only what each client asks for. Per cycle of ``reads_per_write + 1`` requests:

1. post a message (201: its id counts as a write to read back);
2. GET that message at once (read-your-write: a message the replica has not replayed yet
   must still be found, through the primary);
3. list the channels;
4. the rest: list a channel's 20 newest messages.

Every read is one of the routes served by the replica bind when the app has one.
"""

from __future__ import annotations

import time
from typing import Any

from devstack.processes import LoadGenerator

__all__ = ["ReadHeavyLoad", "make_load"]


class ReadHeavyLoad(LoadGenerator):
    """N client threads, ``reads_per_write`` reads for every message posted."""

    def __init__(
        self, base_url: str, channel_ids: list[int], clients: int, max_s: float, reads_per_write: int
    ) -> None:
        if reads_per_write < 2 or not channel_ids:
            raise ValueError("ReadHeavyLoad needs channels and at least 2 reads per write")
        super().__init__(base_url, channel_ids, clients, max_s=max_s)
        self.reads_per_write = reads_per_write

    def _client(self, n: int) -> None:
        import requests

        session = requests.Session()
        deadline = time.monotonic() + self.max_s
        cycle = self.reads_per_write + 1
        i = 0
        last_id: int | None = None
        while not self._stop.is_set() and time.monotonic() < deadline:
            channel = self.channel_ids[(n + i // cycle) % len(self.channel_ids)]
            step = i % cycle
            body: Any = None
            if step == 0:
                path = f"/api/channels/{channel}/messages"
                sample, body = self._call(session.post, path, json={"body": f"c{n} m{i}"})
                last_id = int(body["id"]) if sample.status == 201 and body else None
                if last_id is not None:
                    with self._lock:
                        self.result.created_ids.append(last_id)
            elif step == 1 and last_id is not None:
                sample, _ = self._call(session.get, f"/api/messages/{last_id}")
            elif step == 2:
                sample, _ = self._call(session.get, "/api/channels")
            else:
                sample, _ = self._call(session.get, f"/api/channels/{channel}/messages?limit=20")
            with self._lock:
                self.result.samples.append(sample)
            i += 1
        session.close()


def make_load(
    base_url: str, channel_ids: list[int], clients: int, max_s: float, path: str | None, reads_per_write: int
) -> LoadGenerator:
    """The load a scenario asks for: one read per write (devstack's), read-heavy, or one path."""
    if reads_per_write > 1 and path is None:
        return ReadHeavyLoad(base_url, channel_ids, clients, max_s, reads_per_write)
    return LoadGenerator(base_url, channel_ids, clients, max_s=max_s, path=path)
