"""
Cluster credentials and mutual TLS for skynet's control plane.

    sky tls init [--dir DIR] [--host ADDRESS]...
    sky tls issue NAME [--host ADDRESS]... [--days N] --out DIR [--ca DIR]
    sky tls revoke NAME [--ca DIR] [--registry URL]
    sky tls list [--ca DIR]

A I{credentials directory} holds C{ca.pem} (the cluster CA's certificate),
C{cert.pem} and C{key.pem} (one identity: a host, an operator, a
dashboard) and, where the revocation list is kept, C{crl.pem}.  The
directory made by C{sky tls init} (default C{$SKYNET_HOME/tls}) is the
credentials of this host and also holds the CA's key (C{ca-key.pem}), the
list of issued certificates (C{issued.json}) and, in C{operator/}, the
operator's credentials.  Keys are written mode 0600, directories 0700.

Listeners made by L{ServerTLS} require a client certificate signed by the
cluster CA, not expired and not revoked; they check at the handshake, so a
refused peer never reaches the protocol.  Clients made by L{client_options}
present their certificate and check the server's against the CA and its
address with C{service_identity}.  The revocation list is an X.509 CRL
signed by the CA: kept in the registry (key L{CRL_KEY}) and in C{crl.pem};
listeners accept a new one only if the CA signed it.

The taps use L{add_tls_options}, L{tap_tls} and L{tap_listeners}: control
listeners (a daemon's RPC, every admin endpoint) speak mutual TLS when the
process has credentials, and refuse to listen off loopback without them
unless C{--insecure} (L{check_listen_policy}); a daemon's C{Deploy} can be
narrowed by a L{DeployPolicy}.  See C{docs/security.md}.

All of the cryptography is C{cryptography}'s and OpenSSL's (through
pyOpenSSL and Twisted); nothing here is home-made.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.application.service import Service as _Service
from twisted.internet import ssl as tssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from zope.interface import implementer

from skynet.config import default_reactor, environment_defaults, skynet_path

__all__ = [
    "CRL_KEY",
    "Credentials",
    "RevocationList",
    "ServerTLS",
    "TLSError",
    "TLSServerEndpoint",
    "add_tls_options",
    "check_listen_policy",
    "client_endpoint",
    "client_identity",
    "client_options",
    "init_cluster",
    "is_loopback",
    "issue",
    "load_credentials",
    "main",
    "revoke",
]

#: The registry key of the cluster's revocation list (a PEM CRL).
CRL_KEY = "tls/crl"

#: What the refusal to listen off loopback without credentials says.
HOW_TO_MAKE = (
    "make credentials with `sky tls init` (or copy a directory made by `sky tls issue`) "
    "and pass --tls DIR, or pass --insecure to run without"
)

#: What a client without credentials is told.
HOW_TO_CONNECT = (
    "get credentials from the host of the cluster CA (`sky tls issue NAME --out DIR`) and "
    "set SKYNET_TLS=DIR, or make a cluster with `sky tls init`"
)

CA_DAYS = 3650
DEFAULT_DAYS = 365


class TLSError(Exception):
    """
    Credentials missing, unreadable or inconsistent; the message says which.
    """


def _unusable(e: TLSError) -> Exception:
    """
    A client's L{TLSError} as the connection failure its callers handle.
    """
    from skynet.errors import ConnectionFailed

    return ConnectionFailed(f"no usable TLS credentials: {e}")


# Files


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    """
    Write C{data} to C{path} atomically, created with C{mode} (never wider
    for a moment: the file is made with it, not chmod-ed afterwards).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"cannot read {path}: {e.strerror}") from None


# Certificates


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(name: str = "skynet cluster CA", days: int = CA_DAYS) -> tuple[Any, x509.Certificate]:
    """
    A new cluster CA: its private key and self-signed certificate.
    """
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def make_certificate(
    ca_key: Any,
    ca_cert: x509.Certificate,
    name: str,
    hosts: Iterable[str] = (),
    days: float = DEFAULT_DAYS,
    not_before: datetime.datetime | None = None,
) -> tuple[Any, x509.Certificate]:
    """
    A key and a certificate for C{name}, signed by the CA, good for both
    ends of a connection (server and client authentication).

    @param hosts: the addresses and DNS names it may serve as (its
        subjectAltName); none for an operator or a dashboard.
    @param not_before: the start of its validity (default: now).
    """
    key = _new_key()
    start = not_before or _now() - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )  # fmt: skip
    names = _san(hosts)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def default_hosts() -> list[str]:
    """
    The names this host answers to: loopback, its host name, and
    C{$SKYNET_BIND_IP} when that is one address.
    """
    hosts = ["127.0.0.1", "::1", "localhost"]
    name = socket.gethostname()
    if name and name not in hosts:
        hosts.append(name)
    bind = environment_defaults().bind_ip or ""
    if bind and bind not in ("0.0.0.0", "::") and bind not in hosts:
        hosts.append(bind)
    return hosts


def write_identity(directory: str, ca_cert: x509.Certificate, key: Any,
                   cert: x509.Certificate) -> None:  # fmt: skip
    """
    Write a credentials directory: C{ca.pem}, C{cert.pem}, C{key.pem}
    (0600) in C{directory} (0700).
    """
    _private_dir(directory)
    _write(os.path.join(directory, "ca.pem"), _cert_pem(ca_cert))
    _write(os.path.join(directory, "cert.pem"), _cert_pem(cert))
    _write(os.path.join(directory, "key.pem"), _key_pem(key), 0o600)


def _index_path(ca_dir: str) -> str:
    return os.path.join(ca_dir, "issued.json")


def _load_index(ca_dir: str) -> list[dict[str, Any]]:
    path = _index_path(ca_dir)
    if not os.path.exists(path):
        return []
    try:
        entries = json.loads(_read(path))
    except ValueError as e:
        raise TLSError(f"{path} is not JSON: {e}") from None
    if not isinstance(entries, list):
        raise TLSError(f"{path} is not a list")
    return entries


def _record(ca_dir: str, name: str, cert: x509.Certificate, hosts: Iterable[str]) -> None:
    entries = _load_index(ca_dir)
    entries.append({
        "name": name,
        "serial": format(cert.serial_number, "x"),
        "hosts": list(hosts),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "revoked": None,
    })  # fmt: skip
    _write(_index_path(ca_dir), json.dumps(entries, indent=1).encode(), 0o600)


def _load_ca(ca_dir: str) -> tuple[Any, x509.Certificate]:
    key_path = os.path.join(ca_dir, "ca-key.pem")
    if not os.path.exists(key_path):
        raise TLSError(
            f"no CA key in {ca_dir} (ca-key.pem): issue and revoke on the host where "
            "`sky tls init` made the cluster CA, or pass --ca DIR"
        )
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
        cert = x509.load_pem_x509_certificate(_read(os.path.join(ca_dir, "ca.pem")))
    except ValueError as e:
        raise TLSError(f"bad CA files in {ca_dir}: {e}") from None
    return key, cert


def init_cluster(directory: str, hosts: Iterable[str] = (), days: float = DEFAULT_DAYS,
                 host_name: str | None = None) -> None:  # fmt: skip
    """
    Make a cluster CA in C{directory}, this host's credentials there, and
    an operator's in C{directory/operator}.

    @raise TLSError: if C{directory} has a CA already.
    """
    if os.path.exists(os.path.join(directory, "ca-key.pem")):
        raise TLSError(f"{directory} has a cluster CA already (ca-key.pem); remove it first")
    _private_dir(directory)
    ca_key, ca_cert = make_ca()
    _write(os.path.join(directory, "ca-key.pem"), _key_pem(ca_key), 0o600)
    _write(os.path.join(directory, "ca.pem"), _cert_pem(ca_cert))
    all_hosts = list(dict.fromkeys([*default_hosts(), *hosts]))
    name = host_name or f"host {socket.gethostname()}"
    key, cert = make_certificate(ca_key, ca_cert, name, all_hosts, days)
    write_identity(directory, ca_cert, key, cert)
    _record(directory, name, cert, all_hosts)
    okey, ocert = make_certificate(ca_key, ca_cert, "operator", (), days)
    write_identity(os.path.join(directory, "operator"), ca_cert, okey, ocert)
    _record(directory, "operator", ocert, ())
    _write_crl(directory, ca_key, ca_cert)


def issue(ca_dir: str, name: str, out: str, hosts: Iterable[str] = (),
          days: float = DEFAULT_DAYS, not_before: datetime.datetime | None = None) -> None:  # fmt: skip
    """
    Issue a certificate for C{name} from the CA in C{ca_dir} into the
    credentials directory C{out}.
    """
    if not name or "\n" in name:
        raise TLSError("a certificate needs a name on one line")
    if days <= 0:
        raise TLSError("--days must be positive")
    ca_key, ca_cert = _load_ca(ca_dir)
    hosts = list(hosts)
    key, cert = make_certificate(ca_key, ca_cert, name, hosts, days, not_before)
    write_identity(out, ca_cert, key, cert)
    _record(ca_dir, name, cert, hosts)
    crl = os.path.join(ca_dir, "crl.pem")
    if os.path.exists(crl):
        _write(os.path.join(out, "crl.pem"), _read(crl))


def _write_crl(ca_dir: str, ca_key: Any, ca_cert: x509.Certificate) -> bytes:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=CA_DAYS))
        # Microseconds since the epoch: later lists have higher numbers, so
        # listeners can refuse an older list put back in the registry.
        .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)
    )
    for entry in _load_index(ca_dir):
        if entry.get("revoked"):
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"], 16))
                .revocation_date(datetime.datetime.fromisoformat(entry["revoked"]))
                .build()
            )
            builder = builder.add_revoked_certificate(revoked)
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    _write(os.path.join(ca_dir, "crl.pem"), pem)
    return pem


def revoke(ca_dir: str, name: str) -> tuple[list[str], bytes]:
    """
    Revoke every certificate issued to C{name}.

    @return: the serials revoked now and the new CRL (PEM), also written
        to C{ca_dir/crl.pem}.
    @raise TLSError: if nothing was issued to C{name}.
    """
    ca_key, ca_cert = _load_ca(ca_dir)
    entries = _load_index(ca_dir)
    matching = [e for e in entries if e.get("name") == name]
    if not matching:
        known = sorted({str(e.get("name")) for e in entries})
        raise TLSError(f"no certificate issued to {name!r}; issued: {', '.join(known) or 'none'}")
    serials = []
    for entry in matching:
        if not entry.get("revoked"):
            entry["revoked"] = _now().isoformat()
            serials.append(entry["serial"])
    _write(_index_path(ca_dir), json.dumps(entries, indent=1).encode(), 0o600)
    return serials, _write_crl(ca_dir, ca_key, ca_cert)


# Loading


@attr.frozen
class Credentials:
    """
    One identity of the cluster, loaded from a credentials directory.

    @ivar directory: where it came from.
    @ivar ca: the cluster CA's certificate (PEM).
    @ivar cert: this identity's certificate (PEM).
    @ivar key: its private key (PEM).
    """

    directory: str
    ca: bytes
    cert: bytes
    key: bytes = attr.field(repr=False)

    @property
    def crl_path(self) -> str:
        return os.path.join(self.directory, "crl.pem")

    @property
    def name(self) -> str:
        cert = x509.load_pem_x509_certificate(self.cert)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else "?"

    def private_certificate(self) -> tssl.PrivateCertificate:
        return tssl.PrivateCertificate.loadPEM(self.key + b"\n" + self.cert)

    def authority(self) -> tssl.Certificate:
        return tssl.Certificate.loadPEM(self.ca)


def load_credentials(directory: str) -> Credentials:
    """
    Read a credentials directory.

    @raise TLSError: if a file is missing or unreadable, the key is readable
        by others, or the certificate was not signed by the CA.
    """
    directory = os.path.abspath(directory)
    key_path = os.path.join(directory, "key.pem")
    try:
        mode = os.stat(key_path).st_mode
    except OSError as e:
        raise TLSError(f"no credentials in {directory}: {key_path}: {e.strerror}") from None
    if mode & 0o077:
        raise TLSError(f"{key_path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    creds = Credentials(directory, _read(os.path.join(directory, "ca.pem")),
                        _read(os.path.join(directory, "cert.pem")), _read(key_path))  # fmt: skip
    try:
        ca = x509.load_pem_x509_certificate(creds.ca)
        cert = x509.load_pem_x509_certificate(creds.cert)
        cert.verify_directly_issued_by(ca)
        creds.private_certificate()
    except Exception as e:
        raise TLSError(f"bad credentials in {directory}: {e}") from None
    return creds


def resolve_directory(option: str | None, environ: dict[str, str] | None = None) -> str | None:
    """
    Where a process's credentials are: C{option} (C{--tls DIR}), else
    C{$SKYNET_TLS}, else C{$SKYNET_HOME/tls} if it exists, else L{None}.
    """
    env = os.environ if environ is None else environ
    if option:
        return option
    if env.get("SKYNET_TLS"):
        return env["SKYNET_TLS"]
    default = skynet_path("tls", env)  # type: ignore[arg-type]
    return default if os.path.exists(os.path.join(default, "key.pem")) else None


_identity: list[Credentials | None] = []


def set_client_identity(creds: Credentials | None) -> None:
    """
    The identity this process presents when it calls a control endpoint
    (set by the edges: a tap, C{sky}, the dashboard).
    """
    _identity[:] = [creds]


def client_identity() -> Credentials | None:
    """
    This process's identity for control calls: the one set, else the
    operator's (C{DIR/operator}) or the host's credentials of
    L{resolve_directory}, loaded once; L{None} without credentials.
    """
    if not _identity:
        directory = resolve_directory(None)
        creds = None
        if directory is not None:
            operator = os.path.join(directory, "operator")
            path = operator if os.path.exists(os.path.join(operator, "key.pem")) else directory
            creds = load_credentials(path)
        _identity[:] = [creds]
    return _identity[0]


# Revocation


class RevocationList:
    """
    The serial numbers the cluster CA revoked, from CRLs it signed.
    """

    log = Logger()

    def __init__(self, ca_pem: bytes) -> None:
        self.ca = x509.load_pem_x509_certificate(ca_pem)
        self.serials: frozenset[int] = frozenset()
        self.crl: x509.CertificateRevocationList | None = None
        self._listeners: list[Callable[[x509.CertificateRevocationList], Any]] = []
        self.number: int | None = None

    def load(self, pem: bytes | None, source: str = "") -> bool:
        """
        Take the CRL C{pem} if the CA signed it and it is not older than the
        one held.

        @return: whether it was taken.
        """
        if not pem:
            return False
        try:
            crl = x509.load_pem_x509_crl(pem)
            valid = crl.is_signature_valid(self.ca.public_key())  # type: ignore[arg-type]
        except Exception as e:
            self.log.warn("ignoring an unreadable revocation list from {source}: {error}",
                          source=source, error=e)  # fmt: skip
            return False
        if not valid or crl.issuer != self.ca.subject:
            self.log.warn("ignoring a revocation list from {source} not signed by the cluster CA",
                          source=source)  # fmt: skip
            return False
        try:
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            number = 0
        if self.number is not None and number < self.number:
            return False
        self.number = number
        self.serials = frozenset(r.serial_number for r in crl)
        self.crl = crl
        for listener in list(self._listeners):
            listener(crl)
        return True

    def subscribe(self, listener: Callable[[x509.CertificateRevocationList], Any]) -> None:
        """
        Call C{listener} with each CRL taken from now on (and the one held).
        """
        self._listeners.append(listener)
        if self.crl is not None:
            listener(self.crl)

    def is_revoked(self, serial: int) -> bool:
        return serial in self.serials


class RevocationWatch(_Service):
    """
    Keeps a L{RevocationList} current: from C{crl.pem} of the credentials
    directory (re-read when it changes), and from the registry's
    L{CRL_KEY} when the registry holds values.
    """

    log = Logger()

    def __init__(self, revocations: RevocationList, path: str, registry: Any = None,
                 reactor: Any = None, interval: float = 5.0) -> None:  # fmt: skip
        self.revocations = revocations
        self.path = path
        self.registry = registry
        self.reactor = default_reactor(reactor)
        self.interval = interval
        self._mtime: float | None = None
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self.reactor
        self._watch: Any = None

    def startService(self) -> None:
        super().startService()
        self._poll()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._watch is not None and hasattr(self._watch, "stop"):
            self._watch.stop()
            self._watch = None

    def _poll(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            mtime = None
        if mtime is not None and mtime != self._mtime:
            self._mtime = mtime
            try:
                with open(self.path, "rb") as f:
                    self.revocations.load(f.read(), self.path)
            except OSError as e:
                self.log.warn("cannot read {path}: {error}", path=self.path, error=e)
        if self._watch is None and self.registry is not None:
            self._watch_registry()

    def _watch_registry(self) -> None:
        watch_value = getattr(self.registry, "watch_value", None)
        if watch_value is None:
            return
        try:
            self._watch = watch_value(CRL_KEY, self._from_registry)
        except Exception:
            # Not started yet: the next poll tries again.
            self._watch = None
            return
        if self._watch is None:
            self._watch = True

    def _from_registry(self, value: bytes | None, *rest: Any) -> None:
        if isinstance(value, str):
            value = value.encode()
        if self.revocations.load(value, "the registry"):
            self.log.info("revocation list from the registry: {count} revoked",
                          count=len(self.revocations.serials))  # fmt: skip


# Refusals


class RefusalLog:
    """
    Warnings about refused peers, at most C{burst} per C{interval} seconds;
    the rest are counted and their number reported with the next warning.
    """

    log = Logger(namespace="skynet.tls")

    def __init__(self, reactor: Any = None, burst: int = 10, interval: float = 60.0) -> None:
        self.reactor = reactor
        self.burst = burst
        self.interval = interval
        self._window = -1.0
        self._count = 0
        self.suppressed = 0

    def refused(self, peer: str, reason: str) -> None:
        now = default_reactor(self.reactor).seconds()
        if now - self._window >= self.interval:
            self._window = now
            self._count = 0
        if self._count >= self.burst:
            self.suppressed += 1
            return
        self._count += 1
        suppressed, self.suppressed = self.suppressed, 0
        self.log.warn(
            "TLS refused {peer}: {reason}{more}",
            peer=peer,
            reason=reason,
            suppressed=suppressed,
            more=f" ({suppressed} more refusals not logged)" if suppressed else "",
        )


_X509_V_ERR_CERT_REVOKED = 23

_VERIFY_REASONS = {
    2: "not signed by the cluster CA",
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "self-signed certificate, not from the cluster CA",
    19: "not signed by the cluster CA",
    20: "not signed by the cluster CA",
    21: "not signed by the cluster CA",
}


def _peer_of(protocol: Any) -> str:
    transport = getattr(protocol, "transport", None)
    try:
        peer = transport.getPeer()  # type: ignore[union-attr]
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"


class _GuardedTLS(BufferingTLSTransport):
    """
    A server TLS connection that reports a failed handshake to its
    L{ServerTLS} (who, and why), then closes like any other.
    """

    _skynet_refusal: str | None = None
    _skynet_reported = False

    def _report(self, reason: Any) -> None:
        if self._handshakeDone or self._skynet_reported:
            return
        self._skynet_reported = True
        why = self._skynet_refusal
        if why is None and reason is not None:
            value = getattr(reason, "value", None)
            why = _ssl_reason(value) if value is not None else "closed"
        factory: Any = self.factory
        factory.server_tls.refused(_peer_of(self), why or "handshake failed")

    def _tlsShutdownFinished(self, reason: Any) -> None:
        self._report(reason)
        super()._tlsShutdownFinished(reason)

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self._report(reason)


def _ssl_reason(error: Any) -> str:
    if isinstance(error, SSL.SysCallError):
        return "closed before the TLS handshake"
    if isinstance(error, SSL.Error):
        parts = []
        for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
            parts.append(str(item[-1]) if isinstance(item, tuple) else str(item))
        text = ", ".join(parts) or str(error)
        if "peer did not return a certificate" in text or "certificate required" in text:
            return "no client certificate"
        if "wrong version number" in text or "http request" in text or "unexpected" in text:
            return f"not TLS ({text})"
        return text
    from twisted.internet.error import ConnectionClosed

    if isinstance(error, ConnectionClosed):
        return "closed before the TLS handshake"
    return type(error).__name__ + (f": {error}" if str(error) else "")


class _GuardedFactory(TLSMemoryBIOFactory):
    protocol = _GuardedTLS

    def __init__(self, server_tls: "ServerTLS", wrapped: Any) -> None:
        super().__init__(server_tls, False, wrapped, clock=server_tls.reactor)
        self.server_tls = server_tls


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    How a listener speaks TLS: this identity's certificate, and peers that
    present one signed by the cluster CA, valid and not revoked
    (C{require_client_cert=False} lets peers without a certificate in,
    still refusing bad ones).

    @ivar revocations: the L{RevocationList} checked at every handshake.
    """

    def __init__(self, creds: Credentials, revocations: RevocationList | None = None, *,
                 require_client_cert: bool = True, reactor: Any = None,
                 refusals: RefusalLog | None = None) -> None:  # fmt: skip
        self.creds = creds
        self.reactor = default_reactor(reactor)
        self.revocations = revocations or RevocationList(creds.ca)
        self.require_client_cert = require_client_cert
        self.refusals = refusals or RefusalLog(self.reactor)
        options = tssl.CertificateOptions(
            privateKey=creds.private_certificate().privateKey.original,
            certificate=creds.private_certificate().original,
            trustRoot=creds.authority(),
            raiseMinimumTo=tssl.TLSVersion.TLSv1_2,
        )
        self.context: SSL.Context = options.getContext()
        mode = SSL.VERIFY_PEER
        if require_client_cert:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        self.context.set_verify(mode, self._verify)
        # OpenSSL checks the CRL too, so that a revoked peer is told so (the
        # certificate_revoked alert); the serials are checked above anyway.
        self.revocations.subscribe(self._add_crl)

    def _add_crl(self, crl: x509.CertificateRevocationList) -> None:
        store = self.context.get_cert_store()
        if store is None:
            return
        store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)

    def _verify(self, connection: SSL.Connection, cert: Any, errno: int, depth: int,
                ok: int) -> bool:  # fmt: skip
        protocol = connection.get_app_data()
        if not ok:
            reason = _VERIFY_REASONS.get(errno, f"certificate refused (X509 error {errno})")
            if errno == _X509_V_ERR_CERT_REVOKED:
                reason = f"certificate of {cert.get_subject().commonName!r} revoked"
            if protocol is not None:
                protocol._skynet_refusal = reason
            return False
        if depth == 0 and self.revocations.is_revoked(cert.get_serial_number()):
            if protocol is not None:
                subject = cert.get_subject().commonName
                protocol._skynet_refusal = f"certificate of {subject!r} revoked"
            return False
        return True

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(protocol)
        return connection

    def refused(self, peer: str, reason: str) -> None:
        self.refusals.refused(peer, reason)

    def wrap_factory(self, factory: Any) -> TLSMemoryBIOFactory:
        return _GuardedFactory(self, factory)


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """
    A server endpoint whose connections speak TLS as C{server_tls} says.
    """

    def __init__(self, wrapped: Any, server_tls: ServerTLS) -> None:
        self.wrapped = wrapped
        self.server_tls = server_tls

    def listen(self, factory: Any) -> Any:
        return self.wrapped.listen(self.server_tls.wrap_factory(factory))

    def __getattr__(self, name: str) -> Any:
        # _interface, _port: what the listen policy and tests read.
        return getattr(self.wrapped, name)


def client_options(creds: Credentials | None, host: str, ca: bytes | None = None) -> Any:
    """
    TLS options of a client connection to C{host}: the server's certificate
    must be the cluster CA's and name C{host} (service_identity); C{creds}
    (if any) is presented.
    """
    authority = tssl.Certificate.loadPEM(ca or creds.ca)  # type: ignore[union-attr]
    client = creds.private_certificate() if creds is not None else None
    return tssl.optionsForClientTLS(host, trustRoot=authority, clientCertificate=client)


def client_endpoint(reactor: Any, host: str, port: int, timeout: float,
                    creds: Credentials | None = None, tls: bool | None = None) -> Any:  # fmt: skip
    """
    The client endpoint of a control connection: TLS with this process's
    identity (L{client_identity}) when it has one or C{tls} says so, else
    TCP.
    """
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if creds is None:
        try:
            creds = client_identity()
        except TLSError as e:
            raise _unusable(e) from None
    if tls is None:
        tls = creds is not None
    if not tls:
        return endpoint
    if creds is None:
        raise _unusable(TLSError(f"{host}:{port} speaks TLS and this process has none: "
                                 f"{HOW_TO_CONNECT}"))  # fmt: skip
    return wrapClientTLS(client_options(creds, host), endpoint)


def instance_uses_tls(instance: Any) -> bool:
    """
    Whether C{instance} advertises TLS calls (its registry entry's C{TLS}
    key).
    """
    extra = getattr(instance, "extra", None) or {}
    return bool(extra.get("TLS"))


# Listening policy


def is_loopback(host: str) -> bool:
    """
    Whether C{host} is a loopback address (C{""} and C{0.0.0.0} are not).
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_interface(endpoint: Any) -> str | None:
    """
    The interface a server endpoint binds (C{""} for all), C{"unix"} for a
    UNIX socket, or L{None} if unknown.
    """
    if hasattr(endpoint, "_interface"):
        return str(endpoint._interface)
    if type(endpoint).__name__.startswith("UNIX") or hasattr(endpoint, "_address"):
        return "unix"
    return None


def off_loopback(endpoints: Iterable[Any]) -> list[str]:
    """
    The interfaces among C{endpoints} that others can reach.
    """
    found = []
    for endpoint in endpoints:
        interface = endpoint_interface(endpoint)
        if interface == "unix":
            continue
        if interface is None or not is_loopback(interface):
            found.append(interface or "0.0.0.0")
    return found


class ListenPolicyError(Exception):
    """
    A control listener off loopback without TLS credentials.
    """


def check_listen_policy(what: str, endpoints: Iterable[Any], creds: Credentials | None,
                        insecure: bool) -> bool:  # fmt: skip
    """
    Refuse a control listener (a daemon's, an admin endpoint) that others
    can reach when there are no credentials, unless C{insecure}.

    @return: whether it runs insecurely off loopback (warn at start).
    @raise ListenPolicyError: with a one-line message saying what to do.
    """
    if creds is not None:
        return False
    exposed = off_loopback(endpoints)
    if not exposed:
        return False
    if insecure:
        return True
    raise ListenPolicyError(
        f"refusing to serve the {what} on {', '.join(sorted(set(exposed)))} without TLS: "
        f"{HOW_TO_MAKE}"
    )


class InsecureWarning(_Service):
    """
    Logs, at every start, that a control listener runs without TLS off
    loopback (C{--insecure}).
    """

    log = Logger()

    def __init__(self, what: str) -> None:
        self.what = what

    def startService(self) -> None:
        super().startService()
        self.log.warn(
            "INSECURE: {what} reachable off loopback without TLS (--insecure): anyone who "
            "reaches it can command it",
            what=self.what,
        )


# Options of the taps

TLS_OPTION = [
    "tls", None, None,
    "Credentials directory (ca.pem, cert.pem, key.pem; see `sky tls init`) for mutual "
    "TLS on the control listeners (default $SKYNET_TLS, else $SKYNET_HOME/tls if present).",
]  # fmt: skip
INSECURE_FLAG = [
    "insecure", None,
    "Allow control listeners off loopback without TLS (logged as a warning at every start).",
]  # fmt: skip
REQUIRE_CLIENT_CERT_FLAG = [
    "require-client-cert", None,
    "With --tls on a service: callers must present a certificate from the cluster CA.",
]  # fmt: skip


def add_tls_options(options_class: type, service: bool = False) -> type:
    """
    Add C{--tls DIR} and C{--insecure} (and, for a service,
    C{--require-client-cert}) to a tap's C{usage.Options} class.
    """
    options_class.optParameters = [*options_class.optParameters, TLS_OPTION]  # type: ignore[attr-defined]
    flags = [INSECURE_FLAG] + ([REQUIRE_CLIENT_CERT_FLAG] if service else [])
    options_class.optFlags = [*getattr(options_class, "optFlags", []), *flags]  # type: ignore[attr-defined]
    return options_class


@attr.frozen
class TapTLS:
    """
    What a tap decided about TLS: the credentials (or none), whether they
    were asked for explicitly, and the server side.
    """

    creds: Credentials | None
    explicit: bool
    server: ServerTLS | None
    insecure: bool


def tap_tls(options: Any, reactor: Any = None) -> TapTLS:
    """
    Load a tap's credentials (C{--tls}, C{$SKYNET_TLS}, C{$SKYNET_HOME/tls})
    and make its L{ServerTLS}; this process presents the same identity when
    it calls control endpoints.

    @raise usage.UsageError: for unusable credentials.
    """
    from twisted.python import usage

    directory = resolve_directory(options["tls"])
    creds = None
    server = None
    if directory is not None:
        try:
            creds = load_credentials(directory)
        except TLSError as e:
            raise usage.UsageError(f"--tls: {e}") from None
        server = ServerTLS(creds, require_client_cert=True, reactor=reactor)
        set_client_identity(creds)
    return TapTLS(creds, bool(options["tls"]), server, bool(options["insecure"]))


def secure(endpoints: Iterable[Any], server: ServerTLS | None) -> list[Any]:
    """
    C{endpoints}, speaking TLS with C{server} (unchanged without one).
    """
    if server is None:
        return list(endpoints)
    return [TLSServerEndpoint(e, server) for e in endpoints]


def policy_or_exit(program: str, what: str, endpoints: Iterable[Any], tls: TapTLS) -> list[Any]:
    """
    L{check_listen_policy} for a tap's C{makeService}: exit with one line
    on stderr when refused; the services to add (an L{InsecureWarning}).
    """
    try:
        insecure = check_listen_policy(what, endpoints, tls.creds, tls.insecure)
    except ListenPolicyError as e:
        raise SystemExit(f"{program}: {e}") from None
    return [InsecureWarning(what)] if insecure else []


def revocation_watch(tls: TapTLS, registry: Any, reactor: Any = None) -> list[Any]:
    """
    The L{RevocationWatch} of a tap's listeners (none without TLS).
    """
    if tls.server is None or tls.creds is None:
        return []
    return [RevocationWatch(tls.server.revocations, tls.creds.crl_path, registry, reactor)]


@attr.frozen
class Listeners:
    """
    A tap's listeners after L{tap_listeners}: its endpoints (TLS where
    they should be), what its registry entry advertises, and services to
    run beside it (the revocation watch, the insecure warning).
    """

    endpoints: list[Any]
    admin_endpoints: list[Any]
    extra: dict[str, Any]
    services: list[Any]


def tap_listeners(program: str, options: Any, endpoints: Iterable[Any],
                  admin_endpoints: Iterable[Any], *, registry: Any = None, reactor: Any = None,
                  control: bool = False) -> Listeners:  # fmt: skip
    """
    Apply the TLS options of a tap (see L{add_tls_options}).

    The admin endpoint is a control listener, and so is the main listener
    when C{control} (a daemon's C{SkynetDaemon} RPC): with credentials they
    speak mutual TLS; without, they must be on loopback unless
    C{--insecure}.  A service's own calls speak TLS only when it was given
    C{--tls DIR} explicitly (C{--require-client-cert} then asks callers for
    a certificate); it advertises that with C{"TLS": true} in its entry.

    @raise SystemExit: with one line, when the listening policy refuses.
    """
    tls: TapTLS = options.tls
    endpoints, admin_endpoints = list(endpoints), list(admin_endpoints)
    controlled = admin_endpoints + (endpoints if control else [])
    services = policy_or_exit(program, f"{program} control endpoints", controlled, tls)
    extra: dict[str, Any] = {}
    if tls.server is not None:
        admin_endpoints = secure(admin_endpoints, tls.server)
        if admin_endpoints:
            extra["AdminTLS"] = True
        if control:
            endpoints = secure(endpoints, tls.server)
            extra["TLS"] = True
        elif tls.explicit:
            calls = ServerTLS(tls.server.creds, tls.server.revocations, reactor=reactor,
                              require_client_cert=bool(options.get("require-client-cert")),
                              refusals=tls.server.refusals)  # fmt: skip
            endpoints = secure(endpoints, calls)
            extra["TLS"] = True
        if tls.explicit:
            # The daemon's children (and anything else started from here)
            # use the same credentials.
            os.environ["SKYNET_TLS"] = tls.server.creds.directory
        services.extend(revocation_watch(tls, registry, reactor))
    return Listeners(endpoints, admin_endpoints, extra, services)


def instance_endpoint(reactor: Any, instance: Any, timeout: float) -> Any:
    """
    The client endpoint of a call to C{instance}: TLS (this process's
    identity presented, the server's certificate checked against the
    cluster CA and C{instance.host}) when its entry advertises C{TLS}, else
    plain TCP as Go Skynet speaks.
    """
    endpoint = TCP4ClientEndpoint(reactor, instance.host, instance.port, timeout=timeout)
    if not instance_uses_tls(instance):
        return endpoint
    try:
        creds = client_identity()
    except TLSError as e:
        raise _unusable(e) from None
    if creds is None:
        raise _unusable(TLSError(f"{instance.name} at {instance.address} speaks TLS and this "
                                 f"process has none: {HOW_TO_CONNECT}"))  # fmt: skip
    return wrapClientTLS(client_options(creds, instance.host), endpoint)


# What Deploy may run


@attr.frozen
class DeployPolicy:
    """
    What a daemon's C{Deploy} accepts: anything (the default), only
    C{module:Class} specs (C{classes_only}), or those and command lines that
    start with one of C{command_prefixes} (compared word by word, as a shell
    splits them).
    """

    classes_only: bool = False
    command_prefixes: tuple[tuple[str, ...], ...] = ()

    @property
    def restricted(self) -> bool:
        return self.classes_only or bool(self.command_prefixes)

    def check(self, service: Any) -> None:
        """
        @raise ValueError: if C{service} may not be deployed, saying why.
        """
        import re
        import shlex

        if not self.restricted or not isinstance(service, str):
            return
        if re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", service.strip()):
            return
        if self.classes_only:
            raise ValueError("this daemon deploys module:Class services only, not command lines")
        try:
            words = tuple(shlex.split(service))
        except ValueError as e:
            raise ValueError(f"bad command line {service!r}: {e}") from None
        if not any(words[: len(p)] == p for p in self.command_prefixes):
            allowed = ", ".join(repr(" ".join(p)) for p in self.command_prefixes)
            raise ValueError(f"this daemon runs only command lines starting with {allowed}")


DEPLOY_CLASSES_ONLY_FLAG = [
    "deploy-classes-only", None,
    "Deploy accepts module:Class specs only, no command lines.",
]  # fmt: skip


def add_deploy_policy_options(options_class: type) -> type:
    """
    Add C{--deploy-classes-only} and C{--deploy-command-prefix PREFIX}
    (repeatable) to the daemon tap's C{usage.Options}.
    """
    import shlex

    def opt_deploy_command_prefix(self: Any, prefix: str) -> None:
        """A command line Deploy may run must start with PREFIX (repeatable)."""
        self.setdefault("deploy-command-prefix", []).append(tuple(shlex.split(prefix)))

    options_class.optFlags = [*getattr(options_class, "optFlags", []), DEPLOY_CLASSES_ONLY_FLAG]  # type: ignore[attr-defined]
    options_class.opt_deploy_command_prefix = opt_deploy_command_prefix  # type: ignore[attr-defined]
    return options_class


def deploy_policy(options: Any) -> DeployPolicy:
    prefixes = tuple(p for p in options.get("deploy-command-prefix", []) if p)
    return DeployPolicy(bool(options.get("deploy-classes-only")), prefixes)


# sky tls


def _publish_crl(registry_url: str | None, pem: bytes, timeout: float = 10.0) -> str:
    """
    Store the CRL in the registry under L{CRL_KEY}, within C{timeout}
    seconds (this runs the reactor: once per process, as C{sky tls} does).

    @return: what happened, for the operator.
    """
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    from skynet.registry import registry_from_url

    outcome: list[str] = []

    async def store(registry: Any) -> None:
        await registry.start()
        try:
            await registry.set_value(CRL_KEY, pem)
            outcome.append(f"stored in the registry {registry.url} ({CRL_KEY})")
        finally:
            await registry.stop()

    async def run(reactor: Any) -> None:
        try:
            registry = registry_from_url(registry_url, reactor=reactor)
        except Exception as e:
            outcome.append(f"NOT stored in the registry ({e}): copy crl.pem to every host")
            return
        d = ensureDeferred(store(registry))
        timer = reactor.callLater(timeout, d.cancel)
        try:
            await d
        except Exception as e:
            reason = "no answer" if type(e).__name__ == "CancelledError" else str(e)
            outcome.append(f"NOT stored in the registry {registry.url} ({reason}): run "
                           "`sky tls revoke` again, or copy crl.pem to every host")  # fmt: skip
        finally:
            if timer.active():
                timer.cancel()

    try:
        react(lambda reactor: ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    return outcome[0] if outcome else "NOT stored in the registry"


def main(argv: list[str] | None = None, out: Callable[[str], Any] | None = None) -> int:
    """
    C{sky tls ...}: make, issue, list and revoke cluster credentials.

    @return: the exit status.
    """
    write = out or (lambda text: sys.stdout.write(text + "\n"))
    parser = argparse.ArgumentParser(prog="sky tls", description="Cluster TLS credentials.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_init = sub.add_parser("init", help="make a cluster CA, this host's and an operator's "
                                         "credentials")  # fmt: skip
    p_init.add_argument("--dir", default=None, help="default $SKYNET_HOME/tls")
    p_init.add_argument("--host", action="append", default=[],
                        help="another address or name of this host (repeatable)")  # fmt: skip
    p_init.add_argument("--days", type=float, default=DEFAULT_DAYS)
    p_issue = sub.add_parser("issue", help="issue credentials for a host, operator or dashboard")
    p_issue.add_argument("name")
    p_issue.add_argument("--host", action="append", default=[],
                         help="an address or name it serves as (repeatable; none for an "
                              "operator)")  # fmt: skip
    p_issue.add_argument("--days", type=float, default=DEFAULT_DAYS)
    p_issue.add_argument("--out", required=True, help="the credentials directory to write")
    p_issue.add_argument("--ca", default=None, help="the CA's directory (default "
                                                    "$SKYNET_HOME/tls)")  # fmt: skip
    p_revoke = sub.add_parser("revoke", help="revoke every certificate issued to NAME")
    p_revoke.add_argument("name")
    p_revoke.add_argument("--ca", default=None)
    p_revoke.add_argument("--registry", default=None,
                          help="registry URL to publish the list in (default "
                               "$SKYNET_REGISTRY, else embedded)")  # fmt: skip
    p_list = sub.add_parser("list", help="the certificates issued")
    p_list.add_argument("--ca", default=None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if args.command == "init":
            directory = args.dir or skynet_path("tls")
            init_cluster(directory, args.host, args.days)
            write(f"cluster CA and this host's credentials in {directory}; the operator's in "
                  f"{os.path.join(directory, 'operator')}")  # fmt: skip
        elif args.command == "issue":
            issue(args.ca or skynet_path("tls"), args.name, args.out, args.host, args.days)
            write(f"credentials of {args.name!r} in {args.out} (ca.pem, cert.pem, key.pem)")
        elif args.command == "revoke":
            ca_dir = args.ca or skynet_path("tls")
            serials, pem = revoke(ca_dir, args.name)
            where = _publish_crl(args.registry, pem)
            write(f"revoked {args.name!r} ({len(serials)} certificate(s)); revocation list in "
                  f"{os.path.join(ca_dir, 'crl.pem')}, {where}")  # fmt: skip
            if where.startswith("NOT"):
                return 1
        elif args.command == "list":
            for entry in _load_index(args.ca or skynet_path("tls")):
                state = f"revoked {entry['revoked']}" if entry.get("revoked") else "valid"
                write(f"{entry['name']}\t{entry['serial']}\tuntil {entry['not_after']}\t{state}")
    except TLSError as e:
        sys.stderr.write(f"sky tls: {e}\n")
        return 1
    return 0
