//! The one model every source produces and everything after the sources consumes.
//!
//! A [`Snapshot`] is the whole input at one instant: the LoadBalancer Services with
//! their VIPs, ports and endpoints, already joined and validated. It knows nothing about
//! where it came from (manifest files today, the Kubernetes API later) beyond an
//! `origin` string for error messages.
use std::{collections::BTreeMap, fmt, net::IpAddr};

/// Every LoadBalancer Service the source knows about, keyed by namespace/name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Services by reference; iteration order is the [`ServiceRef`] order.
    pub services: BTreeMap<ServiceRef, Service>,
}

/// A Service's identity: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// Namespace (`default` when the manifest leaves it out, as `kubectl apply` does).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceRef {
    /// Builds a reference from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A `type: LoadBalancer` Service with its endpoints joined in.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    /// Load-balancer addresses: every `status.loadBalancer.ingress[].ip`, else
    /// `spec.loadBalancerIP`. Empty while the address is pending allocation.
    /// IPv4 only for now: IPv6 VIPs are reported and left out.
    pub vips: Vec<IpAddr>,
    /// `spec.externalTrafficPolicy`.
    pub traffic_policy: TrafficPolicy,
    /// `spec.ports` that xlb can serve (TCP and UDP), in manifest order.
    pub ports: Vec<ServicePort>,
    /// Where the object came from (a file path), for error messages.
    pub origin: String,
}

/// `spec.externalTrafficPolicy`: which endpoints traffic arriving at a node may reach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TrafficPolicy {
    /// Any ready endpoint in the cluster (the Kubernetes default).
    #[default]
    Cluster,
    /// Only endpoints on the receiving node; the client address is preserved and a
    /// node without one must not attract the traffic.
    Local,
}

/// One `spec.ports[]` entry with the endpoints that serve it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// Port name; `""` for the single unnamed port Kubernetes allows.
    pub name: String,
    /// The port clients connect to on the VIP.
    pub port: u16,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Endpoints from every EndpointSlice of the Service whose port matches this one by
    /// name and protocol, in slice order; not yet filtered by readiness.
    pub endpoints: Vec<Endpoint>,
}

/// A transport protocol xlb balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The Kubernetes spelling: `"TCP"` or `"UDP"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One address of an EndpointSlice endpoint, at the slice port matching a Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod address.
    pub addr: IpAddr,
    /// Target port, from the EndpointSlice's port (not from the Service's `targetPort`).
    pub port: u16,
    /// `conditions.ready` (nil means true, per the EndpointSlice API).
    pub ready: bool,
    /// `conditions.serving` (nil means the same as `ready`).
    pub serving: bool,
    /// `conditions.terminating` (nil means false).
    pub terminating: bool,
    /// `nodeName`: the node hosting the endpoint, if the slice says.
    pub node_name: Option<String>,
}

/// What sort of mistake a [`ConfigError`] is; its label is used in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The directory or a file could not be read.
    Io,
    /// Syntax error, or the object does not deserialise into its Kubernetes type.
    Parse,
    /// A required field (apiVersion, kind, metadata.name, a label) is missing.
    MissingField,
    /// A field holds a value Kubernetes would reject.
    InvalidValue,
    /// An address that is not an IP address.
    InvalidIp,
    /// An IP family xlb does not handle yet (IPv6).
    UnsupportedIpFamily,
    /// A protocol other than TCP or UDP (SCTP).
    UnsupportedProtocol,
    /// An EndpointSlice `addressType` other than IPv4.
    UnsupportedAddressType,
    /// An EndpointSlice port whose name matches no port of its Service.
    UnknownPortName,
    /// The same kind/namespace/name defined twice.
    DuplicateObject,
    /// Two Services claim one VIP:port/protocol.
    VipConflict,
}

impl ErrorKind {
    /// Short snake_case label, e.g. for `xlb_config_errors_total{kind}`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::Parse => "parse",
            ErrorKind::MissingField => "missing_field",
            ErrorKind::InvalidValue => "invalid_value",
            ErrorKind::InvalidIp => "invalid_ip",
            ErrorKind::UnsupportedIpFamily => "unsupported_ip_family",
            ErrorKind::UnsupportedProtocol => "unsupported_protocol",
            ErrorKind::UnsupportedAddressType => "unsupported_address_type",
            ErrorKind::UnknownPortName => "unknown_port_name",
            ErrorKind::DuplicateObject => "duplicate_object",
            ErrorKind::VipConflict => "vip_conflict",
        }
    }
}

/// One bad object or field, reported once: file, object, field, message.
///
/// The offending part is skipped (or its last good version kept); everything else keeps
/// working. `object` and `field` are empty when the error concerns a whole file.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub struct ConfigError {
    /// File (or other source) the object came from.
    pub origin: String,
    /// The object, e.g. `Service default/web`, or `document 2` when it has no name.
    pub object: String,
    /// Field path inside the object, e.g. `spec.ports[1].protocol`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// Category, see [`ConfigError::kind`].
    pub kind: ErrorKind,
}

impl ConfigError {
    /// The metrics label of this error's category ("parse", "invalid_ip", ...).
    pub fn kind(&self) -> &'static str {
        self.kind.as_str()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.origin)?;
        for part in [&self.object, &self.field] {
            if !part.is_empty() {
                write!(f, "{part}: ")?;
            }
        }
        f.write_str(&self.message)
    }
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn config_error_names_file_object_and_field() {
        let e = ConfigError {
            origin: "/etc/xlb/web.yaml".into(),
            object: "Service default/web".into(),
            field: "spec.ports[1].protocol".into(),
            message: "SCTP is not supported".into(),
            kind: ErrorKind::UnsupportedProtocol,
        };
        assert_eq!(
            e.to_string(),
            "/etc/xlb/web.yaml: Service default/web: spec.ports[1].protocol: SCTP is not supported"
        );
        assert_eq!(e.kind(), "unsupported_protocol");
    }

    #[test]
    fn file_level_error_omits_empty_parts() {
        let e = ConfigError {
            origin: "bad.yaml".into(),
            object: String::new(),
            field: String::new(),
            message: "cannot read".into(),
            kind: ErrorKind::Io,
        };
        assert_eq!(e.to_string(), "bad.yaml: cannot read");
    }

    #[test]
    fn service_ref_displays_as_namespace_slash_name() {
        assert_eq!(ServiceRef::new("demo", "web").to_string(), "demo/web");
        assert_eq!(Protocol::Udp.as_str(), "UDP");
    }
}
