"""Outbound HTTP to addresses clients give us (image URLs, webhook URLs), without letting them reach our network.

What: `fetch(url, policy)` GETs an image URL: http(s) only; at most `policy.max_redirects` (3) redirects, each
re-checked; the body streamed and cut off past `policy.max_bytes` (the image limit, 20 MB; a 413); the whole fetch,
redirects included, within `policy.timeout` seconds. `post(url, body, headers, policy)` POSTs a webhook (no redirects
followed). Both raise FetchError with a status (422 or 413) and a reason fit for the client.
SSRF rule: the host is resolved here, every address it resolves to must be global (not private, loopback,
link-local, the 169.254.169.254 metadata address, unique-local IPv6, CGNAT, multicast, reserved or unspecified; an
IPv4-mapped IPv6 address is judged as its IPv4 address), unless `policy.allow_private` (--allow-private-urls). Then
the connection goes to the checked address itself, with the original Host header (and TLS SNI / certificate check
against the original name), so a DNS answer that changes between the check and the connect (DNS rebinding) cannot
redirect it. An answer mixing global and refused addresses is refused.
Contract: never follows the environment's proxies (the pinned address would be lost). Messages name the URL without its
query string (it may hold a signature or token): `redact(url)`. Blocking: call from a worker thread.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

# httpx logs every request's full URL at INFO ("HTTP Request: POST https://host/path?token=..."): client-given URLs
# may carry credentials in their query strings, so its loggers stay at WARNING in this process.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

MAX_URL_LENGTH = 2048
REDIRECTS = (301, 302, 303, 307, 308)
Resolver = Callable[[str, int], list[str]]


class FetchError(ValueError):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    timeout: float = 20.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    trusted: tuple[str, ...] = ()  # networks (CIDR) reachable even without allow_private: an internal image host

    def refused(self, address: str) -> str | None:
        if self.allow_private:
            return None
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if any(ip in ipaddress.ip_network(net, strict=False) for net in self.trusted):
            return None
        return refused_reason(address)


def redact(url: str) -> str:
    """The URL without its query string and fragment (which may hold credentials) and without user info."""
    try:
        p = urlsplit(url)
        host = p.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{p.port}" if p.port else "")
        return urlunsplit((p.scheme, netloc, p.path, "", ""))
    except ValueError:
        return "<unparseable URL>"


def system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FetchError(f"the host {host!r} could not be resolved ({exc.strerror or exc})") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


def refused_reason(address: str) -> str | None:
    """Why an address may not be reached without --allow-private-urls, or None when it is global."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if str(ip) == "169.254.169.254" or str(ip) == "fd00:ec2::254":
        return "a cloud metadata address"
    for name in ("loopback", "unspecified", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return f"a {name.replace('_', '-')} address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address"
    if not ip.is_global:
        return "not a global address"
    return None


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an acceptable URL's syntax, or FetchError."""
    if len(url) > MAX_URL_LENGTH:
        raise FetchError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        p = urlsplit(url)
        port = p.port
    except ValueError as exc:
        raise FetchError(f"not a valid URL ({exc})") from None
    if p.scheme not in ("http", "https"):
        raise FetchError(f"only http and https URLs are accepted (got {p.scheme or 'no'} scheme)")
    if not p.hostname:
        raise FetchError("the URL has no host")
    if p.username is not None or p.password is not None:
        raise FetchError("credentials in the URL are not accepted")
    return p.scheme, p.hostname, port or (443 if p.scheme == "https" else 80)


def pick_address(host: str, port: int, policy: FetchPolicy, resolver: Resolver = system_resolver) -> str:
    """The address to connect to: every address `host` resolves to is checked; the first is used."""
    addresses = resolver(host, port)
    if not addresses:
        raise FetchError(f"the host {host!r} resolved to no address")
    for a in addresses:
        reason = policy.refused(a)
        if reason is not None:
            raise FetchError(f"the host {host!r} resolves to {a}, {reason}: refused (a server started with "
                             "--allow-private-urls accepts it)")
    return addresses[0]


def _pinned(client: httpx.Client, method: str, url: str, address: str, deadline: float, **kw) -> httpx.Response:
    scheme, host, port = check_url(url)
    p = urlsplit(url)
    ip_host = f"[{address}]" if ":" in address else address
    target = urlunsplit((scheme, f"{ip_host}:{port}", p.path or "/", p.query, ""))
    default_port = 443 if scheme == "https" else 80
    host_header = (f"[{host}]" if ":" in host else host) + ("" if port == default_port else f":{port}")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise httpx.TimeoutException("deadline passed")
    headers = {**kw.pop("headers", {}), "Host": host_header}
    request = client.build_request(method, target, headers=headers, timeout=httpx.Timeout(remaining),
                                   extensions={"sni_hostname": host} if scheme == "https" else None, **kw)
    return client.send(request, stream=True)


def fetch(url: str, policy: FetchPolicy, resolver: Resolver = system_resolver) -> bytes:
    """The body of `url` (a 200 after at most max_redirects redirects), within the policy's limits."""
    deadline = time.monotonic() + policy.timeout
    current = url
    with httpx.Client(follow_redirects=False, trust_env=False) as client:
        for hop in range(policy.max_redirects + 1):
            _, host, port = check_url(current)
            address = pick_address(host, port, policy, resolver)
            try:
                resp = _pinned(client, "GET", current, address, deadline, headers={"Accept": "image/*"})
                try:
                    if resp.status_code in REDIRECTS:
                        location = resp.headers.get("location")
                        if not location:
                            raise FetchError(f"{redact(current)} answered {resp.status_code} without a Location")
                        if hop == policy.max_redirects:
                            raise FetchError(f"more than {policy.max_redirects} redirects (stopped at "
                                             f"{redact(current)})")
                        current = urljoin(current, location)
                        continue
                    if resp.status_code != 200:
                        raise FetchError(f"{redact(current)} answered HTTP {resp.status_code}")
                    return _read_limited(resp, policy, deadline, current)
                finally:
                    resp.close()
            except httpx.TimeoutException:
                raise FetchError(f"fetching {redact(url)} took longer than {policy.timeout:g} s") from None
            except httpx.HTTPError as exc:
                raise FetchError(f"fetching {redact(current)} failed: {type(exc).__name__}: "
                                 f"{str(exc) or 'connection error'}") from None
    raise FetchError("too many redirects")  # not reached


def _read_limited(resp: httpx.Response, policy: FetchPolicy, deadline: float, url: str) -> bytes:
    limit_mb = policy.max_bytes // (1024 * 1024)
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(f"{redact(url)} is larger than the {limit_mb} MB limit", status=413)
    chunks, size = [], 0
    for chunk in resp.iter_bytes():
        size += len(chunk)
        if size > policy.max_bytes:
            raise FetchError(f"{redact(url)} is larger than the {limit_mb} MB limit", status=413)
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise httpx.TimeoutException("deadline passed")
    return b"".join(chunks)


def post(url: str, body: bytes, headers: dict[str, str], policy: FetchPolicy,
         resolver: Resolver = system_resolver) -> int:
    """POST `body` to `url` (no redirects followed); the answer's status. FetchError for a refused address, a
    timeout or a transport error."""
    deadline = time.monotonic() + policy.timeout
    _, host, port = check_url(url)
    address = pick_address(host, port, policy, resolver)
    with httpx.Client(follow_redirects=False, trust_env=False) as client:
        try:
            resp = _pinned(client, "POST", url, address, deadline, headers=headers, content=body)
            resp.close()
            return resp.status_code
        except httpx.TimeoutException:
            raise FetchError(f"{redact(url)} did not answer within {policy.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"{redact(url)}: {type(exc).__name__}: {str(exc) or 'connection error'}") from None
