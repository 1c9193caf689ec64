//! `xlb.dev/v1alpha1 StaticService`: a VIP in front of machines named by address, with
//! no Kubernetes involved (the kube-apiserver VIP a cluster needs before it exists, or
//! an ingress controller's node ports), as HAProxy + Keepalived provide it today.
//!
//! ```yaml
//! apiVersion: xlb.dev/v1alpha1
//! kind: StaticService
//! metadata: {name: kube-apiserver, namespace: kube-system}
//! spec:
//!   addresses: [10.0.0.100]
//!   ports:
//!   - {name: https, port: 6443, backends: ["10.0.0.11:6443", "10.0.0.12:6443"]}
//!   healthCheck: {type: HTTPS, path: /readyz, interval: 2s, timeout: 1s, rise: 2, fall: 3}
//!   forwarding: SNAT
//! ```
//!
//! It becomes a LoadBalancer [`model::Service`] with Cluster policy whose endpoints
//! are the backends (no `nodeName`; `ready` is the health check's verdict, joined
//! in by the source) and whose [`model::Static`] says how to reach and check them.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{Cx, Invalid, addresses};
use crate::model::{
    self, CheckKind, Endpoint, ErrorKind, Forwarding, HealthCheck, ServicePort, ServiceType,
    TrafficPolicy,
};

/// Defaults of an unset health check field: HAProxy's (`inter 2s`, `rise 2`,
/// `fall 3`; the timeout defaults to the interval there, capped here at 1 s).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
/// Bounds of intervals and timeouts: below 10 ms checks would load the backends more
/// than the traffic; above an hour a dead backend would never be noticed.
const MIN_PERIOD: Duration = Duration::from_millis(10);
const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// The object as written.
#[derive(Deserialize)]
pub(super) struct StaticServiceDoc {
    #[serde(default)]
    metadata: ObjectMeta,
    spec: crate::crd::StaticServiceSpec,
}

/// Validates a StaticService. Anything wrong in the addresses, the forwarding mode
/// or the health check invalidates the object (its last good version is kept: a VIP
/// in front of the API servers must not change meaning because of a typo); a bad
/// port or backend is reported and skipped alone.
pub(super) fn static_service(
    cx: &mut Cx<'_>,
    doc: StaticServiceDoc,
) -> Result<model::Service, Invalid> {
    let spec = doc.spec;
    let mut invalid = false;
    let candidates = spec
        .addresses
        .into_iter()
        .enumerate()
        .map(|(i, a)| (format!("spec.addresses[{i}]"), a))
        .collect();
    let vips = addresses(cx, candidates, "address", &mut invalid);
    if vips.is_empty() && !invalid {
        cx.error(
            "spec.addresses",
            ErrorKind::MissingField,
            "at least one IPv4 address is needed",
        );
        invalid = true;
    }
    let forwarding = match spec.forwarding.as_deref() {
        None | Some("SNAT") => Forwarding::Snat,
        Some("DSR") => Forwarding::Dsr,
        Some(other) => {
            let message = format!("unknown forwarding {other:?} (SNAT, DSR)");
            cx.error("spec.forwarding", ErrorKind::InvalidValue, message);
            invalid = true;
            Forwarding::Snat
        }
    };
    let health_check = match spec.health_check.map(|c| check(cx, c)).transpose() {
        Ok(c) => c,
        Err(Invalid) => {
            invalid = true;
            None
        }
    };
    let mut ports: Vec<ServicePort> = Vec::new();
    for (i, p) in spec.ports.into_iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let (Some(port), Some(protocol)) = (
            cx.port(&format!("{field}.port"), p.port),
            cx.protocol(&format!("{field}.protocol"), p.protocol.as_deref(), false),
        ) else {
            continue;
        };
        if let Some(other) = ports
            .iter()
            .find(|q| q.port == port && q.protocol == protocol)
        {
            let message = format!(
                "{port}/{protocol} is already spec.ports[{}]; port skipped",
                other.index
            );
            cx.error(format!("{field}.port"), ErrorKind::InvalidValue, message);
            continue;
        }
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for (j, text) in p.backends.iter().enumerate() {
            let field = format!("{field}.backends[{j}]");
            let Ok(sa) = text.trim().parse::<SocketAddr>() else {
                let message = format!("{text:?} is not address:port (e.g. 10.0.0.11:6443)");
                cx.error(field, ErrorKind::InvalidValue, message);
                continue;
            };
            if sa.is_ipv6() {
                let message = format!("IPv6 not supported yet; backend {text} skipped");
                cx.error(field, ErrorKind::UnsupportedIpFamily, message);
                continue;
            }
            if sa.port() == 0 {
                cx.error(field, ErrorKind::InvalidValue, "port 0 is not a port");
                continue;
            }
            if endpoints
                .iter()
                .any(|e| e.addr == sa.ip() && e.port == sa.port())
            {
                continue;
            }
            endpoints.push(Endpoint {
                addr: sa.ip(),
                port: sa.port(),
                ready: true,
                serving: true,
                terminating: false,
                node_name: None,
            });
        }
        ports.push(ServicePort {
            index: i,
            name: p.name,
            port,
            node_port: None,
            protocol,
            endpoints,
        });
    }
    if invalid {
        return Err(Invalid);
    }
    let created = doc
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second());
    Ok(model::Service {
        service_type: ServiceType::LoadBalancer,
        vips,
        external_ips: Vec::new(),
        traffic_policy: TrafficPolicy::Cluster,
        source_ranges: Vec::new(),
        affinity_timeout: None,
        health_check_node_port: None,
        ports,
        created,
        labels: doc.metadata.labels.unwrap_or_default(),
        sharing_key: None,
        selector: BTreeMap::new(),
        address_request: None,
        static_service: Some(model::Static {
            forwarding,
            health_check,
        }),
        origin: cx.origin.to_string(),
    })
}

/// Validates `spec.healthCheck`.
fn check(cx: &mut Cx<'_>, c: crate::crd::StaticHealthCheck) -> Result<HealthCheck, Invalid> {
    let f = "spec.healthCheck";
    let path = |cx: &mut Cx<'_>, path: Option<String>| match path {
        None => Ok("/".to_string()),
        Some(p)
            if p.starts_with('/') && !p.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Ok(p)
        }
        Some(p) => {
            let message = format!("{p:?} is not a request path (starts with '/', no spaces)");
            cx.error(format!("{f}.path"), ErrorKind::InvalidValue, message);
            Err(Invalid)
        }
    };
    let kind = match c.kind.as_str() {
        "TCP" if c.path.is_some() => {
            cx.error(
                format!("{f}.path"),
                ErrorKind::InvalidValue,
                "a TCP check has no path (use type HTTP or HTTPS)",
            );
            return Err(Invalid);
        }
        "TCP" => CheckKind::Tcp,
        "HTTP" => CheckKind::Http {
            path: path(cx, c.path)?,
        },
        "HTTPS" => CheckKind::Https {
            path: path(cx, c.path)?,
        },
        other => {
            let message = format!("unknown check type {other:?} (TCP, HTTP, HTTPS)");
            cx.error(format!("{f}.type"), ErrorKind::InvalidValue, message);
            return Err(Invalid);
        }
    };
    let port = match c.port {
        None => None,
        Some(p) => Some(cx.port(&format!("{f}.port"), p).ok_or(Invalid)?),
    };
    let interval = period(cx, &format!("{f}.interval"), c.interval, DEFAULT_INTERVAL)?;
    let timeout = period(
        cx,
        &format!("{f}.timeout"),
        c.timeout,
        DEFAULT_TIMEOUT.min(interval),
    )?;
    if timeout > interval {
        let message = format!(
            "timeout {timeout:?} is longer than the interval {interval:?}: checks would overlap"
        );
        cx.error(format!("{f}.timeout"), ErrorKind::InvalidValue, message);
        return Err(Invalid);
    }
    let count = |cx: &mut Cx<'_>, name: &str, v: Option<u32>, default: u32| match v {
        None => Ok(default),
        Some(n) if (1..=100).contains(&n) => Ok(n),
        Some(n) => {
            let message = format!("{n} is not in 1-100");
            cx.error(format!("{f}.{name}"), ErrorKind::InvalidValue, message);
            Err(Invalid)
        }
    };
    Ok(HealthCheck {
        kind,
        port,
        interval,
        timeout,
        rise: count(cx, "rise", c.rise, DEFAULT_RISE)?,
        fall: count(cx, "fall", c.fall, DEFAULT_FALL)?,
    })
}

/// A duration written as Go and Kubernetes write them in this place (`500ms`, `2s`,
/// `1m`), within [`MIN_PERIOD`]..=[`MAX_PERIOD`]; `default` when unset.
fn period(
    cx: &mut Cx<'_>,
    field: &str,
    text: Option<String>,
    default: Duration,
) -> Result<Duration, Invalid> {
    let Some(text) = text else {
        return Ok(default);
    };
    let parsed = crate::duration::parse(text.trim());
    match parsed {
        Some(d) if (MIN_PERIOD..=MAX_PERIOD).contains(&d) => Ok(d),
        Some(_) => {
            let message = format!("{text:?} is not between 10ms and 1h");
            cx.error(field, ErrorKind::InvalidValue, message);
            Err(Invalid)
        }
        None => {
            let message = format!("{text:?} is not a duration (e.g. 500ms, 2s, 1m)");
            cx.error(field, ErrorKind::InvalidValue, message);
            Err(Invalid)
        }
    }
}
