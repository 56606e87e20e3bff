"""Ray token auth on the client side (drivers joining a cluster, `distune submit` and friends).

Imports ray only inside the function: the CLI's parser stays cheap.
"""

from __future__ import annotations

import os
from pathlib import Path


def token_auth_if_available() -> None:
    """Clusters started by Ray >= 2.5x use token auth by default, but a client joining one only sends its
    token when RAY_AUTH_MODE=token. Turn that on when a token is at hand (never read or print it here)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        from ray._raylet import Config

        Config.initialize("")  # Ray read its settings at import; make it see the mode (as ray's own helper does)
