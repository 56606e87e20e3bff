"""Cluster addresses, checked in seconds before anything slow: a Ray GCS address (`HOST:PORT`, `auto`,
`ray://HOST:PORT`) for `distune run --address`, and a dashboard's HTTP address for the Jobs API commands.

`ray.init` on an address where nothing listens retries for ~15 minutes before it raises; a plain TCP connect
tells in milliseconds (or `TIMEOUT_S` for an unroutable host). Imports no ray (the parser and error paths
stay cheap).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

from distune.errors import ConfigError

TIMEOUT_S = 5.0


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """`host:port` (an optional scheme is dropped) -> (host, port), or ConfigError naming the address."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ConfigError(f"{what}: expected HOST:PORT (e.g. 10.0.0.1:6379)")
    return parts.hostname, port


def check_reachable(host: str, port: int, what: str) -> None:
    """Something accepts TCP connections at host:port, or ConfigError saying what failed where."""
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return
    except socket.gaierror:
        raise ConfigError(f"{what}: cannot resolve host {host!r}") from None
    except TimeoutError:
        raise ConfigError(f"{what}: no answer from {host}:{port} within {TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise ConfigError(f"{what}: nothing answers at {host}:{port} ({e.strerror or e}); is the Ray head "
                          f"running, and is this its address?") from None


def check_gcs_address(address: str) -> None:
    """Fail fast on a Ray cluster address that cannot work (`run`, `eval`, `generate`, `cache-teacher`)."""
    what = f"--address {address}"
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"{what}: that is a dashboard (Jobs API) address; --address joins the cluster's GCS "
                          f"(HOST:6379 by default), or use `distune submit` to send the run as a job")
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address or address == "auto":
            return  # Ray looks for a cluster started on this machine and says so itself
        what = f"--address auto (RAY_ADDRESS={address})"
    host, port = split_host_port(address, what)
    check_reachable(host, port, what)
