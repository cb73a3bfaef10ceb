"""`python -m bench.iam_sign`: what one IAM database authentication token costs to sign.

DB_AUTH=iam signs with botocore (``generate_db_auth_token``: a SigV4 presigned URL, no
network call once AWS credentials are loaded) at most once per DB_IAM_TOKEN_REUSE_S per
worker, through the same path the service takes (``commng_rotation.iam.IamTokenSource``),
with a clock moved past the reuse window before every call so that each one signs. The
first call (botocore loads its service model and credentials) is reported on its own.

Prints the median and the 1st-99th percentile range of ``--rounds`` rounds of ``--tokens``
signatures each, in µs per token (``IamTokenSource.token``: signing, the issue
record and its listener; and botocore's call alone), and writes ``bench/results/iam_sign.md``. AWS
credentials need not be real: the token is computed locally (the bench sets dummy ones
when none are in the environment).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from pathlib import Path

from devstack.processes import ROOT

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Sign ``--tokens`` tokens ``--rounds`` times; report µs per token."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")

    import boto3
    import structlog

    # The service logs iam_token_signed at INFO, once per 10 minutes; here it would be the
    # cost measured (a console line per token). Warnings still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    from commng_rotation import IamTokenSource, RotationSettings
    from commng_rotation.iam import rds_signer

    settings = RotationSettings(
        auth="iam",
        username="commng_app",
        host="commng.cluster-abcdefghijkl.eu-west-1.rds.amazonaws.com",
        aws_region="eu-west-1",
    )
    started = time.perf_counter()
    client = boto3.client("rds", region_name="eu-west-1")
    clock = [0.0]
    source = IamTokenSource(rds_signer(client), settings, clock=lambda: clock[0])
    signer_us: list[float] = []
    source.listeners.append(lambda issued: signer_us.append(issued.sign_us))
    credentials = source.fetch().credentials
    source.token(credentials)
    first_ms = (time.perf_counter() - started) * 1000
    per_token: list[float] = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            clock[0] += settings.iam_token_reuse_s  # past the window: every call signs
            source.token(credentials)
        per_token.append((time.perf_counter() - t0) / args.tokens * 1_000_000)
    per_token.sort()
    median = statistics.median(per_token)
    lines = [
        f"Command: `python -m bench.iam_sign --tokens {args.tokens} --rounds {args.rounds}` "
        f"(Python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f})",
        "",
        "| what | µs per token |",
        "|---|---:|",
        f"| signing one token (median of {args.rounds} rounds of {args.tokens}) | {median:.0f} |",
        f"| fastest - slowest round | {per_token[0]:.0f} - {per_token[-1]:.0f} |",
        f"| of which botocore's generate_db_auth_token (median) | {statistics.median(signer_us[1:]):.0f} |",
        f"| first token of a worker (client, service model, credentials) | {first_ms * 1000:.0f} |",
        "",
        f"At the default reuse of {settings.iam_token_reuse_s:.0f} s a worker signs at most once "
        f"per {settings.iam_token_reuse_s / 60:.0f} minutes: {median / settings.iam_token_reuse_s:.2f} µs "
        "of signing per second of serving.",
    ]
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results" / "iam_sign.md"
    Path(out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
