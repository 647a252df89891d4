"""The two ways handling a message can fail, which decide what happens to it.

Transient: the world may heal (API server restarting, throttling, a conflict) — the message is
redelivered later by JetStream. Permanent: the same message would fail the same way (bad values,
policy, validation) — retrying only delays the report, so it goes to the dead letters at once.
"""

from __future__ import annotations


class HandlingError(Exception):
    """Base: the message says what failed, safe to log and store.

    `applied` lists what of the message was applied before the failure (its status shows them).
    """

    applied: tuple[object, ...] = ()


class TransientError(HandlingError):
    pass


class PermanentError(HandlingError):
    pass
