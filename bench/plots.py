"""The plot of a run: throughput and p99 per second for each scenario (the PNG)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from bench.replica import replica_per_second

__all__ = ["plot"]


def plot(doc: dict[str, Any], path: Path) -> None:
    """Throughput and p99 per second for each scenario; rotation steps, events, failures."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or servers
    import matplotlib.pyplot as plt

    results = doc["scenarios"]
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.6 * len(results)), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=True):
        tl = r["timeline"]
        failed = Counter(int(t) for t in tl["failures_t"])
        ok_rps = [n - failed.get(t, 0) for t, n in zip(tl["t"], tl["rps"], strict=True)]
        ax.plot(tl["t"], ok_rps, color="tab:blue", lw=1.2, label="successful requests/s")
        if r.get("replica_reads"):
            per_s = replica_per_second(r["replica_reads"]["series"])
            # Second k is [k, k + 1), as for the requests (binned by when they ended).
            ax.plot(range(len(per_s)), per_s, color="tab:cyan", lw=1, label="replica reads/s")
        ax.set_ylabel("ok req/s", color="tab:blue")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot(
            tl["t"], [v if v is not None else float("nan") for v in tl["p99_ms"]], color="tab:orange", lw=1
        )
        ax2.set_ylabel("p99 ms", color="tab:orange")
        ax2.set_ylim(bottom=0)
        for mark in r["marks"]:
            color = "tab:green" if mark["kind"] == "rotation" else "tab:purple"
            ax.axvline(mark["t"], color=color, lw=0.8, ls="--", alpha=0.8)
            if mark["kind"] != "rotation" or mark["label"].endswith("pending"):
                label = mark["label"].split()[0] if mark["kind"] == "rotation" else mark["label"]
                ax.annotate(
                    label,
                    (mark["t"], 1),
                    xycoords=("data", "axes fraction"),
                    fontsize=6,
                    rotation=90,
                    va="top",
                    ha="right",
                    color=color,
                )
        if tl["failures_t"]:
            ax.plot(
                tl["failures_t"], [0] * len(tl["failures_t"]), "x", color="red", ms=6, label="failed request"
            )
        ax.set_title(
            f"{r['name']}: {r['requests']} requests, {r['failures']} failed, p99 {r['latency_ms']['p99']} ms",
            fontsize=10,
            loc="left",
        )
        ax.set_xlim(0, max(tl["t"], default=1) + 1)
    axes[-1, 0].set_xlabel(
        "seconds since the load started (green: rotation steps, purple: other events, red x: failed "
        "requests; cyan: reads/s served by the replica)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
