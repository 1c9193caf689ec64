//! The StaticService health checker against real servers: TCP, HTTP (status codes)
//! and HTTPS (a self-signed certificate, as API servers present), with `rise` and
//! `fall` counted. Everything runs inside a network namespace made for the test, on
//! its loopback. Needs root.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use xlb::{
    checks::{CheckMetrics, Checker, Verdict},
    model::{CheckKind, HealthCheck, Probe},
};
use xlb_lab::netns::Netns;

/// Check interval and timeout: short, but far above a loopback exchange even on a
/// loaded machine.
const TICK: Duration = Duration::from_millis(100);

fn probe(target: SocketAddr, kind: CheckKind, rise: u32, fall: u32) -> Probe {
    HealthCheck {
        kind,
        port: None,
        interval: TICK,
        timeout: TICK,
        rise,
        fall,
    }
    .probe(target)
}

/// Serves HTTP on `listener`: every request is answered with the status in `status`
/// (read per request), over TLS when `tls` is given.
async fn serve(
    listener: TcpListener,
    status: Arc<AtomicU16>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (status, tls) = (status.clone(), tls.clone());
        tokio::spawn(async move {
            let code = status.load(Ordering::SeqCst);
            match tls {
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(stream).await {
                        let _ = answer(s, code).await;
                    }
                }
                None => {
                    let _ = answer(stream, code).await;
                }
            }
        });
    }
}

async fn answer<S>(mut s: S, code: u16) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let reply = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(reply.as_bytes()).await?;
    s.shutdown().await
}

/// The next verdict change, or an error after `within`.
async fn next(rx: &mut mpsc::Receiver<Verdict>, within: Duration) -> Result<Verdict> {
    tokio::time::timeout(within, rx.recv())
        .await
        .context("no verdict change in time")?
        .context("checker gone")
}

fn self_signed_acceptor() -> Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls::{
        self,
        pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    };
    let cert = rcgen::generate_simple_self_signed(vec!["apiserver.invalid".into()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[test]
fn checks_follow_servers_with_rise_and_fall() -> Result<()> {
    let ns = Netns::create(&format!("xlbck-{}", std::process::id()))?;
    ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(scenario())
    })
}

async fn scenario() -> Result<()> {
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let https = TcpListener::bind("127.0.0.1:0").await?;
    let (http_at, https_at) = (http.local_addr()?, https.local_addr()?);
    let http_status = Arc::new(AtomicU16::new(200));
    let https_status = Arc::new(AtomicU16::new(200));
    tokio::spawn(serve(http, http_status.clone(), None));
    tokio::spawn(serve(
        https,
        https_status.clone(),
        Some(self_signed_acceptor()?),
    ));
    // Nothing listens on this one: connection refused.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()?
    };
    let path = || "/readyz".to_string();
    let p_http = probe(http_at, CheckKind::Http { path: path() }, 2, 3);
    let p_https = probe(https_at, CheckKind::Https { path: path() }, 1, 1);
    let p_tcp = probe(http_at, CheckKind::Tcp, 1, 1);
    let p_closed = probe(closed, CheckKind::Tcp, 1, 2);

    let metrics = Arc::new(CheckMetrics::default());
    let (mut checker, mut rx) = Checker::new(metrics);
    let all = BTreeSet::from([
        p_http.clone(),
        p_https.clone(),
        p_tcp.clone(),
        p_closed.clone(),
    ]);
    checker.run(&all);
    // Only the refused one fails (after `fall` = 2 failures); the others pass, HTTPS
    // with a certificate nobody can verify.
    let v = next(&mut rx, Duration::from_secs(5)).await?;
    assert_eq!(v, (p_closed.clone(), false));
    assert!(checker.record(v));
    assert!(
        tokio::time::timeout(TICK * 10, rx.recv()).await.is_err(),
        "no other verdict changes"
    );

    // HTTP 503: out after fall = 3; 200 again: back after rise = 2. A 3xx passes.
    http_status.store(503, Ordering::SeqCst);
    assert_eq!(
        next(&mut rx, Duration::from_secs(5)).await?,
        (p_http.clone(), false)
    );
    http_status.store(302, Ordering::SeqCst);
    assert_eq!(
        next(&mut rx, Duration::from_secs(5)).await?,
        (p_http.clone(), true)
    );
    // HTTPS answering 500.
    https_status.store(500, Ordering::SeqCst);
    assert_eq!(
        next(&mut rx, Duration::from_secs(5)).await?,
        (p_https.clone(), false)
    );
    https_status.store(200, Ordering::SeqCst);
    assert_eq!(
        next(&mut rx, Duration::from_secs(5)).await?,
        (p_https.clone(), true)
    );

    // Stopping a probe forgets its verdict; its late messages are ignored.
    let fewer = BTreeSet::from([p_http.clone(), p_https.clone(), p_tcp.clone()]);
    assert!(
        checker.run(&fewer),
        "the refused probe's verdict is dropped"
    );
    assert!(!checker.verdicts().contains_key(&p_closed));
    assert!(!checker.record((p_closed, false)));
    Ok(())
}
