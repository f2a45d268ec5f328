//! DNS over TLS: queries over a real TLS client, and a certificate
//! renewed on reload without the listener going away.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::Message;
use hickory_proto::rr::{RData, RecordType};
use rustls::pki_types::{CertificateDer, ServerName};
use support::{instance, query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A self-signed certificate for `dns.test`: (cert PEM, key PEM, cert DER).
fn certificate() -> (String, String, CertificateDer<'static>) {
    let generated = rcgen::generate_simple_self_signed(vec!["dns.test".into()]).unwrap();
    (
        generated.cert.pem(),
        generated.signing_key.serialize_pem(),
        generated.cert.der().clone(),
    )
}

/// Asks `name` over DoT, trusting only `root`; the reply and the
/// certificate the server presented.
async fn ask(
    server: SocketAddr,
    root: &CertificateDer<'static>,
    name: &str,
) -> Result<(Message, CertificateDer<'static>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"dot".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("dns.test").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    let bytes = query(name, RecordType::A, None).to_vec().unwrap();
    tls.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    tls.write_all(&bytes).await.unwrap();
    let mut length = [0u8; 2];
    tls.read_exact(&mut length).await.unwrap();
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(length))];
    tls.read_exact(&mut reply).await.unwrap();
    Ok((Message::from_vec(&reply).unwrap(), presented))
}

#[tokio::test]
async fn queries_over_tls_and_a_certificate_renewed_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("dns.pem"), dir.path().join("dns.key"));
    let (cert, key, first) = certificate();
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let mut config = support::test_config();
    config.dns.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.dns.tls_cert = Some(cert_file.clone());
    config.dns.tls_key = Some(key_file.clone());
    let muster = support::start_with(config).await;
    let dot = muster.dns_tls.expect("a DoT listener");
    muster
        .register_ok("secure", "s-1", instance("10.20.0.1", 853))
        .await;

    let (reply, presented) = ask(dot, &first, "secure.svc.internal.").await.unwrap();
    assert_eq!(presented, first);
    assert!(
        matches!(&reply.answers[..], [r] if matches!(&r.data, RData::A(a) if a.0.to_string() == "10.20.0.1"))
    );

    let (cert, key, second) = certificate();
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    muster.reloader().reload(None).unwrap();
    let (_, presented) = ask(dot, &second, "secure.svc.internal.").await.unwrap();
    assert_eq!(presented, second, "the renewed certificate is served");
    assert!(
        ask(dot, &first, "secure.svc.internal.").await.is_err(),
        "the old one is gone"
    );

    std::fs::write(&key_file, "not a key").unwrap();
    let error = muster.reloader().reload(None).unwrap_err();
    assert!(error.to_string().contains("dns.key"), "{error}");
    let (_, presented) = ask(dot, &second, "secure.svc.internal.").await.unwrap();
    assert_eq!(presented, second, "a bad reload keeps what is served");
    muster.stop().await;
}

#[tokio::test]
async fn a_missing_certificate_stops_startup() {
    let mut config = support::test_config();
    config.dns.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.dns.tls_cert = Some("/nonexistent/dns.pem".into());
    config.dns.tls_key = Some("/nonexistent/dns.key".into());
    let error = muster::start(&config).await.err().expect("refused");
    assert!(
        error.to_string().contains("/nonexistent/dns.pem"),
        "{error}"
    );
}

#[tokio::test]
#[ignore = "needs kdig"]
async fn kdig_queries_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("dns.pem"), dir.path().join("dns.key"));
    let (cert, key, _) = certificate();
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let mut config = support::test_config();
    config.dns.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    config.dns.tls_cert = Some(cert_file.clone());
    config.dns.tls_key = Some(key_file);
    let muster = support::start_with(config).await;
    let dot = muster.dns_tls.unwrap();
    muster
        .register_ok("secure", "s-1", instance("10.20.0.1", 853))
        .await;
    let mut kdig = std::process::Command::new("kdig");
    kdig.arg(format!("@{}", dot.ip()))
        .args(["-p", &dot.port().to_string(), "+tls"])
        .arg(format!("+tls-ca={}", cert_file.display()))
        .args([
            "+tls-hostname=dns.test",
            "+short",
            "secure.svc.internal",
            "A",
        ]);
    let output = tokio::task::spawn_blocking(move || kdig.output())
        .await
        .unwrap()
        .expect("kdig runs (apt knot-dnsutils)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.trim(), "10.20.0.1");
    muster.stop().await;
}
