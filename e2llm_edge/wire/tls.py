"""TLS towards the broker: a process's identity, its SSL context, and one clear line for
each way a handshake can fail.

An identity directory (written by ``e2llm broker init``) holds ``ca.crt`` (the cluster's
CA), ``client.crt`` and ``client.key`` (this process's certificate, whose common name is
its broker user name) and ``identity.json`` naming it. Only the standard library's
``ssl`` is needed, so a device agent stays light.

With TLS 1.3 the broker judges our certificate after the client's side of the handshake
is over: its verdict (unknown CA, expired, revoked) arrives as an alert on the first read,
inside paho's read loop, which only logs it. ``WatchedContext`` keeps that error so the
bus can name it (``explain``) instead of waiting out the connect timeout.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2llm_edge.errors import BusTLSError

CA_CERT, CLIENT_CERT, CLIENT_KEY, IDENTITY_FILE = (
    "ca.crt",
    "client.crt",
    "client.key",
    "identity.json",
)

# OpenSSL X509_V_ERR_* codes a client meets when verifying the broker's certificate
_UNKNOWN_CA = frozenset({2, 18, 19, 20, 21})
_EXPIRED, _NOT_YET_VALID = 10, 9
_HOST_MISMATCH = frozenset({62, 64})
# the broker's alert when we sent no certificate (TLS 1.3, TLS 1.2)
_NO_CERTIFICATE = ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE")


@dataclass(frozen=True)
class TLSConfig:
    """TLS towards the broker."""

    ca_certs: str | None = None
    """CA bundle that signed the broker's certificate (None: system store)."""
    certfile: str | None = None
    """Client certificate, for brokers that require one."""
    keyfile: str | None = None
    """Private key of ``certfile``."""
    insecure: bool = False
    """Skip hostname verification (test setups with self-signed certificates only)."""

    @classmethod
    def from_identity(cls, directory: str | Path) -> TLSConfig:
        """The CA, certificate and key of an identity directory."""
        d = Path(directory)
        return cls(str(d / CA_CERT), str(d / CLIENT_CERT), str(d / CLIENT_KEY))


def read_identity(directory: str | Path) -> dict[str, str]:
    """``identity.json`` of an identity directory: ``name`` (the user name its certificate
    carries), and the ``role`` and ``cluster`` it was made for."""
    path = Path(directory) / IDENTITY_FILE
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BusTLSError("bad_identity", "-", f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise BusTLSError("bad_identity", "-", f"{path}: expected an object of strings")
    if not data.get("name"):
        raise BusTLSError("bad_identity", "-", f"{path}: field 'name' is missing")
    return data


# A read returns at most one TLS record (16 KiB). paho asks for all that is left of a
# message (up to 4 MiB); CPython allocates that much for every record, then shrinks it:
# while glibc serves such sizes with mmap, receiving over TLS cost 2.3-2.5 ms/MB of CPU
# here instead of 0.8.
_MAX_READ = 64 * 1024


# OpenSSL writes each 16 KiB record with its own send(), and with TCP_NODELAY each one
# leaves at once: the broker woke up per record, ~50 context switches per MB on each side
# against ~2 in plaintext. Corking the socket while a large message is encrypted lets the
# kernel send full segments; it halved the switches here. Small messages are not corked,
# so a decode step's hop pays nothing.
_CORK_ABOVE = 64 * 1024


class _WatchedSocket(ssl.SSLSocket):
    """Records the TLS error that ends a handshake or the first read on its context; reads
    at most ``_MAX_READ`` bytes at a time; corks large writes."""

    def send(self, data: Any, flags: int = 0) -> int:
        if len(data) <= _CORK_ABOVE or not hasattr(socket, "TCP_CORK"):
            return super().send(data, flags)
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            return super().send(data, flags)
        finally:
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except ssl.SSLError as exc:
            _record(self.context, exc)
            raise

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        try:
            return super().read(len if buffer is not None else min(len, _MAX_READ), buffer)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            _record(self.context, exc)
            raise


class WatchedContext(ssl.SSLContext):
    """A client context that keeps the TLS failure that ended its connection attempt."""

    failure: ssl.SSLError | None = None
    """The first TLS error before ``connected()``."""
    on_failure: Callable[[], object] | None = None
    """Called (from any thread) when ``failure`` is set."""

    def connected(self) -> None:
        """The broker accepted us: later errors are a lost link, not a verdict."""
        self.on_failure = None
        self._settled = True

    _settled = False


def _record(ctx: ssl.SSLContext, exc: ssl.SSLError) -> None:
    if isinstance(ctx, WatchedContext) and ctx.failure is None and not ctx._settled:
        ctx.failure = exc
        if ctx.on_failure is not None:
            ctx.on_failure()


def client_context(cfg: TLSConfig, broker: str) -> WatchedContext:
    """An SSL context for one connection attempt (files are read again each time, so a
    renewed certificate is picked up at the next reconnect)."""
    ctx = WatchedContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the broker and its host name
    ctx.sslsocket_class = _WatchedSocket
    try:
        if cfg.ca_certs:
            ctx.load_verify_locations(cafile=cfg.ca_certs)
        else:
            ctx.load_default_certs()
    except (OSError, ssl.SSLError) as exc:
        raise BusTLSError(
            "bad_identity", broker, f"cannot load CA {cfg.ca_certs}: {_why(exc)}", path=cfg.ca_certs
        ) from None
    if cfg.certfile:
        try:
            ctx.load_cert_chain(cfg.certfile, cfg.keyfile)
        except (OSError, ssl.SSLError) as exc:
            what = (
                f"key {cfg.keyfile} does not belong to certificate {cfg.certfile}"
                if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH"
                else f"cannot load certificate {cfg.certfile} / key {cfg.keyfile}: {_why(exc)}"
            )
            raise BusTLSError("bad_identity", broker, what, path=cfg.certfile) from None
    if cfg.insecure:
        ctx.check_hostname = False
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def explain(exc: ssl.SSLError, cfg: TLSConfig, host: str, port: int) -> BusTLSError:
    """One line naming what went wrong in a failed handshake, and where to look."""
    broker = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _HOST_MISMATCH:
            return BusTLSError(
                "host_mismatch",
                broker,
                f"the broker's certificate is not valid for {host!r} (host name mismatch): "
                "connect with a name it lists, or re-issue it with "
                f"`e2llm broker renew broker --host {host}`",
            )
        if code == _EXPIRED:
            return BusTLSError(
                "expired",
                broker,
                "the broker's certificate has expired: `e2llm broker renew broker`, "
                "then reload the broker",
            )
        if code == _NOT_YET_VALID:
            return BusTLSError(
                "expired", broker, "the broker's certificate is not valid yet: check the clocks"
            )
        if code in _UNKNOWN_CA:
            return BusTLSError(
                "unknown_ca",
                broker,
                f"the broker's certificate is not signed by the CA in {cfg.ca_certs} "
                "(unknown CA): is this identity from this cluster?"
                if cfg.ca_certs
                else "the broker's certificate is not signed by a CA this machine trusts "
                "(unknown CA): pass --identity DIR (made by `e2llm broker init`)",
                path=cfg.ca_certs,
            )
        return BusTLSError(
            "unknown_ca", broker, f"the broker's certificate was refused: {exc.verify_message}"
        )
    reason = str(exc.reason or "")
    cert = cfg.certfile
    if not cert and reason in _NO_CERTIFICATE:
        return BusTLSError(
            "no_client_certificate",
            broker,
            "the broker requires a client certificate: pass --identity DIR "
            "(made by `e2llm broker init`)",
        )
    verdicts = {
        "TLSV1_ALERT_UNKNOWN_CA": (
            "client_unknown_ca",
            "is not signed by the CA it trusts (unknown CA): is it from this cluster?",
        ),
        "SSLV3_ALERT_CERTIFICATE_EXPIRED": (
            "client_expired",
            "has expired: `e2llm broker renew NAME` on the fog node",
        ),
        "SSLV3_ALERT_CERTIFICATE_REVOKED": ("client_revoked", "has been revoked"),
    }
    if reason in verdicts:
        problem, what = verdicts[reason]
        return BusTLSError(problem, broker, f"the broker refused certificate {cert}: it {what}")
    if "ALERT" in reason:
        return BusTLSError(
            "client_rejected",
            broker,
            f"the broker refused certificate {cert}: {_why(exc)}",
            path=cert,
        )
    return BusTLSError("client_rejected", broker, f"handshake failed: {_why(exc)}")


def speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether ``host:port`` answers a TLS handshake (to tell a plaintext client why it
    got no answer). Certificates are not checked: nothing is sent after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except ssl.SSLError as exc:
        # an alert (it wanted a certificate) is still a TLS server talking
        return "ALERT" in str(exc.reason or "")
    except OSError:
        return False
