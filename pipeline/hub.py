"""The Hugging Face hub, reached only when it answers: offline, only its local cache is tried, so a
missing model fails at once instead of after a minute of retries."""

from __future__ import annotations

import socket
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator
from urllib.parse import urlparse


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection (never, with ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def _offline() -> Iterator[None]:
    """huggingface_hub's offline mode (what ``HF_HUB_OFFLINE=1`` sets) for the calls inside: files come
    from its local cache or fail at once."""
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def hub_access() -> tuple[ContextManager, str]:
    """The context to call the hub in (offline mode when it does not answer), and where the files came
    from in words, for errors."""
    if hub_reachable():
        return nullcontext(), "the hub's cache or a download"
    return _offline(), "the hub's local cache (the hub is unreachable: offline)"
