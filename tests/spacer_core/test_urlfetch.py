"""spacer_core.urlfetch against a real loopback HTTP server: what a URL may reach and read."""

from __future__ import annotations

import ipaddress
import time

import pytest

from spacer_core.exceptions import URLDownloadError, URLRefusedError
from spacer_core.storage import URLStorage, storage_factory
from spacer_core.urlfetch import DEFAULT_MAX_BYTES, UrlRules, address_refusal, exists, fetch

OPEN = UrlRules(allow_private=True)


@pytest.mark.parametrize(
    "address, why",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("2002:a01:203::", "private"),  # 6to4 around 10.1.2.3
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12::1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "public"),  # carrier-grade NAT: not global
    ],
)
def test_non_public_addresses_are_refused(address, why):
    assert why in address_refusal(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2002:808:808::"])
def test_public_addresses_pass(address):
    assert address_refusal(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.org/x", "data:text/plain,hello", "gopher://h/"]
)
def test_only_http_and_https(url):
    with pytest.raises(URLRefusedError, match="only http and https URLs are allowed"):
        fetch(url, OPEN)
    assert not exists(url, OPEN)


def test_loopback_refused_by_default_without_connecting(http_server):
    url = http_server.add("/secret", b"internal")
    by_name = url.replace("127.0.0.1", "localhost")
    for target, why in (
        (url, "host resolves to a loopback"),
        (by_name, "host name resolves to an address this server"),
    ):
        with pytest.raises(
            URLRefusedError, match=rf"Refused to download from the URL '.*/secret': its {why}"
        ) as info:
            fetch(target)
        # What a name resolves to is the server's network layout: not told.
        assert target == url or (
            "127.0.0.1" not in str(info.value) and "loopback address" not in str(info.value)
        )
        assert not exists(target)
        # URLStorage's own default refuses too, whatever the process-wide default.
        with pytest.raises(URLRefusedError):
            URLStorage(UrlRules()).load(target)
    assert http_server.hits.get("/secret", 0) == 0
    assert fetch(url, OPEN) == b"internal"


def test_url_storage_default_rules_refuse_private():
    assert URLStorage.__dict__["default_rules"] == UrlRules()
    assert UrlRules().allow_private is False and UrlRules().max_bytes == DEFAULT_MAX_BYTES


def test_every_redirect_hop_is_checked(http_server):
    to_file = http_server.add("/to-file", b"", status=302, location="file:///etc/passwd")
    with pytest.raises(URLRefusedError, match="'file:///etc/passwd': only http and https"):
        fetch(to_file, OPEN)
    # The metadata address stays refused even when private addresses are
    # allowed, so this is refused on the second hop without a connection.
    to_metadata = http_server.add(
        "/to-md", b"", status=307, location="http://169.254.169.254/latest/meta-data/"
    )
    with pytest.raises(URLRefusedError, match="169.254.169.254.*cloud metadata"):
        fetch(to_metadata, OPEN)
    assert not exists(to_metadata, OPEN)


def test_redirects_are_followed_and_bounded(http_server):
    http_server.add("/final", b"here")
    http_server.add("/hop", b"", status=301, location="/final")
    assert fetch(http_server.url("/hop"), OPEN) == b"here"
    assert http_server.hits["/final"] == 1
    http_server.add("/loop", b"", status=302, location="/loop")
    with pytest.raises(URLDownloadError, match="more than 2 redirects"):
        fetch(http_server.url("/loop"), UrlRules(allow_private=True, max_redirects=2))
    assert http_server.hits["/loop"] == 3


def test_body_size_is_bounded(http_server):
    rules = UrlRules(allow_private=True, max_bytes=100)
    declared = http_server.add("/big", b"x" * 1000)
    with pytest.raises(
        URLDownloadError, match="Couldn't read the full response.*larger than the limit of 100 bytes"
    ):
        fetch(declared, rules)
    # No Content-Length: counted while reading.
    endless = http_server.add("/stream", b"y" * 5000, send_length=False)
    with pytest.raises(URLDownloadError, match="larger than the limit of 100 bytes"):
        fetch(endless, rules)
    assert fetch(endless, OPEN) == b"y" * 5000
    assert fetch(http_server.add("/small", b"z" * 100), rules) == b"z" * 100


def test_total_time_is_bounded(http_server):
    # Each read is within the idle timeout; the whole download is not.
    url = http_server.add("/trickle", b"t" * 1000, stall=3.0)
    start = time.monotonic()
    with pytest.raises(URLDownloadError, match="Couldn't read the full response from the URL '.*trickle'"):
        fetch(url, UrlRules(allow_private=True, total_timeout=0.5), timeout=10.0)
    assert time.monotonic() - start < 2.5


def test_http_errors_keep_pyspacer_messages(http_server):
    url = http_server.url("/missing.jpg")
    with pytest.raises(URLDownloadError) as info:
        storage_factory("url").load(url)
    assert (
        str(info.value)
        == f"Failed to download from the URL '{url}'. / Details - HTTPError: HTTP Error 404: Not Found"
    )
    assert not isinstance(info.value, URLRefusedError)


def test_unresolvable_host():
    with pytest.raises(
        URLDownloadError, match="Failed to download from the URL 'http://no-such-host.invalid/x'"
    ):
        fetch("http://no-such-host.invalid/x")
