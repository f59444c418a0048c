"""SSRF suite for ccsr.imaging.fetch: hostile URL forms refused without any socket, a real loopback server
reached only through the allow-list, redirects re-validated, size cap, timeout, pinning, webhook/upload
methods."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from ccsr.imaging import FetchError, Limits, check_url, decode, fetch, fetch_image
from ccsr.imaging.fetch import parse_ipv4_host

from .corpus import pattern, save

HOSTILE = [
    "http://127.0.0.1/",
    "http://127.1/",  # short form
    "http://127.000.000.001/",  # zero-padded (octal) form
    "http://2130706433/",  # decimal
    "http://0x7f000001/",  # hex
    "http://0x7f.0.0.1/",  # mixed hex
    "http://0177.0.0.1/",  # octal
    "http://0/",
    "http://0.0.0.0/",  # unspecified (imgproxy CVE-2025-24354)
    "http://0.0.0.0:8123/",
    "http://[::]/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[0:0:0:0:0:ffff:7f00:1]/",
    "http://[::127.0.0.1]/",  # IPv4-compatible
    "http://[64:ff9b::7f00:1]/",  # NAT64 of loopback
    "http://[2002:a9fe:a9fe::]/",  # 6to4 of the metadata address
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
    "http://2852039166/",  # the same, decimal
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/",  # zone id
    "http://[fc00::1]/",  # unique local
    "http://[fec0::1]/",  # site-local
    "http://[ff02::1]/",  # multicast
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",  # CGNAT
    "http://224.0.0.1/",  # multicast
    "http://240.0.0.1/",  # reserved
    "http://255.255.255.255/",
    "http://198.18.0.1/",  # benchmarking
    "http://192.0.0.8/",
    "http://localhost/",
    "http://LOCALHOST./",
    "http://foo.localhost/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://printer.local/",
    "http://１２７.０.０.１/",  # full-width digits
    "http://127。0。0。1/",  # ideographic full stops
    "http://example.com@127.0.0.1/",  # userinfo (imgproxy's allow-list pitfall)
    "http://user:pw@example.com/",
    "http://127.0.0.1\t/",
    "http://127.0.0.1 /",
    "http://256.0.0.1/",  # malformed numeric host
    "http://1.2.3.4.5/",
    "file:///etc/passwd",
    "ftp://example.com/x.png",
    "gopher://127.0.0.1:6379/_INFO",
    "dict://127.0.0.1:11211/",
    "javascript:alert(1)",
    "data:image/png;base64,iVBORw0KGgo=",
    "//127.0.0.1/",
    "http:///x.png",
    "http://[::1/",
    "",
]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket or resolve a name fails the test."""

    def boom(*a, **k):
        raise AssertionError("check_url opened a socket or resolved a name")

    monkeypatch.setattr(socket, "socket", boom)
    monkeypatch.setattr(socket, "create_connection", boom)
    monkeypatch.setattr(socket, "getaddrinfo", boom)


def test_hostile_list_is_long_enough():
    assert len(HOSTILE) >= 25 and len(set(HOSTILE)) == len(HOSTILE)


@pytest.mark.parametrize("url", HOSTILE)
def test_hostile_urls_refused_without_any_socket(url, no_network):
    with pytest.raises(FetchError) as e:
        check_url(url, allow_hosts=frozenset({"127.0.0.1:8123"}))
    assert e.value.code in ("blocked_address", "bad_url", "bad_scheme")


@pytest.mark.parametrize(
    ("host", "ip"),
    [
        ("127.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("192.168.257", "192.168.1.1"),
        ("0", "0.0.0.0"),
        ("example.com", None),
        ("1.2.3.4.", "1.2.3.4"),
        ("3com.net", None),
    ],
)
def test_numeric_host_parsing_matches_browsers(host, ip):
    got = parse_ipv4_host(host)
    assert (str(got) if got else None) == ip


def test_public_literal_accepted_without_socket(no_network):
    c = check_url("https://8.8.8.8/img.png?x=1")
    assert (c.address, c.port, c.path, c.scheme) == ("8.8.8.8", 443, "/img.png?x=1", "https")
    c6 = check_url("http://[2606:4700:4700::1111]:8080/")
    assert (c6.address, c6.port) == ("2606:4700:4700::1111", 8080)


def test_names_are_validated_after_resolution(monkeypatch):
    answers = {
        "cdn.example": ["93.184.216.34"],
        "rebind.example": ["93.184.216.34", "10.0.0.7"],
        "sneaky.example": ["169.254.169.254"],
    }

    def fake_getaddrinfo(host, port, *a, **k):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert check_url("http://cdn.example/a.png").address == "93.184.216.34"
    for host in ("rebind.example", "sneaky.example"):  # any blocked answer refuses the name
        with pytest.raises(FetchError) as e:
            check_url(f"http://{host}/")
        assert e.value.code == "blocked_address"


# ---------------------------------------------------------------------------------------- local server
PNG = save(pattern(8, 6), "PNG")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: ClassVar[list] = []

    def log_message(self, *a):  # keep test output quiet
        pass

    def _send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k.lower() == "transfer-encoding" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        Handler.seen.append(("GET", self.path, self.headers.get("Host"), b""))
        port = self.server.server_address[1]
        p = self.path
        if p == "/img.png":
            self._send(200, PNG, [("Content-Type", "image/png")])
        elif p == "/big":
            self._send(200, b"x" * 2_000_000)
        elif p == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"%x\r\n%s\r\n" % (50_000, b"y" * 50_000))
            self.wfile.write(b"0\r\n\r\n")
        elif p == "/slow":
            time.sleep(2.0)
            self._send(200, b"late")
        elif p == "/to-metadata":
            self._send(302, headers=[("Location", "http://169.254.169.254/latest/meta-data/")])
        elif p == "/to-other-port":
            self._send(302, headers=[("Location", f"http://127.0.0.1:{port + 1}/img.png")])
        elif p == "/to-img":
            self._send(301, headers=[("Location", "/img.png")])
        elif p == "/loop":
            self._send(302, headers=[("Location", "/loop")])
        elif p == "/missing":
            self._send(404, b"nope")
        else:
            self._send(200, json.dumps({"path": p}).encode())

    def do_POST(self):
        body = self._body()
        Handler.seen.append(("POST", self.path, self.headers.get("Host"), body))
        if self.path == "/see-other":
            self._send(303, headers=[("Location", "/done")])
        else:
            self._send(200, b'{"ok": true}', [("Content-Type", "application/json")])

    def do_PUT(self):
        body = self._body()
        Handler.seen.append(("PUT", self.path, self.headers.get("Content-Type"), body))
        self._send(201, b"")


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def allow(port: int) -> frozenset[str]:
    return frozenset({f"127.0.0.1:{port}"})


def test_loopback_refused_without_allow_list(server):
    with pytest.raises(FetchError) as e:
        fetch(f"http://127.0.0.1:{server}/img.png", max_bytes=10**6)
    assert e.value.code == "blocked_address"


def test_allowed_loopback_fetch_works(server):
    r = fetch(f"http://127.0.0.1:{server}/img.png", max_bytes=10**6, allow_hosts=allow(server))
    assert r.status == 200 and r.content == PNG and r.content_type == "image/png"
    assert decode(r.content).size == (8, 6)
    assert fetch_image(f"http://127.0.0.1:{server}/img.png", Limits(), allow_hosts=allow(server)) == PNG


def test_allow_list_forms(no_network):
    assert check_url("http://[::1]:8123/", allow_hosts=frozenset({"[::1]:8123"})).trusted
    assert check_url("http://127.0.0.1:8123/", allow_hosts=frozenset({"127.0.0.1:8123"})).trusted


def test_allowed_name_is_case_insensitive_and_still_resolved_once():
    c = check_url("http://LOCALHOST:9/", allow_hosts=frozenset({"localhost:9"}))  # /etc/hosts, no DNS traffic
    assert c.trusted and c.host == "localhost" and c.address in ("127.0.0.1", "::1")


def test_allow_list_is_per_port(server):
    with pytest.raises(FetchError) as e:
        check_url(f"http://127.0.0.1:{server + 1}/", allow_hosts=allow(server))
    assert e.value.code == "blocked_address"


def test_redirect_to_metadata_refused(server):
    with pytest.raises(FetchError) as e:
        fetch(f"http://127.0.0.1:{server}/to-metadata", max_bytes=10**6, allow_hosts=allow(server))
    assert e.value.code == "blocked_address" and "169.254.169.254" in e.value.message


def test_redirect_to_unlisted_port_refused(server):
    with pytest.raises(FetchError) as e:
        fetch(f"http://127.0.0.1:{server}/to-other-port", max_bytes=10**6, allow_hosts=allow(server))
    assert e.value.code == "blocked_address"


def test_relative_redirect_followed(server):
    r = fetch(f"http://127.0.0.1:{server}/to-img", max_bytes=10**6, allow_hosts=allow(server))
    assert r.content == PNG and r.url.endswith("/img.png")


def test_redirect_loop_stops(server):
    with pytest.raises(FetchError) as e:
        fetch(f"http://127.0.0.1:{server}/loop", max_bytes=10**6, allow_hosts=allow(server), max_redirects=3)
    assert e.value.code == "too_many_redirects"


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
def test_size_cap_while_streaming(server, path):
    with pytest.raises(FetchError) as e:
        fetch(f"http://127.0.0.1:{server}{path}", max_bytes=1_000_000, allow_hosts=allow(server))
    assert e.value.code == "too_large"
    r = fetch(f"http://127.0.0.1:{server}{path}", max_bytes=2_000_000, allow_hosts=allow(server))
    assert len(r.content) == 2_000_000


def test_timeout(server):
    """The server answers only after 2 s; a 0.5 s read timeout must give up first (the request would
    otherwise succeed, so "timeout" can only come from our limit)."""
    with pytest.raises(FetchError) as e:
        fetch(f"http://127.0.0.1:{server}/slow", max_bytes=100, timeout=0.5, allow_hosts=allow(server))
    assert e.value.code == "timeout"


def test_http_error_status(server):
    with pytest.raises(FetchError) as e:
        fetch(f"http://127.0.0.1:{server}/missing", max_bytes=100, allow_hosts=allow(server))
    assert e.value.code == "http_error" and e.value.status == 404


def test_webhook_post_and_upload_put(server):
    Handler.seen.clear()
    payload = json.dumps({"taskUUID": "x"}).encode()
    r = fetch(
        f"http://127.0.0.1:{server}/hook",
        max_bytes=1000,
        allow_hosts=allow(server),
        method="POST",
        body=payload,
        headers={"Content-Type": "application/json"},
    )
    assert r.status == 200 and json.loads(r.content) == {"ok": True}
    r = fetch(
        f"http://127.0.0.1:{server}/upload/a.png",
        max_bytes=1000,
        allow_hosts=allow(server),
        method="PUT",
        body=PNG,
        headers={"Content-Type": "image/png"},
    )
    assert r.status == 201
    assert Handler.seen == [
        ("POST", "/hook", f"127.0.0.1:{server}", payload),
        ("PUT", "/upload/a.png", "image/png", PNG),
    ]


def test_post_303_becomes_get(server):
    Handler.seen.clear()
    r = fetch(
        f"http://127.0.0.1:{server}/see-other",
        max_bytes=1000,
        allow_hosts=allow(server),
        method="POST",
        body=b"{}",
        headers={"Content-Type": "application/json"},
    )
    assert r.status == 200 and [s[0] for s in Handler.seen] == ["POST", "GET"]


def test_connection_is_pinned_to_the_validated_address(server, monkeypatch):
    """The name is resolved once, by the validator; the socket goes to that IP and Host carries the name."""
    real = socket.getaddrinfo
    lookups = []

    def fake_getaddrinfo(host, port, *a, **k):
        lookups.append(host)
        if host == "images.test":  # an attacker's DNS would answer differently the second time
            ip = "127.0.0.1" if len(lookups) == 1 else "10.9.9.9"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, port, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    Handler.seen.clear()
    r = fetch(f"http://images.test:{server}/img.png", max_bytes=10**6, allow_hosts=frozenset({"images.test"}))
    assert r.content == PNG and lookups.count("images.test") == 1  # (the connection only parses "127.0.0.1")
    assert Handler.seen[0][2] == f"images.test:{server}"


def test_https_pinned_with_sni_and_certificate_check(tmp_path, monkeypatch):
    """Over TLS the socket goes to the pinned IP while SNI and the certificate check use the name."""
    pytest.importorskip("cryptography")
    from ccsr.api.tls import make_self_signed

    files = make_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", hosts=("images.test",))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files.cert, files.key)
    sni: list[str] = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    real = socket.getaddrinfo

    def fake_getaddrinfo(host, p, *a, **k):
        if host in ("images.test", "other.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p))]
        return real(host, p, *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    client_ctx = ssl.create_default_context(cafile=str(files.cert))
    trusted = frozenset({"images.test", "other.test"})
    try:
        r = fetch(
            f"https://images.test:{port}/img.png",
            max_bytes=10**6,
            allow_hosts=trusted,
            ssl_context=client_ctx,
        )
        assert r.content == PNG and sni == ["images.test"]
        with pytest.raises(FetchError) as e:  # the certificate is for images.test only
            fetch(
                f"https://other.test:{port}/img.png",
                max_bytes=10**6,
                allow_hosts=trusted,
                ssl_context=client_ctx,
            )
        assert e.value.code == "tls_error"
    finally:
        srv.shutdown()
        srv.server_close()
