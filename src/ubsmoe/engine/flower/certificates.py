"""Self-signed certificates for a private Flower federation: a certificate authority and a SuperLink
certificate it signs, valid for the given host names and IP addresses (TLS between the SuperLink and
its SuperNodes). ``ubsmoe flower certificates DIR --host NAME`` writes them."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ubsmoe.config import ConfigError


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ubsmoe federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


CERTIFICATE_FILES = ("ca.crt", "superlink.crt", "superlink.key", "ca.key")


def write_certificates(folder: Path, hosts: list[str], days: int = 365, force: bool = False) -> dict[str, Path]:
    """ca.crt (give it to every SuperNode: --root-certificates), superlink.crt and superlink.key (the
    SuperLink's --ssl-certfile and --ssl-keyfile, with --ssl-ca-certfile ca.crt). The keys are written
    readable by their owner only. A folder that holds any of them is refused unless ``force``: a new CA
    would lock out every SuperNode given the old one."""
    existing = [name for name in CERTIFICATE_FILES if (folder / name).exists()]
    if existing and not force:
        raise ConfigError(f"{folder} already holds {', '.join(existing)}: choose another folder, or pass --force to "
                          "replace them (every SuperNode then needs the new ca.crt)")
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("ubsmoe federation CA")).issuer_name(_name("ubsmoe federation CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "certificate": folder / "superlink.crt", "key": folder / "superlink.key",
             "ca_key": folder / "ca.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["certificate"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for which, private in (("key", key), ("ca_key", ca_key)):
        paths[which].unlink(missing_ok=True)  # a new file, so that its mode is the owner's only
        descriptor = os.open(paths[which], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(_pem_key(private))
    return paths
