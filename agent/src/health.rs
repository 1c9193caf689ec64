//! `spec.healthCheckNodePort` servers, as kube-proxy runs them for LoadBalancer
//! Services with externalTrafficPolicy Local: `GET` on the port answers 200 with the
//! number of local endpoints while this node has some, 503 otherwise, so an external
//! load balancer sends traffic only to nodes that can serve it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{desired::HealthCheck, model::ServiceRef};

/// What one port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Report {
    service: ServiceRef,
    local_endpoints: usize,
}

type Shared = Arc<RwLock<Report>>;

/// The running health-check servers, one per port.
#[derive(Default)]
pub struct HealthServers {
    servers: BTreeMap<u16, (Shared, JoinHandle<()>)>,
    /// Ports another process held when xlb wanted them (kube-proxy serves every
    /// `healthCheckNodePort` itself): left to it for as long as they are wanted, so
    /// the two never take turns on a port; reported once.
    held_elsewhere: BTreeSet<u16>,
}

impl HealthServers {
    /// Ports left to another process (see [`HealthServers::apply`]).
    pub fn held_elsewhere(&self) -> &BTreeSet<u16> {
        &self.held_elsewhere
    }

    /// Starts, updates and stops servers to match `checks`. A port another process
    /// already holds (`EADDRINUSE`: kube-proxy next to xlb) is left to it, reported
    /// once, and not tried again while it stays wanted; other bind failures are
    /// reported and retried on the next call.
    pub async fn apply(&mut self, checks: &[HealthCheck]) {
        let wanted: BTreeMap<u16, &HealthCheck> = checks.iter().map(|c| (c.port, c)).collect();
        self.held_elsewhere.retain(|p| wanted.contains_key(p));
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port) && !task.is_finished();
            if !keep {
                task.abort();
                info!(port, "health check server stopped");
            }
            keep
        });
        for (port, check) in wanted {
            let report = Report {
                service: check.service.clone(),
                local_endpoints: check.local_endpoints,
            };
            if let Some((shared, _)) = self.servers.get(&port) {
                if let Ok(mut r) = shared.write() {
                    *r = report;
                }
                continue;
            }
            if self.held_elsewhere.contains(&port) {
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    info!(port, service = %check.service, "health check port already served by another process (kube-proxy serves every healthCheckNodePort); leaving it to that one");
                    self.held_elsewhere.insert(port);
                    continue;
                }
                Err(e) => {
                    warn!(port, service = %check.service, error = %e, "health check port unavailable");
                    continue;
                }
            };
            let shared: Shared = Arc::new(RwLock::new(report));
            let app = Router::new()
                .fallback(get(answer))
                .with_state(shared.clone());
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(port, error = %e, "health check server failed");
                }
            });
            info!(port, service = %check.service, "health check server started");
            self.servers.insert(port, (shared, task));
        }
    }
}

async fn answer(State(r): State<Shared>) -> impl IntoResponse {
    let (service, n) = match r.read() {
        Ok(r) => (r.service.clone(), r.local_endpoints),
        Err(_) => return (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
    };
    let code = if n > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // The body kube-proxy serves (pkg/proxy/healthcheck), encoded (and so escaped)
    // by serde_json.
    let body = serde_json::json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": n,
    });
    (code, format!("{body}\n"))
}
