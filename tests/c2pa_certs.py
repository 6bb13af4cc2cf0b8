"""A throwaway certificate chain C2PA accepts, made with `cryptography`: a CA and an end-entity signing certificate
(EC P-256 / ES256, digitalSignature, extended key usage emailProtection; C2PA refuses a self-signed or CA signing
certificate). For tests only."""
from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

USAGE = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
             encipher_only=False, decipher_only=False)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flux-kontext-server tests")])


def _builder(subject: str, issuer: x509.Name, key, days: int = 30) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))


def make_chain(directory: Path, self_signed_leaf: bool = False) -> tuple[Path, Path]:
    """(chain.pem: the signing certificate then the CA, key.pem). `self_signed_leaf`: one self-signed certificate
    instead, which C2PA refuses."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf_usage = x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **USAGE)
    if self_signed_leaf:
        leaf = (_builder("flux test signer", _name("flux test signer"), key)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(leaf_usage, critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                .sign(key, hashes.SHA256()))
        chain = leaf.public_bytes(serialization.Encoding.PEM)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (_builder("flux test CA", _name("flux test CA"), ca_key)
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **USAGE),
                             critical=True)
              .sign(ca_key, hashes.SHA256()))
        leaf = (_builder("flux test signer", ca.subject, key)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(leaf_usage, critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
                .sign(ca_key, hashes.SHA256()))
        chain = leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = directory / "chain.pem", directory / "key.pem"
    cert_path.write_bytes(chain)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
