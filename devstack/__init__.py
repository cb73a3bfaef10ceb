"""Development tooling: the local stack, the PostgreSQL harness, load and rotation helpers.

Nothing in the request path imports this package.
"""

from devstack.postgres import PostgresCluster, free_port, new_password, running_cluster
from devstack.secrets import rotate_alternating, rotate_secret, secrets_client

__all__ = [
    "PostgresCluster",
    "free_port",
    "new_password",
    "rotate_alternating",
    "rotate_secret",
    "running_cluster",
    "secrets_client",
]
