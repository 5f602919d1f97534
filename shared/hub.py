"""Reaching the Hugging Face Hub: fail fast, with one line, when it cannot be reached.

huggingface_hub retries an unreachable host for about 25 s and logs every retry; a user without
a network should instead learn at once which offline options they have.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from .errors import UserError


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def require_hub(what: str, offline_hint: str, timeout: float = 5.0) -> None:
    """Raise UserError naming `offline_hint` unless the Hub answers a TCP connection."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"{what} needs the Hugging Face Hub but HF_HUB_OFFLINE=1; {offline_hint}")
    url = urlparse(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"{what}: cannot reach the Hugging Face Hub at {host} ({e.strerror or type(e).__name__}); "
                        f"{offline_hint}") from None
    try:  # retries are reported by our own one-line error, not as a stream of warnings
        from huggingface_hub.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


# What the Hub's client libraries (requests, httpx, urllib3, huggingface_hub) raise when the network fails
CONNECTION_ERRORS = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ConnectError", "TimeoutError",
                     "RemoteDisconnected", "ChunkedEncodingError", "OfflineModeIsEnabled")


def hub_failure(e: Exception) -> tuple[str, bool]:
    """A Hub error as `Kind: first line of its message` (a misspelled name keeps the Hub's own words),
    and whether it was the connection that failed (then the offline options apply)."""
    kind = type(e).__name__
    lost = kind in CONNECTION_ERRORS or isinstance(e, (ConnectionError, TimeoutError))
    return f"{kind}: {first_line(e)}", lost


def first_line(e: Exception) -> str:
    """An exception's message cut to one line of at most 300 characters."""
    return (str(e).strip().splitlines() or [""])[0][:300]
