"""``inventory up --tls``: a local CA and the certificates of one machine's run.

``up --tls`` keeps them in its data directory (``DATA_DIR/tls``; the CA is made on the first
run and kept, the others are issued anew at every start, as the router's token is):

    ca.pem, ca.key           the local CA: every hop trusts it (private keys: mode 0600)
    server.pem, server.key   every shard's and the router's own, for 127.0.0.1 and localhost
    router.pem, router.key   the router's client certificate to the shards (mutual TLS)
    client.pem, client.key   a client certificate for local callers (the Python client,
                             ``inventory import``, grpcurl)

Every hop then runs mutual TLS: the shards and the router accept only callers whose
certificate this CA signed. Keys are ECDSA P-256 (every TLS stack takes them). A deployment
uses its own CA and certificates instead (the ``--tls-*`` flags).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .common.config import ChannelTLSConfig
from .common.tokens import write_atomically

# The local CA outlives many runs; the certificates it issues are made at every start, so a
# run of `up` needs them for as long as it stays up (the router token's lifetime, too).
CA_VALIDITY_S = 10 * 365 * 86_400
CERTIFICATE_VALIDITY_S = 30 * 86_400
# Back-dated so a clock a little behind the CA's still accepts a fresh certificate.
CLOCK_SKEW_S = 300
# The names a local server answers to.
LOCAL_HOSTS = ("127.0.0.1", "localhost")
PRIVATE_KEY_MODE = 0o600
CERTIFICATE_MODE = 0o644


@dataclass(frozen=True, slots=True)
class Pair:
    """A certificate and its private key, as files."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class LocalTLS:
    """What ``up --tls`` hands its processes, and what it tells callers."""

    ca: Path
    server: Pair
    router: Pair
    client: Pair

    def server_arguments(self) -> list[str]:
        """Every shard's and the router's: mutual TLS with this CA."""
        return [
            *("--tls-cert", str(self.server.cert), "--tls-key", str(self.server.key)),
            *("--tls-client-ca", str(self.ca)),
        ]

    def router_arguments(self) -> list[str]:
        """The router's hop to the shards."""
        return [
            *("--shard-tls-ca", str(self.ca)),
            *("--shard-tls-cert", str(self.router.cert), "--shard-tls-key", str(self.router.key)),
        ]

    def caller(self) -> ChannelTLSConfig:
        """A local caller's ``tls`` (``up``'s own health checks too)."""
        return ChannelTLSConfig(str(self.ca), str(self.client.cert), str(self.client.key))

    def hints(self) -> list[str]:
        """How a caller connects, for ``up``'s terminal."""
        return [
            f"mutual TLS on every hop: callers trust {self.ca} and present {self.client.cert} "
            f"with its key {self.client.key}",
            f"  inventory import ... --tls-ca {self.ca} --tls-client-cert {self.client.cert} "
            f"--tls-client-key {self.client.key}",
        ]


class LocalCA:
    """A directory holding a CA's certificate and key, and the certificates it issued."""

    def __init__(self, directory: Path, name: str = "inventory local CA") -> None:
        self.directory = directory
        self.name = name
        self.pair = Pair(directory / "ca.pem", directory / "ca.key")

    def ensure(self) -> Path:
        """The CA's certificate, made (with its key) where missing."""
        if not (self.pair.cert.exists() and self.pair.key.exists()):
            key = ec.generate_private_key(ec.SECP256R1())
            subject = _name(self.name)
            builder = _builder(subject, subject, key.public_key(), CA_VALIDITY_S)
            builder = builder.add_extension(
                x509.BasicConstraints(ca=True, path_length=0), critical=True
            ).add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            _write(self.pair, builder.sign(key, hashes.SHA256()), key)
        return self.pair.cert

    def issue(self, name: str, *, server: bool, validity_s: int = CERTIFICATE_VALIDITY_S) -> Pair:
        """``name``.pem and ``name``.key, signed by this CA: a server's certificate (for
        ``LOCAL_HOSTS``) or a client's; ``validity_s`` < 0 makes one already expired."""
        ca_key = serialization.load_pem_private_key(self.pair.key.read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey), self.pair.key
        issuer = x509.load_pem_x509_certificate(self.pair.cert.read_bytes()).subject
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _builder(_name(name), issuer, key.public_key(), validity_s)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address(LOCAL_HOSTS[0])),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        pair = Pair(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        _write(pair, builder.sign(ca_key, hashes.SHA256()), key)
        return pair


def prepare_local_tls(data_dir: Path) -> LocalTLS:
    """The CA of ``data_dir`` (made where missing) and fresh certificates it signed."""
    ca = LocalCA(data_dir / "tls")
    return LocalTLS(
        ca.ensure(),
        server=ca.issue("server", server=True),
        router=ca.issue("router", server=False),
        client=ca.issue("client", server=False),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, validity_s: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    start = now - datetime.timedelta(seconds=CLOCK_SKEW_S)
    end = now + datetime.timedelta(seconds=validity_s)
    if validity_s < 0:  # an expired one (tests): valid for a moment before `end`
        start = end - datetime.timedelta(seconds=CLOCK_SKEW_S)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _write(pair: Pair, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    """The key first, then the certificate: a server that reads them in between (tls rule 2)
    finds the new key with the old certificate, refuses that pair and keeps serving the old
    one, until both are new."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomically(pair.key, pem, mode=PRIVATE_KEY_MODE)
    cert = certificate.public_bytes(serialization.Encoding.PEM)
    write_atomically(pair.cert, cert, mode=CERTIFICATE_MODE)
