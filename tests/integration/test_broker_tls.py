"""AMQP over TLS: a managed node with an AMQPS listener (RETAILBUS.broker.tls) and a
certificate from a throw-away CA made here with openssl; our publisher and
nameko (AMQP_SSL) connect over amqps://, a client without the CA is refused."""
from __future__ import annotations

import ssl
import subprocess
from urllib.parse import quote

import pytest
from nameko.rpc import rpc
from nameko.standalone.rpc import ClusterRpcProxy

from services.broker.node import ManagedBroker
from services.broker.setup import free_ports
from bus import topology
from bus.publisher import AMQP_SSL_ENV, ConfirmingPublisher, OutgoingMessage, connect
from bus.settings import TlsSettings

pytestmark = pytest.mark.integration


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca_and_server_cert(folder) -> dict:
    """A self-signed CA and a server certificate it signed for localhost / 127.0.0.1."""
    folder.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=retailbus test CA", cwd=folder)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=folder)
    return {"certfile": folder / "server.pem", "keyfile": folder / "server.key", "cacertfile": folder / "ca.pem"}


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    files = make_ca_and_server_cert(root / "pki")
    port, dist, mgmt, tls_port = free_ports(4)
    broker = ManagedBroker(root / "broker", port=port, dist_port=dist, management_port=mgmt)
    broker.tls = TlsSettings(port=tls_port, **files)
    broker.start()
    try:
        creds = broker.credentials()
        uri = f"amqps://{quote(creds.user, safe='')}:{quote(creds.password, safe='')}@127.0.0.1:{tls_port}/retailbus"
        yield broker, uri, str(files["cacertfile"])
    finally:
        broker.stop()
        if broker.is_running():
            broker.kill()


@pytest.mark.timeout(180)
def test_publish_and_consume_over_amqps_and_a_client_without_the_ca_is_refused(tls_broker, monkeypatch):
    _, uri, ca = tls_broker
    monkeypatch.setenv(AMQP_SSL_ENV, f"{{ca_certs: {ca}}}")
    conn = connect(uri, 10)
    try:
        assert conn.transport.sock.version().startswith("TLS")
        ch = conn.channel()
        topology.declare_exchange(ch, "tls_test.events")
        ch.queue_declare("tls-test", durable=True, auto_delete=False)
        ch.queue_bind("tls-test", "tls_test.events", "tls.ping.v1")
        publisher = ConfirmingPublisher(uri)
        publisher.publish(OutgoingMessage("tls_test.events", "tls.ping.v1", b'{"ping": 1}', message_id="m-1"))
        publisher.close()
        message = ch.basic_get("tls-test", no_ack=True)
        assert message is not None and message.body == b'{"ping": 1}'
    finally:
        conn.collect()

    monkeypatch.delenv(AMQP_SSL_ENV)  # the system's CAs only: our broker's certificate is unknown
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(uri, 10)
    monkeypatch.setenv(AMQP_SSL_ENV, f"{{ca_certs: {ca}, server_hostname: erp.example.com}}")
    with pytest.raises(ssl.SSLCertVerificationError, match="erp.example.com"):
        connect(uri, 10)  # the right CA, but not the name the certificate was made for


class TlsEcho:
    name = "tls_echo"

    @rpc
    def echo(self, value):
        return value


@pytest.mark.timeout(180)
def test_nameko_services_talk_over_amqps_with_amqp_ssl(tls_broker, container_factory):
    _, uri, ca = tls_broker
    config = {"AMQP_URI": uri, "AMQP_SSL": {"ca_certs": ca}}
    container = container_factory(TlsEcho, config)
    container.start()
    with ClusterRpcProxy(config, timeout=20) as proxy:
        assert proxy.tls_echo.echo("over tls") == "over tls"
