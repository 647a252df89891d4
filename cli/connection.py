"""The command line's NATS connection: one attempt, and one readable line when it fails."""

from __future__ import annotations

from nats.aio.client import Client

from gitfaas import natsconn
from gitfaas.settings import Settings


async def _quiet(_exc: Exception) -> None:
    """A command says what went wrong once, in its own line; the client's own reports would repeat it."""


async def connect(settings: Settings) -> Client:
    try:
        return await natsconn.connect(settings, "gitfaas-cli", attempts=1, error_cb=_quiet)
    except Exception as exc:  # noqa: BLE001 — any failure to connect means the same to a person
        raise SystemExit(f"gitfaas: cannot reach NATS at {natsconn.display_servers(settings)}: "
                         f"{exc or type(exc).__name__}") from None
