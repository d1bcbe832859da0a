"""Which ``ssl:`` descriptions the standard library's TLS serves, and with which files."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import quoteStringArgument

from regproxy.server.listen_tls import (
    CertificateFiles,
    served_files,
    server_context,
    split_description,
)
from tests.support.tls import make_ca_and_cert, make_chain


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("ssl:8443:privateKey=k.pem", CertificateFiles("k.pem", "k.pem")),
        ("ssl:8443:privateKey=k.pem:certKey=c.pem", CertificateFiles("k.pem", "c.pem")),
        ("ssl:8443:k.pem:c.pem", CertificateFiles("k.pem", "c.pem")),
        (r"ssl:port=8443:privateKey=k.pem:interface=\:\:1", CertificateFiles("k.pem", "k.pem")),
        ("ssl:443", CertificateFiles("server.pem", "server.pem")),
        (
            r"ssl:8443:privateKey=/tls/k.pem:certKey=/tls/c\:rt.pem",
            CertificateFiles("/tls/k.pem", "/tls/c:rt.pem"),
        ),
        ("ssl:8443:privateKey=k.pem:backlog=100", CertificateFiles("k.pem", "k.pem")),
        (
            "ssl:8443:privateKey=k.pem:extraCertChain=chain.pem:dhParameters=dh.pem",
            CertificateFiles("k.pem", "k.pem", "chain.pem", "dh.pem"),
        ),
    ],
)
def test_served_descriptions(description: str, expected: CertificateFiles) -> None:
    assert served_files(description) == expected


@pytest.mark.parametrize(
    "description",
    [
        "tcp:8080",
        "systemd:domain=INET:index=0",
        "ssl:8443:privateKey=k.pem:sslmethod=TLSv1_2_METHOD",
        "ssl:8443:privateKey=k.pem:somethingNew=1",
        "ssl:8443:k.pem:privateKey=other.pem",  # given twice: Twisted's parser decides
    ],
)
def test_descriptions_left_to_twisted(description: str) -> None:
    assert served_files(description) is None


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40))
def test_a_quoted_path_reads_back_as_itself(path: str) -> None:
    """``quoteStringArgument`` is Twisted's public way to put any text in a description."""
    args, kwargs = split_description(f"ssl:8443:privateKey={quoteStringArgument(path)}")
    assert args == ["ssl", "8443"]
    assert kwargs == {"privateKey": path}


def test_a_matching_key_and_certificate_make_a_server_context(tmp_path: Path) -> None:
    files = make_ca_and_cert(tmp_path / "tls")
    context = server_context(CertificateFiles(str(files.key), str(files.cert)))
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE  # no client certificates asked for
    assert context.options & ssl.OP_NO_RENEGOTIATION


def test_a_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    one, other = make_ca_and_cert(tmp_path / "one"), make_ca_and_cert(tmp_path / "other")
    with pytest.raises(ssl.SSLError):
        server_context(CertificateFiles(str(other.key), str(one.cert)))


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    """A TLS handshake between the two contexts in memory; raises what the client raises."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_side = server.wrap_bio(to_server, to_client, server_side=True)
    client_side = client.wrap_bio(to_client, to_server, server_hostname="127.0.0.1")
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client_side), ("server", server_side)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


@pytest.mark.parametrize("how", ["fullchain as certKey", "leaf and extraCertChain"])
def test_the_intermediate_reaches_a_client_that_trusts_only_the_root(
    tmp_path: Path, how: str
) -> None:
    chain = make_chain(tmp_path)
    files = (
        CertificateFiles(str(chain.leaf_key), str(chain.fullchain))
        if how == "fullchain as certKey"
        else CertificateFiles(str(chain.leaf_key), str(chain.leaf), str(chain.intermediate))
    )
    handshake(server_context(files), ssl.create_default_context(cafile=str(chain.root)))


def test_without_the_intermediate_such_a_client_refuses(tmp_path: Path) -> None:
    """What the two cases above prove: the chain is what makes them verify."""
    chain = make_chain(tmp_path)
    server = server_context(CertificateFiles(str(chain.leaf_key), str(chain.leaf)))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, ssl.create_default_context(cafile=str(chain.root)))


def test_a_chain_file_without_a_certificate_is_refused(tmp_path: Path) -> None:
    chain = make_chain(tmp_path)
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    with pytest.raises(ssl.SSLError):
        server_context(CertificateFiles(str(chain.leaf_key), str(chain.leaf), str(empty)))


def test_cache_hits_never_go_out_by_sendfile_under_the_tls_layer(tmp_path: Path) -> None:
    """sendfile writes plaintext straight to the socket: under TLS it must never run."""
    from types import SimpleNamespace

    from twisted.internet.interfaces import ISSLTransport
    from twisted.internet.protocol import Protocol
    from twisted.web.test.requesthelper import DummyRequest

    from regproxy.cache.serve import sendfile_transport
    from regproxy.tls.layer import TLSLayer

    files = make_ca_and_cert(tmp_path / "tls")
    layer = TLSLayer(server_context(CertificateFiles(str(files.key), str(files.cert))), Protocol())
    assert ISSLTransport.providedBy(layer)
    request = DummyRequest([b""])
    request.channel = SimpleNamespace(transport=layer)  # type: ignore[assignment]
    assert sendfile_transport(request) is None  # type: ignore[arg-type]
