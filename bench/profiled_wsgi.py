"""gunicorn entry for ``bench/calls.py``: another entry's app, with cProfile switched by SIGUSR2.

``BENCH_PROFILE_TARGET`` names the app to serve (``wsgi:app``, ``bench.baseline_wsgi:app``);
its module patches gevent first, as in production. Each worker profiles between two
SIGUSR2 (gunicorn's workers leave that signal alone) and, at the second, writes its
statistics to ``BENCH_PROFILE_OUT/<pid>.prof``. The profile function is per thread and
every greenlet of the worker runs in the one thread, so every request is counted;
timings are distorted by the profiler, call counts are exact.
"""

from __future__ import annotations

import cProfile
import importlib
import os
import signal
import time
from typing import Any

_module, _, _attr = os.environ["BENCH_PROFILE_TARGET"].partition(":")
app = getattr(importlib.import_module(_module), _attr)

_profile: cProfile.Profile | None = None


def _toggle(signum: int, frame: Any) -> None:
    global _profile
    if _profile is None:
        _profile = cProfile.Profile(time.process_time)
        _profile.enable()
        return
    _profile.disable()
    path = os.path.join(os.environ["BENCH_PROFILE_OUT"], f"{os.getpid()}.prof")
    _profile.dump_stats(path + ".part")
    os.replace(path + ".part", path)  # the file appears whole, or not at all
    _profile = None


signal.signal(signal.SIGUSR2, _toggle)
