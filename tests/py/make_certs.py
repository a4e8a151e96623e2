"""Makes the X.509 credentials the TLS tests use, in the directory layout
qemu, nbdkit and libnbd share, with python3-cryptography (no OpenSSL CLI
quirks about back-dated or revoked certificates).

    make_certs.py OUT

OUT/server   ca-cert.pem server-cert.pem server-key.pem ca-crl.pem
OUT/server2  the same CA, another server certificate (CN=hostcrypt-2)
OUT/stalecrl the server credentials with a CRL past its nextUpdate
OUT/client   ca-cert.pem client-cert.pem client-key.pem, DN CN=vm-17,O=Example
OUT/other    a valid client certificate with DN CN=vm-99,O=Example
OUT/rogue    a client certificate from another CA
OUT/expired  a client certificate that expired in 2021
OUT/revoked  a client certificate the CRL in OUT/server revokes
OUT/nocert   only ca-cert.pem (a client without a certificate)
"""

import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
DAY = datetime.timedelta(days=1)


def name(cn, org="Example"):
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def key():
    return ec.generate_private_key(ec.SECP256R1())


def ca(cn):
    k = key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(name(cn))
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False
        )
        .sign(k, hashes.SHA256())
    )
    return k, cert


def leaf(ca_key, ca_cert, cn, server, not_before=None, not_after=None):
    k = key()
    b = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return k, b.sign(ca_key, hashes.SHA256())


def pem_cert(c):
    return c.public_bytes(serialization.Encoding.PEM)


def pem_key(k):
    return k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write(dirpath, files):
    os.makedirs(dirpath, exist_ok=True)
    for fname, data in files.items():
        path = os.path.join(dirpath, fname)
        with open(path, "wb") as f:
            f.write(data)
        if fname.endswith("-key.pem"):
            os.chmod(path, 0o600)


def main(out):
    ca_key, ca_cert = ca("hostcrypt test CA")
    rogue_key, rogue_cert = ca("another CA")
    ca_pem = pem_cert(ca_cert)

    revoked_key, revoked_cert = leaf(ca_key, ca_cert, "vm-17", False)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(NOW - DAY)
        .next_update(NOW + 30 * DAY)
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(revoked_cert.serial_number)
            .revocation_date(NOW - DAY)
            .build()
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    stale_crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(NOW - 10 * DAY)
        .next_update(NOW - DAY)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(2), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    for dirname, cn, this_crl in (
        ("server", "hostcrypt", crl),
        ("server2", "hostcrypt-2", crl),
        ("stalecrl", "hostcrypt", stale_crl),
    ):
        k, c = leaf(ca_key, ca_cert, cn, True)
        write(
            os.path.join(out, dirname),
            {
                "ca-cert.pem": ca_pem,
                "server-cert.pem": pem_cert(c),
                "server-key.pem": pem_key(k),
                "ca-crl.pem": this_crl.public_bytes(serialization.Encoding.PEM),
            },
        )

    clients = {
        "client": leaf(ca_key, ca_cert, "vm-17", False),
        "other": leaf(ca_key, ca_cert, "vm-99", False),
        "rogue": leaf(rogue_key, rogue_cert, "vm-17", False),
        "expired": leaf(
            ca_key, ca_cert, "vm-17", False,
            not_before=datetime.datetime(2020, 1, 1),
            not_after=datetime.datetime(2021, 1, 1),
        ),
        "revoked": (revoked_key, revoked_cert),
    }
    for dirname, (k, c) in clients.items():
        write(
            os.path.join(out, dirname),
            {"ca-cert.pem": ca_pem, "client-cert.pem": pem_cert(c), "client-key.pem": pem_key(k)},
        )
    write(os.path.join(out, "nocert"), {"ca-cert.pem": ca_pem})
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
