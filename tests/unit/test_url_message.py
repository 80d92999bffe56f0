from __future__ import annotations

import pytest

from magne import wire
from magne.amqp.url import URLError, parse_url
from magne.errors import BadMessage


def test_url_defaults_and_vhost():
    p = parse_url("amqp://localhost")
    assert (p.host, p.port, p.username, p.vhost, p.tls) == ("localhost", 5672, "guest", "/", False)
    p = parse_url("amqps://u%40x:p%3Aw@h.example:1234/my%2Fvhost?heartbeat=5&connection_timeout=2500")
    assert (p.host, p.port, p.username, p.password, p.vhost, p.tls) == ("h.example", 1234, "u@x", "p:w", "my/vhost", True)
    assert p.heartbeat == 5 and p.connect_timeout == 2.5
    assert parse_url("amqps://h").port == 5671
    assert parse_url("amqp://h/%2F").vhost == "/"


def test_url_never_shows_password():
    p = parse_url("amqp://user:s3cret@h/v")
    assert "s3cret" not in p.safe_url() and "s3cret" not in repr(p)


@pytest.mark.parametrize("url", ["http://h", "amqp://h:notaport", "amqp://h?heartbeat=x"])
def test_bad_urls(url):
    with pytest.raises(URLError):
        parse_url(url)


def test_roundtrip_and_original_format():
    body = wire.encode("add", [1, 2], {"z": 3}, "mid")
    assert wire.decode(body) == ("add", [1, 2], {"z": 3})
    assert wire.decode(b'{"func": "add", "args": [1, 2]}') == ("add", [1, 2], {})
    assert wire.decode(b'{"func": "noargs"}') == ("noargs", [], {})


@pytest.mark.parametrize("body,why", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not an object"),
    (b'{"args": []}', "'func'"),
    (b'{"func": 3}', "'func'"),
    (b'{"func": "x", "args": {"a": 1}}', "'args'"),
    (b'{"func": "x", "kwargs": [1]}', "'kwargs'"),
    (b"\xff\xfe", "not JSON"),
])
def test_bad_bodies_say_why(body, why):
    with pytest.raises(BadMessage, match=why):
        wire.decode(body)


def test_unserializable_arguments_are_a_clear_error():
    with pytest.raises(TypeError, match="not JSON-serializable"):
        wire.encode("t", [object()])


def test_tls_query_parameters_use_rabbitmqs_names():
    p = parse_url("amqps://u:p@h/%2F?cacertfile=/ca.pem&certfile=/c.pem&keyfile=/k.pem&verify=verify_none"
                  "&server_name_indication=broker.example&auth_mechanism=external")
    assert (p.cacertfile, p.certfile, p.keyfile, p.verify, p.server_name, p.auth_mechanism) == (
        "/ca.pem", "/c.pem", "/k.pem", False, "broker.example", "EXTERNAL")
    assert parse_url("amqps://h/?server_name_indication=disable").server_name is None
    assert parse_url("amqps://h/").server_name == "h" and parse_url("amqps://h/").verify


def test_tls_files_come_from_the_environment_unless_the_url_sets_them(monkeypatch):
    monkeypatch.setenv("MAGNE_TLS_CACERTFILE", "/env-ca.pem")
    monkeypatch.setenv("MAGNE_TLS_CERTFILE", "/env-c.pem")
    monkeypatch.setenv("MAGNE_TLS_KEYFILE", "/env-k.pem")
    p = parse_url("amqps://h/?cacertfile=/url-ca.pem")
    assert (p.cacertfile, p.certfile, p.keyfile) == ("/url-ca.pem", "/env-c.pem", "/env-k.pem")


@pytest.mark.parametrize(("url", "why"), [
    ("amqps://h/?verify=maybe", "verify_peer or verify_none"),
    ("amqps://h/?auth_mechanism=kerberos", "plain or external"),
    ("amqps://h/?keyfile=/k.pem", "keyfile= without certfile="),
    ("amqp://h/?heartbeat=soon", "must be an integer"),
])
def test_bad_tls_settings_are_clear_errors(url, why):
    with pytest.raises(URLError, match=why):
        parse_url(url)


@pytest.mark.parametrize("url", ["amqp://guest:s3cr3t#x@host:5672/%2F", "amqp://guest:s3cr3t/x@host/%2F",
                                 "amqp://guest:s3cr3t?x@host/%2F"])
def test_no_url_error_echoes_the_password(url):
    with pytest.raises(URLError) as e:  # the unescaped character ends the host part inside the password
        parse_url(url)
    assert "s3cr3t" not in str(e.value) and "percent-encoded" in str(e.value)
