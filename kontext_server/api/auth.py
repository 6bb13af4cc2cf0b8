"""API keys: who may use the server, and the id a client's requests are counted under.

What: `KeyStore.from_file(path)` reads one key per line, or `sha256:<64 hex>` (the key's SHA-256, so the file need
not hold the secret); blank lines and `#` comments are ignored. `presented_key(headers)` takes a request's key from
`Authorization: Bearer <key>` (OpenAI clients) or `x-key: <key>` (BFL clients). `KeyStore.identify(key)` gives the
key's id (the first 8 hex characters of its SHA-256) or None.
Contract: a presented key is hashed and compared with every stored digest by hmac.compare_digest, with no early
exit, so the time taken tells neither which key matched nor how much of one. Keys are never logged and never put in
metrics; only key ids are. Two keys whose ids collide are counted together (their access is unaffected).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

HASH_PREFIX = "sha256:"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_id(key_digest: bytes) -> str:
    """What metrics and logs may show of a key: the first 8 hex characters of its SHA-256."""
    return key_digest.hex()[:8]


@dataclass(frozen=True)
class KeyStore:
    digests: tuple[bytes, ...]
    source: str = ""  # the file it was read from (for messages; never the keys)

    @classmethod
    def from_lines(cls, lines, source: str = "") -> "KeyStore":
        digests = []
        for n, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(HASH_PREFIX):
                hexpart = line[len(HASH_PREFIX):]
                if not _HEX64.match(hexpart):
                    raise ValueError(f"{source or 'api keys'} line {n}: {HASH_PREFIX} must be followed by 64 hex "
                                     "characters (the key's SHA-256)")
                digests.append(bytes.fromhex(hexpart))
            else:
                digests.append(digest(line))
        if not digests:
            raise ValueError(f"{source or 'api keys'}: no keys (one per line, or sha256:<hex>; # starts a comment)")
        return cls(tuple(dict.fromkeys(digests)), source)

    @classmethod
    def from_file(cls, path: str | Path) -> "KeyStore":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
        return cls.from_lines(text.splitlines(), str(path))

    def identify(self, presented: str) -> str | None:
        """The key id of a valid key, else None (every stored digest is compared, in constant time each)."""
        given = digest(presented)
        found = None
        for d in self.digests:
            if hmac.compare_digest(given, d):
                found = d
        return key_id(found) if found is not None else None


def presented_key(headers) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>`, else `x-key: <key>`; None when it has neither.

    `headers`: ASGI header pairs (bytes, bytes)."""
    auth = xkey = None
    for name, value in headers:
        if name == b"authorization" and auth is None:
            auth = value.decode("latin-1")
        elif name == b"x-key" and xkey is None:
            xkey = value.decode("latin-1")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if xkey and xkey.strip():
        return xkey.strip()
    return None


def exposure_warning(host: str, keys: KeyStore | None) -> str | None:
    """The start-up warning for a server that anyone on the network can use: no keys, and not on loopback."""
    if keys is not None:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return None
    return (f"listening on {host} without API keys: anyone who reaches this port can generate and run /benchmark "
            "(set --api-keys / FLUX_API_KEYS)")
