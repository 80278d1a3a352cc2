"""The cluster's certificate authority: who may connect to the broker, and as whom.

One CA per cluster signs a server certificate for the broker (its host names and IP
addresses) and one client certificate per identity (each device, the orchestrator, the
monitor, each client). A certificate's common name is the identity's broker user name
(Mosquitto's ``use_identity_as_username``), so the ACL derived from the topic table
applies to it unchanged. Revoking an identity adds its serials to the CRL the broker
checks at every handshake; nobody else needs a new key.

Everything lives in one secrets directory (``broker/secrets/``, gitignored), private keys
mode 0600. ``identities/<name>/`` is what one process needs and nothing more: the CA
certificate, its own certificate and key, and ``identity.json`` naming it; copy that
directory to the device and pass it as ``--identity``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from e2llm_edge.errors import BrokerError
from e2llm_edge.ops.broker import write_private
from e2llm_edge.wire import topics
from e2llm_edge.wire.tls import CA_CERT, CLIENT_CERT, CLIENT_KEY, IDENTITY_FILE

CA_DAYS = 3650
"""The CA (and its CRL) outlive every certificate it signs; rotating it re-keys everyone."""
LEAF_DAYS = 825
"""Broker and identity certificates: about two years, then ``renew``."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: handshakes and signatures cost little on a Raspberry Pi, unlike RSA.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Issued:
    """One certificate the CA signed (the CA's own register, like openssl's index.txt)."""

    name: str
    role: str
    serial: int
    not_after: str
    revoked_at: str | None = None


class ClusterCA:
    """The CA files of one secrets directory: ``ca.crt``, ``ca.key`` (0600), ``crl.pem``,
    ``issued.json``, ``broker.crt``/``broker.key`` and ``identities/<name>/``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        try:
            self.cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            state = json.loads(self.index_path.read_text())
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BrokerError(f"{directory}: no usable cluster CA ({exc})") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise BrokerError(f"{self.key_path}: expected an EC private key")
        self.key = key
        self.cluster: str = state["cluster"]
        self.issued = [Issued(**x) for x in state["issued"]]

    # ------------------------------------------------------------------ paths

    @property
    def cert_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def key_path(self) -> Path:
        return self.dir / "ca.key"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def index_path(self) -> Path:
        return self.dir / "issued.json"

    @property
    def server_cert_path(self) -> Path:
        return self.dir / "broker.crt"

    @property
    def server_key_path(self) -> Path:
        return self.dir / "broker.key"

    def identity_dir(self, name: str) -> Path:
        return self.dir / "identities" / topics.check_id(name, "identity")

    # ------------------------------------------------------------------ creating

    @classmethod
    def create(cls, directory: Path, cluster: str, *, days: int = CA_DAYS) -> ClusterCA:
        """A new CA for ``cluster`` (overwrites one that is there: the caller decides)."""
        topics.check_id(cluster, "cluster")
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "e2llm-edge"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"e2llm cluster {cluster} CA"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "ca.crt").write_bytes(_pem(cert))
        write_private(directory / "ca.key", _key_pem(key))
        write_private(
            directory / "issued.json", json.dumps({"cluster": cluster, "issued": []}).encode()
        )
        ca = cls(directory)
        ca.write_crl()
        return ca

    def _sign(
        self,
        common_name: str,
        key: ec.EllipticCurvePrivateKey,
        usage: x509.ObjectIdentifier,
        *,
        days: int,
        sans: Sequence[x509.GeneralName] = (),
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:
        now = _now()
        start = not_before or now - dt.timedelta(minutes=5)
        end = min(start + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(
                            NameOID.ORGANIZATION_NAME, f"e2llm cluster {self.cluster}"
                        ),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def _record(self, name: str, role: str, cert: x509.Certificate) -> None:
        self.issued.append(
            Issued(name, role, cert.serial_number, cert.not_valid_after_utc.isoformat())
        )
        self._save_index()

    def _save_index(self) -> None:
        write_private(
            self.index_path,
            json.dumps(
                {"cluster": self.cluster, "issued": [asdict(x) for x in self.issued]}, indent=1
            ).encode(),
        )

    def issue_server(self, hosts: Sequence[str], *, days: int = LEAF_DAYS) -> int:
        """The broker's certificate, valid for each host name or IP address in ``hosts``;
        returns its serial."""
        if not hosts:
            raise BrokerError("the broker certificate needs at least one host name or address")
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        key = _new_key()
        cert = self._sign(hosts[0], key, ExtendedKeyUsageOID.SERVER_AUTH, days=days, sans=sans)
        self.server_cert_path.write_bytes(_pem(cert))
        write_private(self.server_key_path, _key_pem(key))
        self._record("broker", "broker", cert)
        return cert.serial_number

    def issue_identity(
        self,
        name: str,
        role: str,
        *,
        days: int = LEAF_DAYS,
        not_before: dt.datetime | None = None,
    ) -> Path:
        """A client certificate with CN ``name``; returns its identity directory."""
        key = _new_key()
        cert = self._sign(
            topics.check_id(name, "identity"),
            key,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            days=days,
            not_before=not_before,
        )
        out = self.identity_dir(name)
        out.mkdir(parents=True, exist_ok=True)
        for d in (out.parent, out):
            d.chmod(0o700)
        (out / CA_CERT).write_bytes(_pem(self.cert))
        (out / CLIENT_CERT).write_bytes(_pem(cert))
        write_private(out / CLIENT_KEY, _key_pem(key))
        (out / IDENTITY_FILE).write_text(
            json.dumps({"name": name, "role": role, "cluster": self.cluster}) + "\n"
        )
        self._record(name, role, cert)
        return out

    def renew(self, name: str, role: str, *, hosts: Sequence[str] = ()) -> list[int]:
        """Rotate: a new key and certificate for ``name`` (the broker when role is
        ``broker``), then revoke the ones before it; returns the revoked serials."""
        if role == "broker":
            serial = self.issue_server(hosts)
        else:
            self.issue_identity(name, role)
            serial = self.issued[-1].serial
        return self.revoke(name, keep_serial=serial)

    # ------------------------------------------------------------------ revoking

    def active(self, name: str) -> list[Issued]:
        """Certificates of ``name`` not revoked yet (one, or two while renewing)."""
        return [x for x in self.issued if x.name == name and x.revoked_at is None]

    def revoke(self, name: str, *, keep_serial: int | None = None) -> list[int]:
        """Revoke every live certificate of ``name`` (except ``keep_serial``) and re-sign
        the CRL; returns the revoked serials."""
        now = _now().isoformat()
        serials = []
        for x in self.active(name):
            if x.serial != keep_serial:
                x.revoked_at = now
                serials.append(x.serial)
        if serials:
            self._save_index()
            self.write_crl()
        return serials

    def write_crl(self) -> None:
        """Sign the CRL listing every revoked serial. Its next update is the CA's expiry:
        OpenSSL refuses every client once a CRL is past due, so it must not lapse first."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(self.cert.not_valid_after_utc)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        for x in self.issued:
            if x.revoked_at is not None:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(x.serial)
                    .revocation_date(dt.datetime.fromisoformat(x.revoked_at))
                    .build()
                )
        crl = builder.sign(self.key, hashes.SHA256())
        self.crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
