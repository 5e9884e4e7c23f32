//! HTTPS and WSS: a `wss://` join end to end, and a certificate replaced under a
//! running server reaching new connections.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use weir_signaling::{ClientMessage, ServerMessage};

fn self_signed(dir: &std::path::Path) -> Vec<u8> {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("cert.pem"), key.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    key.cert.der().to_vec()
}

/// A TLS connection to the server that trusts only `trusted`, and the certificate
/// the server presented.
async fn connect(
    addr: std::net::SocketAddr,
    trusted: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.to_vec().into()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (tls, presented)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wss_join_works_end_to_end_and_a_new_certificate_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let first = self_signed(dir.path());
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let t = TestServer::start_with(|c| {
        c.server.tls_cert_file = cert.display().to_string();
        c.server.tls_key_file = key.display().to_string();
    })
    .await;
    let addr = t.server.http_addr;

    // Plain HTTP is not spoken there any more.
    let plain = tokio::time::timeout(Duration::from_secs(5), common::http_get(addr, "/healthz"))
        .await
        .expect("a plain request gets an answer or a close");
    assert!(!plain.contains("ok"), "{plain}");

    // wss://: join with real credentials, and get room events.
    let (tls, presented) = connect(addr, &[&first]).await;
    assert_eq!(presented, first);
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
        .await
        .unwrap();
    let join = ClientMessage::Join(t.join("alice", 77, 0xff));
    ws.send(Message::Text(serde_json::to_string(&join).unwrap().into()))
        .await
        .unwrap();
    let answer = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Text(text) => break ServerMessage::parse(&text).unwrap(),
            _ => continue,
        }
    };
    assert!(matches!(answer, ServerMessage::Joined { .. }), "{answer:?}");

    // The certificate is replaced on disk: new connections get the new one, the
    // websocket already open stays.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = self_signed(dir.path());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_tls, presented) = connect(addr, &[&first, &second]).await;
        if presented == second {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ws.send(Message::Text(
        serde_json::to_string(&ClientMessage::Ping { ts: 1 })
            .unwrap()
            .into(),
    ))
    .await
    .unwrap();
}
