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

from typing import Any

from devstack.processes import LoadGenerator, Sample

__all__ = ["ReadHeavyLoad", "make_load"]


class ReadHeavyLoad(LoadGenerator):
    """N client threads, ``reads_per_write`` reads for every message posted."""

    def __init__(
        self,
        base_url: str,
        channel_ids: list[int],
        clients: int,
        max_s: float,
        reads_per_write: int,
        keys: bool = False,
        retry_503: bool = False,
    ) -> None:
        if reads_per_write < 2 or not channel_ids:
            raise ValueError("ReadHeavyLoad needs channels and at least 2 reads per write")
        super().__init__(base_url, channel_ids, clients, max_s=max_s, keys=keys, retry_503=retry_503)
        self.reads_per_write = reads_per_write
        # Each client's last posted id (each client thread touches only its own key).
        self._last_id: dict[int, int | None] = {}

    def _next_request(self, session: Any, n: int, i: int) -> Sample:
        cycle = self.reads_per_write + 1
        channel = self.channel_ids[(n + i // cycle) % len(self.channel_ids)]
        step = i % cycle
        if step == 0:
            sample, self._last_id[n] = self._post(session, channel, f"{self.tag} c{n} m{i}")
            return sample
        last_id = self._last_id.get(n)
        if step == 1 and last_id is not None:
            return self._call(session.get, f"/api/messages/{last_id}")[0]
        if step == 2:
            return self._call(session.get, "/api/channels")[0]
        return self._call(session.get, f"/api/channels/{channel}/messages?limit=20")[0]


def make_load(
    base_url: str,
    channel_ids: list[int],
    clients: int,
    max_s: float,
    path: str | None,
    reads_per_write: int,
    keys: bool = False,
    retry_503: bool = False,
) -> LoadGenerator:
    """The load a scenario asks for: one read per write (devstack's), read-heavy, or one path.

    ``retry_503``: a post answered 503 is sent once more; ``keys``: with an Idempotency-Key.
    """
    if reads_per_write > 1 and path is None:
        return ReadHeavyLoad(base_url, channel_ids, clients, max_s, reads_per_write, keys, retry_503)
    return LoadGenerator(
        base_url, channel_ids, clients, max_s=max_s, path=path, keys=keys, retry_503=retry_503
    )
