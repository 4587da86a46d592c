"""The per-job API key between the trainer and its rollout servers, as SGLang's `--api-key` checks it.

SGLang (srt/utils `add_api_key_middleware`) wants `Authorization: Bearer <key>` on every route except those
under /health (and /metrics), and answers 401 {"error": "Unauthorized"} otherwise. The key travels in the
environment variable DAPO_API_KEY: launch/common.sh makes one per job, the launcher (rollout/launcher.py)
makes one when it starts servers without it, and the client sends it. Never log it.
"""

import hmac
import os
import secrets

API_KEY_ENV = "DAPO_API_KEY"
OPEN_ROUTE_PREFIXES = ("/health", "/metrics")  # answered without a key, as SGLang does


def new_api_key() -> str:
    """256 random bits, hex: safe on a command line and in an HTTP header."""
    return secrets.token_hex(32)


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def authorization_header(api_key: str | None) -> dict[str, str]:
    """The header the client sends; none without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def needs_key(path: str) -> bool:
    return not path.startswith(OPEN_ROUTE_PREFIXES)


def is_authorized(authorization: str | None, api_key: str) -> bool:
    """Whether an Authorization header carries the key; compared in constant time (no timing oracle)."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())
