"""SSRF-safe HTTP(S) fetching for input URLs, webhooks (POST JSON) and upload endpoints (PUT bytes).

Rules (landscape.md section 5.2; imgproxy CVE-2023-30019 / CVE-2025-24354):

- http and https only; no user:password@ in URLs; no control characters or spaces.
- The host is normalised first (IDNA/NFKC, so full-width digits and ideographic dots cannot hide an
  address) and numeric hosts are parsed the way browsers and ``inet_aton`` do (``127.1``,
  ``2130706433``, ``0x7f.0.0.1``, ``0177.0.0.1``), so no spelling of an address escapes validation.
- Every resolved address must be public: loopback, unspecified (0.0.0.0, ::), private, link-local (incl.
  169.254.169.254), CGNAT (100.64/10), multicast, reserved/benchmark/documentation ranges, IPv4-mapped,
  IPv4-compatible, NAT64, 6to4 and Teredo forms of those are refused, as are ``localhost``, ``*.localhost``,
  ``*.local``, ``*.internal`` and ``*.home.arpa`` names. If a name resolves to any refused address it is
  refused.
- The validated address is **pinned**: the connection goes to that IP (no second DNS lookup, so no
  rebinding), the Host header and TLS SNI/certificate check use the name.
- Redirects are followed by hand (at most ``max_redirects``) and every hop is validated again; credentials
  headers are dropped when a redirect changes host.
- Timeouts: ``timeout`` per connect/read, ``total_timeout`` for the whole exchange; the body is capped while
  streaming (``max_bytes``), before and regardless of Content-Length.
- ``allow_hosts``: explicit trust for named hosts ("127.0.0.1:8123" = that host and port; "images.internal"
  = any port); they skip the address check but are still pinned.

:func:`check_url` validates without connecting anywhere (it may resolve names with ``getaddrinfo``).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(ValueError):
    """``code``: ``bad_url``, ``bad_scheme``, ``blocked_address``, ``dns_error``, ``connect_error``,
    ``tls_error``, ``timeout``, ``too_large``, ``too_many_redirects``, ``http_error`` (``status`` set),
    ``bad_response``."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed :func:`check_url`, with the address the connection must use."""

    url: str
    scheme: str
    host: str  # normalised name (or the canonical address text for IP literals)
    port: int
    address: str  # the pinned IP
    path: str  # path + query, as sent in the request line
    trusted: bool = False  # True when admitted by allow_hosts


@dataclass(frozen=True)
class FetchResult:
    url: str  # the final URL, after redirects
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    content: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


_BLOCKED_NAMES = ("localhost",)
_BLOCKED_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".localdomain")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_EXTRA_BLOCKED_V4 = [
    ipaddress.IPv4Network(n)
    for n in ("0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "198.18.0.0/15", "224.0.0.0/3")
]


def address_blocked(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be contacted, or None if it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "IPv4-mapped IPv6 address"
        if ip.sixtofour is not None:
            return address_blocked(ip.sixtofour) and "6to4 address of a blocked IPv4 address"
        if ip.teredo is not None:
            return "Teredo address"
        if ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            return address_blocked(inner) and "NAT64 address of a blocked IPv4 address"
        if int(ip) >> 32 == 0:
            return "IPv4-compatible or unspecified IPv6 address"
    for attr in (
        "is_unspecified",
        "is_loopback",
        "is_link_local",
        "is_multicast",
        "is_private",
        "is_reserved",
    ):
        if getattr(ip, attr):
            return attr[3:].replace("_", "-") + " address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local address"
    if isinstance(ip, ipaddress.IPv4Address) and any(ip in n for n in _EXTRA_BLOCKED_V4):
        return "non-public IPv4 range"
    if not ip.is_global:
        return "non-global address"
    return None


def _parse_ipv4_number(part: str) -> int | None:
    """One label of a WHATWG/inet_aton IPv4 host: decimal, 0x-hex or 0-octal."""
    try:
        if part[:2] in ("0x", "0X"):
            return int(part[2:] or "0", 16)
        if len(part) > 1 and part[0] == "0":
            return int(part[1:], 8)
        return int(part, 10) if part.isdigit() and part.isascii() else None
    except ValueError:
        return None


def parse_ipv4_host(host: str) -> ipaddress.IPv4Address | None:
    """The address a browser (WHATWG URL) would read from a numeric host such as ``127.1`` or ``0x7f000001``.

    Returns None when the host is not numeric. Raises FetchError for a numeric-looking host that is invalid.
    """
    labels = host.split(".")
    if labels and labels[-1] == "":
        labels = labels[:-1]
    if not labels or _parse_ipv4_number(labels[-1]) is None:
        return None  # per WHATWG: a host is an IPv4 address only when its last label is a number
    nums = [_parse_ipv4_number(p) for p in labels]
    if len(nums) > 4 or any(n is None for n in nums):
        raise FetchError("bad_url", f"malformed numeric host {host!r}")
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(nums)):
        raise FetchError("bad_url", f"numeric host {host!r} is out of range")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _normalise_host(raw: str) -> str:
    host = raw
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")  # nameprep: NFKC + case fold, U+3002 as a dot
        except UnicodeError as e:
            raise FetchError("bad_url", f"invalid international host name {raw!r}") from e
    host = host.lower().rstrip(".")
    if not host or any(not (c.isalnum() or c in "-._") for c in host):
        raise FetchError("bad_url", f"invalid host {raw!r}")
    return host


def check_url(url: str, *, allow_hosts: frozenset[str] = frozenset()) -> CheckedURL:
    """Validate ``url`` and choose the address to pin. Never connects; may call ``socket.getaddrinfo`` for
    names."""
    if not isinstance(url, str) or not url or len(url) > 8192:
        raise FetchError("bad_url", "URL must be a non-empty string of at most 8192 characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise FetchError("bad_url", "URL contains spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise FetchError("bad_url", f"cannot parse URL: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("bad_scheme", f"only http and https URLs are fetched, not {scheme or 'none'!r}")
    if "@" in parts.netloc:
        raise FetchError("bad_url", "URLs with user information (user@host) are not fetched")
    if "\\" in url:
        raise FetchError("bad_url", "backslashes are not allowed in URLs")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as e:
        raise FetchError("bad_url", f"invalid port in {url!r}") from e
    raw_host = parts.hostname or ""
    literal: IPAddress | None = None
    if parts.netloc.startswith("["):  # IPv6 literal
        if "%" in raw_host:
            raise FetchError("bad_url", "IPv6 zone identifiers are not allowed")
        try:
            literal = ipaddress.IPv6Address(raw_host)
        except ValueError as e:
            raise FetchError("bad_url", f"invalid IPv6 literal {raw_host!r}") from e
        host = literal.compressed
    else:
        host = _normalise_host(raw_host)
        literal = parse_ipv4_host(host)
        if literal is not None:
            host = str(literal)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    trusted = _trusted(host, port, allow_hosts)
    if literal is not None:
        addresses: list[IPAddress] = [literal]
    else:
        if not trusted and (host in _BLOCKED_NAMES or host.endswith(_BLOCKED_SUFFIXES)):
            raise FetchError("blocked_address", f"host {host!r} is a local name")
        addresses = _resolve(host, port)
    if not trusted:
        for ip in addresses:
            why = address_blocked(ip)
            if why:
                raise FetchError("blocked_address", f"{host} resolves to {ip} ({why})")
    return CheckedURL(url, scheme, host, port, str(addresses[0]), path, trusted)


def _trusted(host: str, port: int, allow_hosts: frozenset[str]) -> bool:
    """``allow_hosts`` entries: "name", "name:port", "1.2.3.4:port", "[::1]:port" (case-insensitive)."""
    if not allow_hosts:
        return False
    allowed = {h.strip().lower() for h in allow_hosts}
    shown = f"[{host}]" if ":" in host else host
    return bool({host, shown, f"{shown}:{port}"} & allowed)


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise FetchError("dns_error", f"cannot resolve {host!r}: {e}") from e
    out: list[IPAddress] = []
    for info in infos:
        addr = info[4][0].split("%", 1)[0]
        ip = ipaddress.ip_address(addr)
        if ip not in out:
            out.append(ip)
    if not out:
        raise FetchError("dns_error", f"{host!r} has no address")
    return out


# ---------------------------------------------------------------------------------------------- pinning
def _host_for_http_client(target: CheckedURL) -> str:
    return f"[{target.host}]" if ":" in target.host else target.host  # IPv6 literal: brackets, not a port


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: CheckedURL, timeout: float):
        super().__init__(_host_for_http_client(target), target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: CheckedURL, timeout: float, context: ssl.SSLContext):
        super().__init__(_host_for_http_client(target), target.port, timeout=timeout, context=context)
        self._address = target.address
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)  # SNI + cert check use the name


_SENSITIVE = ("authorization", "cookie", "proxy-authorization")


def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout: float = 5.0,
    allow_hosts: frozenset[str] = frozenset(),
    max_redirects: int = 5,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    total_timeout: float | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> FetchResult:
    """Fetch ``url`` under the rules in the module docstring. Non-2xx final answers raise ``http_error``."""
    deadline = time.monotonic() + (
        total_timeout if total_timeout is not None else max(timeout * 4, timeout + 5)
    )
    headers = dict(headers or {})
    context = ssl_context or ssl.create_default_context()
    method = method.upper()
    for hop in range(max_redirects + 1):
        target = check_url(url, allow_hosts=allow_hosts)
        status, resp_headers, content, location = _exchange(
            target, method, body, headers, timeout, deadline, max_bytes, context
        )
        if location is None:
            if not 200 <= status < 300:
                raise FetchError("http_error", f"{target.host} answered HTTP {status}", status=status)
            return FetchResult(url, status, resp_headers, content)
        if hop == max_redirects:
            break
        try:
            new_url = urljoin(url, location)
            same_host = urlsplit(new_url).hostname == urlsplit(url).hostname
        except ValueError as e:
            raise FetchError("bad_response", f"invalid redirect location {location!r}") from e
        if status == 303 or (status in (301, 302) and method == "POST"):
            method, body = "GET", None
            headers = {
                k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")
            }
        if not same_host:
            headers = {k: v for k, v in headers.items() if k.lower() not in _SENSITIVE}
        url = new_url
    raise FetchError("too_many_redirects", f"more than {max_redirects} redirects")


def _exchange(target, method, body, headers, timeout, deadline, max_bytes, context):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchError("timeout", "total time limit reached")
    t = min(timeout, remaining)
    conn = _PinnedHTTPS(target, t, context) if target.scheme == "https" else _PinnedHTTP(target, t)
    try:
        conn.request(method, target.path, body=body, headers={"User-Agent": "ccsr", **headers})
        resp = conn.getresponse()
        status = resp.status
        resp_headers = {k.lower(): v for k, v in resp.getheaders()}
        if status in (301, 302, 303, 307, 308) and resp_headers.get("location"):
            return status, resp_headers, b"", resp_headers["location"]
        length = resp_headers.get("content-length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FetchError("too_large", f"response is {length} bytes; the limit is {max_bytes}")
        chunks, total = [], 0
        while True:
            if time.monotonic() > deadline:
                raise FetchError("timeout", "total time limit reached while reading")
            chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise FetchError("too_large", f"response exceeds {max_bytes} bytes")
            chunks.append(chunk)
        return status, resp_headers, b"".join(chunks), None
    except FetchError:
        raise
    except TimeoutError as e:
        raise FetchError("timeout", f"{target.host}: timed out after {timeout} s") from e
    except ssl.SSLError as e:
        raise FetchError("tls_error", f"{target.host}: {e}") from e
    except http.client.HTTPException as e:
        raise FetchError("bad_response", f"{target.host}: {type(e).__name__}: {e}") from e
    except OSError as e:
        raise FetchError("connect_error", f"{target.host}:{target.port}: {e}") from e
    finally:
        conn.close()
