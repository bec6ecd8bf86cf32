"""DKIM private keys on disk: read one into the form dkimpy signs with.

Shared by the signing stage (mailgrave-queue, at each signature) and
``mailgrave check`` (which names a key that would fail).  RSA keys are
PKCS#1 PEM (``BEGIN RSA PRIVATE KEY``, what ``mailgrave dkim keygen`` and
``openssl genrsa -traditional`` write); Ed25519 keys (RFC 8463) are PKCS#8
PEM (``openssl genpkey -algorithm ed25519``, ``mailgrave dkim keygen``) or
dkimpy's base64 of the 32-byte seed (``dknewkey``).  Nothing here logs or
prints a key.
"""

from __future__ import annotations

import base64
import binascii

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
MAX_KEY_FILE = 64 * 1024

# PKCS#8 PrivateKeyInfo for Ed25519 (RFC 8410): this DER prefix, then the 32-byte seed.
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")


class DkimKeyError(Exception):
    """A key that cannot be used; the message names the file, never the key."""


def read_key(path: str, algorithm: str) -> bytes:
    """The key at ``path`` as dkimpy's ``privkey``: PEM for RSA, base64 seed for Ed25519."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise DkimKeyError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise DkimKeyError(f"{path} is too large for a key")
    if algorithm == "rsa-sha256":
        if b"-----BEGIN RSA PRIVATE KEY-----" not in data:
            raise DkimKeyError(
                f"{path} is not an RSA key in PKCS#1 PEM (BEGIN RSA PRIVATE KEY; "
                "convert one with openssl rsa -traditional)"
            )
        return data
    if algorithm == "ed25519-sha256":
        return base64.b64encode(_ed25519_seed(path, data))
    raise DkimKeyError(f"unknown algorithm {algorithm}")


def _ed25519_seed(path: str, data: bytes) -> bytes:
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN PRIVATE KEY-----"):
            body = b"".join(line for line in text.splitlines() if not line.startswith(b"-----"))
            der = base64.b64decode(body, validate=True)
            if len(der) == 48 and der.startswith(_ED25519_PKCS8):
                return der[16:]
        elif not text.startswith(b"-----"):
            seed = base64.b64decode(text, validate=True)
            if len(seed) == 32:
                return seed
    except (binascii.Error, ValueError):
        pass
    raise DkimKeyError(f"{path} is not an Ed25519 private key (PKCS#8 PEM or a base64 seed)")


def check_key(path: str, algorithm: str) -> None:
    """Raise DkimKeyError when the key cannot be read or parsed (``mailgrave check``).

    Parsing an RSA key needs dkimpy; it is imported here, not at the top,
    because most programs that load the floor never sign.
    """
    data = read_key(path, algorithm)
    if algorithm == "rsa-sha256":
        from dkim.crypto import UnparsableKeyError, parse_pem_private_key

        try:
            parse_pem_private_key(data)
        except (UnparsableKeyError, ValueError, IndexError):
            raise DkimKeyError(f"{path} is not a valid RSA private key") from None
