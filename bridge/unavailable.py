"""What counts as NATS (or JetStream) being unavailable: the bridge's routes answer 503 for these."""

from __future__ import annotations

import asyncio

import nats.errors
from nats.js.errors import Error as JetStreamError

NATS_UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    asyncio.TimeoutError,
    JetStreamError,
)
