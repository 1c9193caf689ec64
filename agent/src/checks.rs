//! Active health checks of StaticService backends (TCP connect, HTTP and HTTPS GET),
//! HAProxy's `check inter .. rise .. fall ..`: a backend leaves the Maglev table after
//! `fall` consecutive failures and comes back after `rise` consecutive passes.
//!
//! Every node checks every backend itself (as every HAProxy of a Keepalived pair
//! does), so nothing here depends on Kubernetes or on the other nodes. Verdicts go
//! to the source ([`crate::source::manifests::ManifestSource::set_health`]), which
//! joins them into the model as the endpoints' readiness, the way the kubelet's
//! readiness probes reach a Service through its EndpointSlices. A backend is taken
//! as healthy until checked otherwise, so a restarted agent serves at once.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use http_body_util::Empty;
use hyper::{Request, body::Bytes, header};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};
use tokio_rustls::rustls::{
    self, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tracing::{info, warn};

use crate::model::{CheckKind, Probe, Snapshot};

/// Why one check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No answer within the check's timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The TCP connection was refused or could not be made.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The TLS handshake failed (HTTPS).
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (a path the HTTP library refuses).
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The server answered with a status other than 2xx or 3xx.
    #[error("HTTP status {0}")]
    Status(u16),
}

/// Health check metrics (`xlb_health_check_*`).
#[derive(Debug, Default)]
pub struct CheckMetrics {
    /// 1 while the probe's target passes, 0 while it is out
    /// (`xlb_health_check_up{target,check}`).
    pub up: Family<Vec<(String, String)>, Gauge>,
    /// Failed checks (`xlb_health_check_failures_total{target,check}`).
    pub failures: Family<Vec<(String, String)>, Counter>,
}

impl CheckMetrics {
    /// Registers the metrics.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "xlb_health_check_up",
            "StaticService backend health: 1 in service, 0 taken out by its checks",
            self.up.clone(),
        );
        registry.register(
            "xlb_health_check_failures",
            "Failed StaticService backend health checks",
            self.failures.clone(),
        );
    }
}

/// The metric labels of a probe.
fn labels(p: &Probe) -> Vec<(String, String)> {
    let check = match &p.check.kind {
        CheckKind::Tcp => "tcp".to_string(),
        CheckKind::Http { path } => format!("http {path}"),
        CheckKind::Https { path } => format!("https {path}"),
    };
    vec![
        ("target".into(), p.target.to_string()),
        ("check".into(), check),
    ]
}

/// Every probe the StaticServices of `snapshot` ask for: one per distinct backend
/// address and check.
pub fn probes(snapshot: &Snapshot) -> BTreeSet<Probe> {
    snapshot
        .services
        .values()
        .filter_map(|s| Some((s, s.static_service.as_ref()?.health_check.as_ref()?)))
        .flat_map(|(s, check)| {
            s.ports
                .iter()
                .flat_map(|p| &p.endpoints)
                .map(|e| check.probe(SocketAddr::new(e.addr, e.port)))
        })
        .collect()
}

/// A verdict change: the probe and whether its target is now healthy.
pub type Verdict = (Probe, bool);

/// The running probes, one task each, and their current verdicts.
pub struct Checker {
    tasks: BTreeMap<Probe, JoinHandle<()>>,
    verdicts: BTreeMap<Probe, bool>,
    tx: mpsc::Sender<Verdict>,
    tls: Arc<rustls::ClientConfig>,
    metrics: Arc<CheckMetrics>,
}

impl Checker {
    /// A checker with no probes, and the channel its verdict changes arrive on.
    pub fn new(metrics: Arc<CheckMetrics>) -> (Self, mpsc::Receiver<Verdict>) {
        let (tx, rx) = mpsc::channel(256);
        let checker = Checker {
            tasks: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            tx,
            tls: Arc::new(tls_config()),
            metrics,
        };
        (checker, rx)
    }

    /// Runs exactly `wanted`: starts the new probes, stops the others and forgets
    /// their verdicts (a backend added again starts healthy, as at start-up).
    /// Returns whether a verdict was dropped.
    pub fn run(&mut self, wanted: &BTreeSet<Probe>) -> bool {
        let before = self.verdicts.len();
        self.tasks.retain(|p, task| {
            let keep = wanted.contains(p);
            if !keep {
                task.abort();
                self.metrics.up.remove(&labels(p));
            }
            keep
        });
        self.verdicts.retain(|p, _| wanted.contains(p));
        for p in wanted {
            if !self.tasks.contains_key(p) {
                self.metrics.up.get_or_create(&labels(p)).set(1);
                let task = tokio::spawn(probe_loop(
                    p.clone(),
                    self.tx.clone(),
                    self.tls.clone(),
                    self.metrics.clone(),
                ));
                self.tasks.insert(p.clone(), task);
            }
        }
        self.verdicts.len() != before
    }

    /// Records a verdict change from the channel; false if it is stale (the probe
    /// was stopped since).
    pub fn record(&mut self, (probe, healthy): Verdict) -> bool {
        if !self.tasks.contains_key(&probe) {
            return false;
        }
        self.metrics
            .up
            .get_or_create(&labels(&probe))
            .set(i64::from(healthy));
        self.verdicts.insert(probe, healthy);
        true
    }

    /// Every probe's verdict so far (a probe not in it has not failed yet).
    pub fn verdicts(&self) -> &BTreeMap<Probe, bool> {
        &self.verdicts
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

/// Checks `probe` every interval forever, sending each change of verdict.
async fn probe_loop(
    probe: Probe,
    tx: mpsc::Sender<Verdict>,
    tls: Arc<rustls::ClientConfig>,
    metrics: Arc<CheckMetrics>,
) {
    let check = &probe.check;
    let mut tick = tokio::time::interval(check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut healthy, mut streak) = (true, 0u32);
    loop {
        tick.tick().await;
        let result = match tokio::time::timeout(check.timeout, attempt(&probe, &tls)).await {
            Ok(r) => r,
            Err(_) => Err(CheckError::Timeout(check.timeout)),
        };
        if let Err(e) = &result {
            metrics.failures.get_or_create(&labels(&probe)).inc();
            tracing::debug!(target = %probe.target, error = %e, "health check failed");
        }
        // A streak counts results that disagree with the current verdict.
        if result.is_ok() == healthy {
            streak = 0;
            continue;
        }
        streak += 1;
        let needed = if healthy { check.fall } else { check.rise };
        if streak < needed {
            continue;
        }
        healthy = !healthy;
        streak = 0;
        match &result {
            Ok(()) => {
                info!(target = %probe.target, rise = check.rise, "backend passes its health check again: back in service")
            }
            Err(e) => {
                warn!(target = %probe.target, fall = check.fall, error = %e, "backend failed its health check: out of service")
            }
        }
        if tx.send((probe.clone(), healthy)).await.is_err() {
            return;
        }
    }
}

/// One check of `probe`.
async fn attempt(probe: &Probe, tls: &Arc<rustls::ClientConfig>) -> Result<(), CheckError> {
    let stream = TcpStream::connect(probe.target)
        .await
        .map_err(CheckError::Connect)?;
    match &probe.check.kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Http { path } => get(stream, probe.target, path).await,
        CheckKind::Https { path } => {
            let name = ServerName::IpAddress(probe.target.ip().into());
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, stream)
                .await
                .map_err(CheckError::Tls)?;
            get(stream, probe.target, path).await
        }
    }
}

/// `GET path` over `io`: passes on a 2xx or 3xx status (HAProxy's `option httpchk`).
async fn get<T>(io: T, target: SocketAddr, path: &str) -> Result<(), CheckError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let request = Request::get(path)
        .header(header::HOST, target.to_string())
        .header(header::USER_AGENT, "xlb-health-check")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    // The connection is driven here, not spawned, so that the caller's timeout
    // cancels both. It may finish first (the server closed after answering): the
    // answer is then already waiting on the request side.
    let send = sender.send_request(request);
    tokio::pin!(send);
    tokio::pin!(conn);
    let response = tokio::select! {
        biased;
        r = &mut send => r?,
        r = &mut conn => {
            r?;
            (&mut send).await?
        }
    };
    let status = response.status().as_u16();
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(CheckError::Status(status))
    }
}

/// TLS for HTTPS checks: any certificate is accepted (the check asks whether the
/// server is up, not who it is, like HAProxy's `check-ssl verify none`; API servers
/// commonly serve a cluster-CA certificate the node may not have), but the
/// handshake's signatures are still verified with the provider's algorithms.
fn tls_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCertificate(provider.clone()));
    // The ring provider supports the default protocol versions; a failure would be
    // a build configuration error.
    #[allow(clippy::expect_used)]
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth()
}

/// Accepts any server certificate (see [`tls_config`]).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
