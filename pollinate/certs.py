"""TLS certificates and SuperNode authentication keys for a Pollinate deployment.

A deployment needs three kinds of key material, all generated here with ``cryptography``:

* a private certificate authority (``ca.crt``/``ca.key``): SuperNodes, ``flwr`` and the
  App executors trust it through ``--root-certificates``;
* the SuperLink's server certificate (``server.pem``/``server.key``), signed by the CA,
  whose subject alternative names must list every host name or IP the SuperLink is
  reached by (a SuperNode dialling ``10.0.0.5:9092`` needs ``10.0.0.5`` in the SANs);
* one ECDSA P-384 key pair per SuperNode in OpenSSH format (``nodes/NAME`` and
  ``nodes/NAME.pub``): the public half is registered with ``flwr supernode register``
  and the SuperLink (``--enable-supernode-auth``) refuses nodes whose key it does not know.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "superlink")
"""SANs every server certificate gets: local access, and the compose service name."""
VALID_DAYS = 365


class CertificateError(ValueError):
    """Key material cannot be generated as asked (bad host name, bad node name)."""


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's authentication key pair (OpenSSH format)."""

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class Bundle:
    """Paths of everything :func:`generate` wrote."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: tuple[NodeKey, ...]

    def node(self, name: str) -> NodeKey:
        for key in self.nodes:
            if key.name == name:
                return key
        raise KeyError(f"no key for node {name!r} in {self.directory}")


def generate(directory: str | Path, hosts: tuple[str, ...] | list[str] = (),
             nodes: tuple[str, ...] | list[str] = ()) -> Bundle:
    """Write a CA, a SuperLink server certificate for ``hosts`` and one key pair per node.

    An existing CA in ``directory`` is reused, so that adding nodes or hosts later does
    not invalidate what SuperNodes already trust; the server certificate is re-issued.
    """
    out = Path(directory)
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    ca_cert_path, ca_key_path = out / "ca.crt", out / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    else:
        ca_cert, ca_key = _make_ca()
        _write_key(ca_key_path, ca_key)
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = _make_server_cert(ca_cert, ca_key, _sans(hosts))
    _write_key(out / "server.key", server_key)
    (out / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    keys = tuple(node_key(out / "nodes", name) for name in nodes)
    return Bundle(out, ca_cert_path, ca_key_path, out / "server.pem", out / "server.key", keys)


def node_key(directory: str | Path, name: str) -> NodeKey:
    """An ECDSA P-384 key pair for SuperNode ``name`` (reused if it exists)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise CertificateError(f"node name {name!r}: use letters, digits, '-', '_' or '.'")
    private, public = Path(directory) / name, Path(directory) / f"{name}.pub"
    if not (private.exists() and public.exists()):
        key = ec.generate_private_key(ec.SECP384R1())
        _write_bytes_private(private, key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.OpenSSH,
                                                        serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH) + b"\n")
    return NodeKey(name, private, public)


def _sans(hosts: tuple[str, ...] | list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*DEFAULT_HOSTS, *hosts]):
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if any(c in host for c in " /:@"):
                raise CertificateError(f"not a host name or IP address: {host!r}") from None
            names.append(x509.DNSName(host))
    return names


def _make_ca() -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Pollinate deployment CA")])
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _make_server_cert(ca_cert: x509.Certificate, ca_key, sans: list[x509.GeneralName]
                      ) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Pollinate SuperLink")])
    cert = (_builder(subject, ca_cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))


def _write_key(path: Path, key) -> None:
    _write_bytes_private(path, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))


def _write_bytes_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
