"""Domain errors of the runtime, each with structured fields.

Callers branch on the type and read the fields; the message is for people.
"""

from __future__ import annotations


class E2LLMError(Exception):
    """Base of every error the runtime raises on purpose."""


class CodecError(E2LLMError):
    """A message could not be encoded or decoded.

    ``field`` names the offending part (``"header.v"``, ``"kv_chunk.key"``, ``"payload"``);
    ``request_id`` and ``kind`` are filled in when the header could be read, so a receiver
    can still answer the requester with an error.
    """

    def __init__(
        self,
        field: str,
        reason: str,
        *,
        request_id: str | None = None,
        kind: int | None = None,
    ) -> None:
        self.field = field
        self.reason = reason
        self.request_id = request_id
        self.kind = kind
        super().__init__(f"{field}: {reason}")


class TopicError(E2LLMError):
    """A topic string or topic id does not fit the topic's pattern."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"topic {topic!r}: {reason}")


class BusError(E2LLMError):
    """The MQTT bus failed an operation (not connected, refused subscription, ...)."""


class BusTimeout(BusError):
    """A bus operation did not finish within its timeout."""

    def __init__(self, operation: str, topic: str | None, timeout: float) -> None:
        self.operation = operation
        self.topic = topic
        self.timeout = timeout
        where = f" on {topic!r}" if topic else ""
        super().__init__(f"{operation}{where} timed out after {timeout:.3g} s")


class BusConnectError(BusError):
    """The broker could not be reached before the first connection (refused, unknown host,
    no answer, TLS failure): ``reason`` says which, in words a user can act on."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"cannot reach the broker at {host}:{port}: {reason}")


class BusAuthError(BusError):
    """The broker refused the connection's credentials (CONNACK not authorised)."""

    def __init__(self, username: str | None, reason: str) -> None:
        self.username = username
        self.reason = reason
        super().__init__(f"broker refused user {username!r}: {reason}")


class BusTLSError(BusError):
    """A TLS link to the broker failed in a way retrying will not mend: its certificate is
    not from our CA, has expired or names another host; or the broker refused ours.

    ``problem`` is a stable code (``unknown_ca``, ``expired``, ``host_mismatch``,
    ``client_unknown_ca``, ``client_expired``, ``client_revoked``, ``client_rejected``,
    ``no_client_certificate``, ``bad_identity``, ``expects_tls``); ``broker`` is
    ``host:port``; ``path`` the file to look at, when one is to blame.
    """

    def __init__(self, problem: str, broker: str, reason: str, *, path: str | None = None) -> None:
        self.problem = problem
        self.broker = broker
        self.reason = reason
        self.path = path
        super().__init__(f"TLS with broker {broker}: {reason}")


class SubscriptionRefused(BusError):
    """The broker answered a SUBSCRIBE with a failure code (usually an ACL denial)."""

    def __init__(self, topic_filter: str, reason_code: int) -> None:
        self.topic_filter = topic_filter
        self.reason_code = reason_code
        super().__init__(f"subscription to {topic_filter!r} refused (code {reason_code})")


class ConfigError(E2LLMError, ValueError):
    """A setting given by a user (a flag, a URL, a file) is unusable; the message names
    the setting, and the file or value."""


class ParamError(E2LLMError, ValueError):
    """A generation request a model cannot serve as asked (a parameter, the prompt, or
    both against the model's limits). ``field`` names the offending parameter."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(reason)


class BrokerError(E2LLMError):
    """Starting, configuring or stopping a broker failed."""

    def __init__(self, reason: str, *, log_tail: str = "") -> None:
        self.reason = reason
        self.log_tail = log_tail
        super().__init__(reason + (f"\n--- broker log ---\n{log_tail}" if log_tail else ""))
