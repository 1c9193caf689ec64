//! The one conversion from Kubernetes-shaped objects to the model's parts, shared by
//! every source (the manifest directory now, the API server next): a document (YAML
//! or JSON, as `serde_json::Value`) is identified, validated field by field and turned
//! into an `Object`, or refused with [`ConfigError`]s naming object and field, in
//! which case its last good version is used. Which objects exist and where they came
//! from is the source's business; joining them into a [`crate::model::Snapshot`] is
//! [`super::assemble`]'s.
//!
//! Kinds: `v1 Service` (LoadBalancer and NodePort), `discovery.k8s.io/v1
//! EndpointSlice`, `v1 Node`, `v1 Namespace` (labels), `v1 Secret` (the `password`
//! key, for BGPPeer `passwordSecret`), and `xlb.dev/v1alpha1` L2Announcement,
//! AddressPool, StaticService (see `static_service`), BGPPeer, BGPAnnouncement and
//! BFDProfile.
use std::{
    net::{IpAddr, Ipv4Addr},
    ops::RangeInclusive,
};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

use crate::model::{
    self, ConfigError, DEFAULT_AFFINITY_TIMEOUT, ErrorKind, MAX_AFFINITY_TIMEOUT, Protocol,
    ServiceType, TrafficPolicy,
};

mod static_service;

/// The EndpointSlice label naming the Service it belongs to (set by the EndpointSlice
/// controller; see the Kubernetes "EndpointSlices" concept page, "Ownership").
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// MetalLB's request for specific load-balancer addresses (comma-separated, one per
/// family), current spelling (MetalLB "Usage": "Requesting specific IPs").
const METALLB_IPS: &str = "metallb.io/loadBalancerIPs";
/// xlb's own spelling of the same request.
const XLB_IPS: &str = "xlb.dev/loadBalancerIPs";
/// The pool a Service asks its address from: xlb's spelling, then MetalLB's two.
const POOL_ANNOTATIONS: [&str; 3] = [
    "xlb.dev/address-pool",
    "metallb.io/address-pool",
    "metallb.universe.tf/address-pool",
];
/// The key under which Services may share one address: xlb's, then MetalLB's two.
const SHARING_ANNOTATIONS: [&str; 3] = [
    "xlb.dev/allow-shared-ip",
    "metallb.io/allow-shared-ip",
    "metallb.universe.tf/allow-shared-ip",
];
/// `spec.loadBalancerClass` that names xlb; Services of any other class are left to
/// their implementation (no class: the cluster's default, served).
pub const LOAD_BALANCER_CLASS: &str = "xlb.dev/xlb";
/// The same, as MetalLB spelled it before v0.14.
const METALLB_IPS_LEGACY: &str = "metallb.universe.tf/loadBalancerIPs";
/// The annotation Kubernetes reads when `spec.loadBalancerSourceRanges` is empty
/// (`v1.AnnotationLoadBalancerSourceRangesKey`, comma-separated CIDRs).
const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

/// A parsed object, kept as the last good version of itself.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Object {
    pub(crate) key: ObjectKey,
    pub(crate) body: Body,
}

/// Identity of an object across loads and files.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ObjectKey {
    pub(crate) kind: Kind,
    pub(crate) namespace: String,
    pub(crate) name: String,
}

impl ObjectKey {
    /// `Service shop/web`; `Node node-a` for cluster-scoped kinds.
    pub(crate) fn label(&self) -> String {
        if self.kind.namespaced() {
            format!("{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        } else {
            format!("{} {}", self.kind.as_str(), self.name)
        }
    }
}

/// The kinds this source understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Service,
    EndpointSlice,
    Node,
    Namespace,
    L2Announcement,
    StaticService,
    AddressPool,
    BgpPeer,
    BgpAnnouncement,
    BfdProfile,
    Secret,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
            Kind::L2Announcement => "L2Announcement",
            Kind::StaticService => "StaticService",
            Kind::AddressPool => "AddressPool",
            Kind::BgpPeer => "BGPPeer",
            Kind::BgpAnnouncement => "BGPAnnouncement",
            Kind::BfdProfile => "BFDProfile",
            Kind::Secret => "Secret",
        }
    }

    /// Nodes and Namespaces are cluster-scoped: their key has an empty namespace.
    pub(crate) fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::Namespace)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Body {
    /// `None` for a Service of a type xlb does not serve (ClusterIP, ExternalName):
    /// ignored, but it still occupies its name.
    Service(Option<Box<model::Service>>),
    Slice(Slice),
    Node(model::Node),
    /// A Namespace's labels, for AddressPool `namespaceSelectors`.
    Namespace(std::collections::BTreeMap<String, String>),
    L2(model::L2Announcement),
    Pool(model::AddressPool),
    BgpPeer(model::BgpPeer),
    BgpAnnouncement(model::BgpAnnouncement),
    BfdProfile(model::BfdProfile),
    /// A Secret's `password` key, as a BGPPeer's `passwordSecret` reads it.
    Secret(SecretKey),
}

/// The `password` key of a Secret. Whether it is usable is only reported when a
/// BGPPeer names the Secret: a namespace holds many Secrets that are not xlb's.
#[derive(Clone, PartialEq)]
pub(crate) enum SecretKey {
    /// No `password` key (in `data` or `stringData`).
    Missing,
    /// A `password` key that cannot be a TCP MD5 key, and why.
    Invalid(&'static str),
    /// The key.
    Key(String),
}

impl std::fmt::Debug for SecretKey {
    // Secrets stay out of logs and debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretKey::Missing => f.write_str("Missing"),
            SecretKey::Invalid(why) => write!(f, "Invalid({why:?})"),
            SecretKey::Key(_) => f.write_str("Key(<redacted>)"),
        }
    }
}

/// A validated IPv4 EndpointSlice, not yet joined to its Service.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Slice {
    pub(crate) service: String,
    pub(crate) ports: Vec<SlicePort>,
    pub(crate) endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SlicePort {
    /// Index in `ports[]`, for error messages.
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) port: u16,
    pub(crate) protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SliceEndpoint {
    pub(crate) addrs: Vec<IpAddr>,
    pub(crate) ready: bool,
    pub(crate) serving: bool,
    pub(crate) terminating: bool,
    pub(crate) node_name: Option<String>,
}

/// One document: identifies it, decodes it, and falls back to its last good version if
/// it is invalid. `None` when it is empty, of an ignored kind, or skipped.
pub(crate) fn parse_object(
    origin: &str,
    position: &str,
    doc: Value,
    last: Option<&[Object]>,
    node_ports: &RangeInclusive<u16>,
    errors: &mut Vec<ConfigError>,
) -> Option<Object> {
    if doc.is_null() {
        return None;
    }
    let mut cx = Cx {
        origin,
        object: position.to_string(),
        node_ports: node_ports.clone(),
        errors,
    };
    let (Some(api_version), Some(kind)) = (
        doc.get("apiVersion").and_then(Value::as_str),
        doc.get("kind").and_then(Value::as_str),
    ) else {
        let field = if doc.get("apiVersion").is_none() {
            "apiVersion"
        } else {
            "kind"
        };
        cx.error(
            field,
            ErrorKind::MissingField,
            "every document needs apiVersion and kind",
        );
        return None;
    };
    let kind = match (api_version, kind) {
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "Node") => Kind::Node,
        ("v1", "Namespace") => Kind::Namespace,
        ("xlb.dev/v1alpha1", "L2Announcement") => Kind::L2Announcement,
        ("xlb.dev/v1alpha1", "AddressPool") => Kind::AddressPool,
        ("xlb.dev/v1alpha1", "StaticService") => Kind::StaticService,
        ("xlb.dev/v1alpha1", "BGPPeer") => Kind::BgpPeer,
        ("xlb.dev/v1alpha1", "BGPAnnouncement") => Kind::BgpAnnouncement,
        ("xlb.dev/v1alpha1", "BFDProfile") => Kind::BfdProfile,
        ("v1", "Secret") => Kind::Secret,
        // Other kinds (ConfigMaps, xlb.dev resources, ...) are not this source's
        // business yet.
        _ => return None,
    };
    let meta = |field: &str| {
        doc.get("metadata")
            .and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let Some(name) = meta("name") else {
        cx.object = format!("{} in {position}", kind.as_str());
        cx.error("metadata.name", ErrorKind::MissingField, "name is required");
        return None;
    };
    let namespace = if kind.namespaced() {
        // Namespaced objects without one land in `default`, as with `kubectl apply`.
        meta("namespace").unwrap_or("default")
    } else {
        // The API server ignores a namespace on cluster-scoped objects.
        ""
    };
    // Names end up in logs, metric labels and JSON: only what the API server accepts.
    if !is_dns_subdomain(name) {
        cx.object = format!("{} {name:?} in {position}", kind.as_str());
        let message = "not a valid name (lowercase letters, digits, '-' and '.', at most 253)";
        cx.error("metadata.name", ErrorKind::InvalidValue, message);
        return None;
    }
    if kind.namespaced() && !is_dns_label(namespace) {
        cx.object = format!("{} {namespace:?}/{name}", kind.as_str());
        let message = "not a valid namespace (lowercase letters, digits and '-', at most 63)";
        cx.error("metadata.namespace", ErrorKind::InvalidValue, message);
        return None;
    }
    let key = ObjectKey {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    cx.object = key.label();
    let decoded = match kind {
        Kind::Service => cx
            .deserialize(doc)
            .and_then(|s| service(&mut cx, s))
            .map(|s| Some(Body::Service(s.map(Box::new)))),
        Kind::EndpointSlice => cx
            .deserialize(doc)
            .and_then(|s| slice(&mut cx, s))
            .map(|s| s.map(Body::Slice)),
        Kind::Node => cx
            .deserialize(doc)
            .and_then(|n| node(&mut cx, &key.name, n))
            .map(|n| Some(Body::Node(n))),
        Kind::Namespace => cx
            .deserialize::<core::Namespace>(doc)
            .map(|n| Some(Body::Namespace(n.metadata.labels.unwrap_or_default()))),
        Kind::AddressPool => cx
            .deserialize(doc)
            .and_then(|p| address_pool(&mut cx, p))
            .map(|p| Some(Body::Pool(p))),
        Kind::L2Announcement => cx
            .deserialize(doc)
            .and_then(|a| l2_announcement(&mut cx, a))
            .map(|a| Some(Body::L2(a))),
        Kind::StaticService => cx
            .deserialize(doc)
            .and_then(|s| static_service::static_service(&mut cx, s))
            .map(|s| Some(Body::Service(Some(Box::new(s))))),
        Kind::BgpPeer => cx
            .deserialize(doc)
            .and_then(|p| bgp_peer(&mut cx, &key.namespace, &key.name, p))
            .map(|p| Some(Body::BgpPeer(p))),
        Kind::BgpAnnouncement => cx
            .deserialize(doc)
            .and_then(|a| bgp_announcement(&mut cx, a))
            .map(|a| Some(Body::BgpAnnouncement(a))),
        Kind::BfdProfile => cx
            .deserialize(doc)
            .and_then(|b| bfd_profile(&mut cx, b))
            .map(|b| Some(Body::BfdProfile(b))),
        Kind::Secret => cx
            .deserialize::<core::Secret>(doc)
            .map(|s| Some(Body::Secret(secret_key(s)))),
    };
    match decoded {
        Ok(body) => body.map(|body| Object { key, body }),
        Err(Invalid) => last?.iter().find(|o| o.key == key).cloned(),
    }
}

/// An RFC 1123 label, as Kubernetes requires of namespaces.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// An RFC 1123 subdomain (dot-separated labels, at most 253 bytes), as Kubernetes
/// requires of most object names.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// An essential part of an object is invalid: its last good version is used instead.
struct Invalid;

/// The object being decoded and where its errors go.
struct Cx<'a> {
    origin: &'a str,
    /// `Service default/web`, or the document's position while it has no name.
    object: String,
    /// The cluster's node port range.
    node_ports: RangeInclusive<u16>,
    errors: &'a mut Vec<ConfigError>,
}

impl Cx<'_> {
    fn error(&mut self, field: impl Into<String>, kind: ErrorKind, message: impl Into<String>) {
        self.errors.push(ConfigError {
            origin: self.origin.to_string(),
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
            kind,
        });
    }

    /// Deserialises into the k8s-openapi type, naming the failing field's path.
    fn deserialize<T: DeserializeOwned>(&mut self, doc: Value) -> Result<T, Invalid> {
        serde_path_to_error::deserialize(doc).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            self.error(field, ErrorKind::Parse, e.into_inner().to_string());
            Invalid
        })
    }

    /// Parses an IP address; `Err` (already reported) if it is not one.
    fn ip(&mut self, field: &str, text: &str) -> Result<IpAddr, ()> {
        text.parse().map_err(|_| {
            self.error(
                field,
                ErrorKind::InvalidIp,
                format!("{text:?} is not an IP address"),
            );
        })
    }

    /// A port number in 1..=65535.
    fn port(&mut self, field: &str, port: i32) -> Option<u16> {
        let p = u16::try_from(port).ok().filter(|p| *p != 0);
        if p.is_none() {
            self.error(
                field,
                ErrorKind::InvalidValue,
                format!("port {port} is not in 1-65535"),
            );
        }
        p
    }

    /// A node port (or health check node port): inside the node port range, as the
    /// API server allocates them, so an object cannot take a well-known port of the
    /// node (ssh, the kubelet, xlb's own metrics).
    fn node_port(&mut self, field: &str, port: i32) -> Option<u16> {
        let p = self.port(field, port)?;
        if !self.node_ports.contains(&p) {
            let (lo, hi) = (self.node_ports.start(), self.node_ports.end());
            self.error(
                field,
                ErrorKind::InvalidValue,
                format!("node port {p} is outside the node port range {lo}-{hi}"),
            );
            return None;
        }
        Some(p)
    }

    /// TCP or UDP, TCP when unset (the Kubernetes default). SCTP is reported unless
    /// `quiet`, unknown values always; both return `None`.
    fn protocol(&mut self, field: &str, protocol: Option<&str>, quiet: bool) -> Option<Protocol> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" if quiet => None,
            "SCTP" => {
                self.error(
                    field,
                    ErrorKind::UnsupportedProtocol,
                    "SCTP is not supported; port skipped",
                );
                None
            }
            other => {
                let message = format!("unknown protocol {other:?} (TCP, UDP); port skipped");
                self.error(field, ErrorKind::InvalidValue, message);
                None
            }
        }
    }
}

/// Validates a Service. `Ok(None)` for a type xlb does not serve (ClusterIP, the
/// default, and ExternalName).
fn service(cx: &mut Cx<'_>, svc: core::Service) -> Result<Option<model::Service>, Invalid> {
    let spec = svc.spec.unwrap_or_default();
    let created = svc
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second());
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    let annotations = svc.metadata.annotations.unwrap_or_default();
    let service_type = match spec.type_.as_deref() {
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("NodePort") => ServiceType::NodePort,
        _ => return Ok(None),
    };
    let lb = service_type == ServiceType::LoadBalancer;
    // Another implementation's Service (KEP-1959): not ours to serve or address.
    if lb
        && spec
            .load_balancer_class
            .as_deref()
            .is_some_and(|c| c != LOAD_BALANCER_CLASS)
    {
        return Ok(None);
    }
    let traffic_policy = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            let message = format!("{other:?} is not Cluster or Local");
            cx.error(
                "spec.externalTrafficPolicy",
                ErrorKind::InvalidValue,
                message,
            );
            return Err(Invalid);
        }
    };
    // Every check runs before giving up, so that one load reports every mistake.
    let mut invalid = false;

    // Load-balancer addresses, first source that has any: `spec.loadBalancerIP`
    // (deprecated, but still what many manifests carry); the `loadBalancerIPs`
    // annotations (xlb's, then MetalLB's two: what a MetalLB user wrote to request
    // an address); else every ingress IP in status, an earlier allocation recovered
    // (see `AddressRequest::from_status`). The request wins over status, so that
    // changing it moves the Service. No address is fine: pending allocation.
    let mut candidates: Vec<(String, String)> = Vec::new();
    let mut from_status = false;
    let mut in_status: Vec<IpAddr> = Vec::new();
    if lb {
        let ingress = svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap_or_default();
        let ingress: Vec<(String, String)> = ingress
            .into_iter()
            .enumerate()
            .filter_map(|(i, ing)| Some((format!("status.loadBalancer.ingress[{i}].ip"), ing.ip?)))
            .collect();
        in_status = ingress
            .iter()
            .filter_map(|(_, ip)| ip.trim().parse().ok())
            .collect();
        candidates.extend(
            spec.load_balancer_ip
                .filter(|ip| !ip.is_empty())
                .map(|ip| ("spec.loadBalancerIP".to_string(), ip)),
        );
        for annotation in [XLB_IPS, METALLB_IPS, METALLB_IPS_LEGACY] {
            if candidates.is_empty() {
                candidates.extend(
                    comma_list(annotations.get(annotation))
                        .map(|ip| (format!("metadata.annotations[{annotation}]"), ip)),
                );
            }
        }
        if candidates.is_empty() && !ingress.is_empty() {
            from_status = true;
            candidates = ingress;
        }
    }
    // Address allocation settles `vips` from the request: keeps the named addresses
    // the sharing rules let it hold, or allocates from a pool (the annotated one).
    let first_annotation = |names: [&str; 3]| {
        names
            .iter()
            .find_map(|n| annotations.get(*n).map(|v| v.trim().to_string()))
            .filter(|v| !v.is_empty())
    };
    let sharing_key = first_annotation(SHARING_ANNOTATIONS);
    // The field without its index: `status.loadBalancer.ingress[0].ip` names the list.
    let named_field = candidates.first().map_or(String::new(), |(f, _)| {
        if from_status {
            "status.loadBalancer.ingress".to_string()
        } else {
            f.clone()
        }
    });
    let vips = addresses(cx, candidates, "VIP", &mut invalid);
    let address_request = lb.then(|| model::AddressRequest {
        pool: first_annotation(POOL_ANNOTATIONS),
        named: vips.clone(),
        named_field,
        families: ip_families(
            cx,
            spec.ip_families.as_deref(),
            spec.ip_family_policy.as_deref(),
        ),
        from_status,
        status: in_status,
    });
    let external = spec
        .external_ips
        .unwrap_or_default()
        .into_iter()
        .enumerate();
    let candidates = external
        .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip))
        .collect();
    let external_ips = addresses(cx, candidates, "external IP", &mut invalid);

    // Only load-balancer addresses are filtered (Kubernetes forbids the field on other
    // types). An invalid range invalidates the whole Service, like Kubernetes'
    // validation does: dropping just that range could leave the list empty, which
    // would open the Service to everyone.
    let mut source_ranges = Vec::new();
    if lb {
        let spec_ranges = spec.load_balancer_source_ranges.unwrap_or_default();
        let ranges: Vec<(String, String)> = if spec_ranges.is_empty() {
            let field = format!("metadata.annotations[{SOURCE_RANGES_ANNOTATION}]");
            comma_list(annotations.get(SOURCE_RANGES_ANNOTATION))
                .map(|r| (field.clone(), r))
                .collect()
        } else {
            let ranges = spec_ranges.into_iter().enumerate();
            ranges
                .map(|(i, r)| (format!("spec.loadBalancerSourceRanges[{i}]"), r))
                .collect()
        };
        for (field, text) in ranges {
            match text.trim().parse::<ipnet::IpNet>() {
                // `10.1.2.3/8` means 10.0.0.0/8, as Go's net.ParseCIDR reads it.
                Ok(net) if !source_ranges.contains(&net.trunc()) => {
                    source_ranges.push(net.trunc());
                }
                Ok(_) => {}
                Err(_) => {
                    let message = format!(
                        "{text:?} is not a CIDR (e.g. 192.0.2.0/24); the Service keeps its \
                         last good version, or is not served, rather than be opened wider"
                    );
                    cx.error(field, ErrorKind::InvalidValue, message);
                    invalid = true;
                }
            }
        }
    }

    let affinity_timeout = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds);
            match timeout.map(u32::try_from) {
                None => Some(DEFAULT_AFFINITY_TIMEOUT),
                Some(Ok(t)) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => Some(t),
                Some(_) => {
                    let message = format!(
                        "{} is not in 1-{MAX_AFFINITY_TIMEOUT} seconds",
                        timeout.unwrap_or_default()
                    );
                    let field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
                    cx.error(field, ErrorKind::InvalidValue, message);
                    invalid = true;
                    None
                }
            }
        }
        Some(other) => {
            let message = format!("{other:?} is not None or ClientIP");
            cx.error("spec.sessionAffinity", ErrorKind::InvalidValue, message);
            invalid = true;
            None
        }
    };

    // 0 means "allocate one" in the API, which nothing does without an API server.
    let health_check_node_port = match spec.health_check_node_port.filter(|p| *p != 0) {
        None => None,
        Some(p) if lb && traffic_policy == TrafficPolicy::Local => {
            cx.node_port("spec.healthCheckNodePort", p)
        }
        Some(_) => {
            cx.error(
                "spec.healthCheckNodePort",
                ErrorKind::InvalidValue,
                "only type LoadBalancer with externalTrafficPolicy Local has a health \
                 check node port; ignored",
            );
            None
        }
    };

    if invalid {
        return Err(Invalid);
    }

    let mut ports: Vec<model::ServicePort> = Vec::new();
    for (i, p) in spec.ports.unwrap_or_default().into_iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let Some(protocol) = cx.protocol(&field("protocol"), p.protocol.as_deref(), false) else {
            continue;
        };
        let Some(port) = cx.port(&field("port"), p.port) else {
            continue;
        };
        let name = p.name.unwrap_or_default();
        // Kubernetes rejects these; here they would make one Service conflict with itself.
        if ports
            .iter()
            .any(|q| q.port == port && q.protocol == protocol)
        {
            let message = format!("duplicate port {port}/{protocol}; port skipped");
            cx.error(field("port"), ErrorKind::InvalidValue, message);
            continue;
        }
        if ports.iter().any(|q| q.name == name) {
            let message = format!("duplicate port name {name:?}; port skipped");
            cx.error(field("name"), ErrorKind::InvalidValue, message);
            continue;
        }
        // A bad node port loses only itself: the port still serves the VIP.
        let mut node_port = match p.node_port.filter(|p| *p != 0) {
            Some(np) => cx.node_port(&field("nodePort"), np),
            None => None,
        };
        if let Some(np) = node_port
            && ports
                .iter()
                .any(|q| q.node_port == Some(np) && q.protocol == protocol)
        {
            let message = format!("duplicate nodePort {np}/{protocol}; node port skipped");
            cx.error(field("nodePort"), ErrorKind::InvalidValue, message);
            node_port = None;
        }
        ports.push(model::ServicePort {
            index: i,
            name,
            port,
            node_port,
            protocol,
            endpoints: Vec::new(),
        });
    }

    Ok(Some(model::Service {
        service_type,
        vips,
        external_ips,
        traffic_policy,
        source_ranges,
        affinity_timeout,
        health_check_node_port,
        ports,
        created,
        labels,
        sharing_key,
        selector: spec.selector.unwrap_or_default(),
        static_service: None,
        address_request,
        origin: cx.origin.to_string(),
    }))
}

/// The families a Service asks addresses of: `spec.ipFamilies` in order (IPv4 when
/// unset, as the API server defaults a single-stack cluster), and both under a
/// dual-stack `spec.ipFamilyPolicy`. An unknown family is reported and skipped.
fn ip_families(
    cx: &mut Cx<'_>,
    families: Option<&[String]>,
    policy: Option<&str>,
) -> Vec<model::IpFamily> {
    let mut out = Vec::new();
    for (i, f) in families.unwrap_or_default().iter().enumerate() {
        let family = match f.as_str() {
            "IPv4" => model::IpFamily::V4,
            "IPv6" => model::IpFamily::V6,
            other => {
                let message = format!("{other:?} is not IPv4 or IPv6; skipped");
                cx.error(
                    format!("spec.ipFamilies[{i}]"),
                    ErrorKind::InvalidValue,
                    message,
                );
                continue;
            }
        };
        if !out.contains(&family) {
            out.push(family);
        }
    }
    if out.is_empty() {
        out.push(model::IpFamily::V4);
    }
    if matches!(policy, Some("PreferDualStack" | "RequireDualStack")) && out.len() == 1 {
        out.push(match out[0] {
            model::IpFamily::V4 => model::IpFamily::V6,
            model::IpFamily::V6 => model::IpFamily::V4,
        });
    }
    out
}

/// The trimmed, non-empty items of a comma-separated annotation value.
fn comma_list(value: Option<&String>) -> impl Iterator<Item = String> + '_ {
    value
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Parses (field, text) address candidates into distinct addresses of either
/// family; an IPv6 one is kept in the model (allocation holds it, status shows it)
/// and reported once as not served yet, since the datapath is IPv4-only for now. An
/// invalid one is reported and sets `invalid`.
fn addresses(
    cx: &mut Cx<'_>,
    candidates: Vec<(String, String)>,
    what: &str,
    invalid: &mut bool,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (field, text) in candidates {
        match cx.ip(&field, text.trim()) {
            Ok(ip) if !out.contains(&ip) => {
                if ip.is_ipv6() {
                    let message = format!("IPv6 not served yet; {what} {text} is not programmed");
                    cx.error(field, ErrorKind::UnsupportedIpFamily, message);
                }
                out.push(ip);
            }
            Ok(_) => {}
            Err(()) => *invalid = true,
        }
    }
    out
}

/// Validates a Node: its InternalIP addresses. Any invalid address invalidates the
/// Node (its last good version is kept), since a node with a wrong address would
/// get NodePort entries and tunnelled traffic at the wrong place. ExternalIP
/// addresses are kept only to be refused to Services (one that does not parse is
/// not an address anyone can take).
fn node(cx: &mut Cx<'_>, name: &str, n: core::Node) -> Result<model::Node, Invalid> {
    let addresses = n.status.and_then(|s| s.addresses).unwrap_or_default();
    let mut internal_ips = Vec::new();
    let mut external_ips = Vec::new();
    let mut invalid = false;
    for (i, a) in addresses.into_iter().enumerate() {
        if a.type_ == "ExternalIP" {
            if let Ok(ip) = a.address.trim().parse::<IpAddr>()
                && !external_ips.contains(&ip)
            {
                external_ips.push(ip);
            }
            continue;
        }
        // Hostname, InternalDNS and ExternalDNS are not for xlb.
        if a.type_ != "InternalIP" {
            continue;
        }
        match cx.ip(&format!("status.addresses[{i}].address"), a.address.trim()) {
            Ok(ip) if !internal_ips.contains(&ip) => internal_ips.push(ip),
            Ok(_) => {}
            Err(()) => invalid = true,
        }
    }
    if invalid {
        return Err(Invalid);
    }
    Ok(model::Node {
        name: name.to_string(),
        internal_ips,
        external_ips,
        labels: n.metadata.labels.unwrap_or_default(),
        origin: cx.origin.to_string(),
    })
}

/// `xlb.dev/v1alpha1 L2Announcement` as written (MetalLB L2Advertisement field names).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct L2AnnouncementDoc {
    #[serde(default)]
    spec: crate::crd::L2AnnouncementSpec,
}

/// Address blocks a pool may not reach into (RFC 6890's special-purpose registries):
/// nothing there can be a Service's address on a LAN or a router's table.
const SPECIAL_BLOCKS: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\" (unspecified)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved and broadcast"),
    ("::/127", "unspecified and loopback"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// The first special-purpose block the inclusive range `(first, last)` overlaps.
fn special_block((first, last): (IpAddr, IpAddr)) -> Option<(&'static str, &'static str)> {
    SPECIAL_BLOCKS.iter().copied().find(|(block, _)| {
        // The table's entries are constant CIDRs: they parse.
        let Ok(net) = block.parse::<ipnet::IpNet>() else {
            return false;
        };
        let (lo, hi) = (net.network(), net.broadcast());
        lo.is_ipv4() == first.is_ipv4() && first <= hi && last >= lo
    })
}

/// Whether the inclusive range `(first, last)` holds more addresses than a /16
/// (issue 31, finding 4: `10.0.0.0/8` was accepted without a word).
fn larger_than_slash16((first, last): (IpAddr, IpAddr)) -> bool {
    let n = |ip: IpAddr| match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    n(last).saturating_sub(n(first)) >= 1 << 16
}

/// `xlb.dev/v1alpha1 AddressPool` as written (MetalLB IPAddressPool field names).
#[derive(Deserialize)]
pub(crate) struct AddressPoolDoc {
    spec: crate::crd::AddressPoolSpec,
}

/// Validates an AddressPool: every address a CIDR (`10.0.0.0/24`) or an inclusive
/// `first-last` range of one family, reaching into no special-purpose block
/// ([`SPECIAL_BLOCKS`]: `0.0.0.0/0` would hand out loopback and multicast addresses).
/// Any bad address refuses the pool (its last
/// good version is kept): a pool that silently shrank would hand out other
/// addresses.
fn address_pool(cx: &mut Cx<'_>, doc: AddressPoolDoc) -> Result<model::AddressPool, Invalid> {
    let spec = doc.spec;
    let mut invalid = false;
    let mut ranges = Vec::new();
    for (i, text) in spec.addresses.iter().enumerate() {
        let field = format!("spec.addresses[{i}]");
        let text = text.trim();
        let range = if let Some((a, b)) = text.split_once('-') {
            match (a.trim().parse::<IpAddr>(), b.trim().parse::<IpAddr>()) {
                (Ok(a), Ok(b)) if a.is_ipv4() == b.is_ipv4() && a <= b => Some((a, b)),
                _ => None,
            }
        } else {
            text.parse::<ipnet::IpNet>()
                .ok()
                .map(|n| (n.network(), n.broadcast()))
        };
        match range {
            Some(r) => match special_block(r) {
                None => {
                    if larger_than_slash16(r) {
                        tracing::warn!(
                            object = %cx.object, field = %field, origin = %cx.origin,
                            "{text:?} holds more than 65,536 addresses (larger than a /16): most likely a typo; a LAN segment or a router's table rarely wants that many VIPs"
                        );
                    }
                    ranges.push(r)
                }
                Some((block, what)) => {
                    let message = format!(
                        "{text:?} includes {what} addresses ({block}), which no Service may be given"
                    );
                    cx.error(field, ErrorKind::InvalidIp, message);
                    invalid = true;
                }
            },
            None => {
                let message = format!(
                    "{text:?} is neither a CIDR (10.0.0.0/24) nor a range of one family (10.0.0.10-10.0.0.20)"
                );
                cx.error(field, ErrorKind::InvalidIp, message);
                invalid = true;
            }
        }
    }
    if spec.addresses.is_empty() {
        cx.error(
            "spec.addresses",
            ErrorKind::MissingField,
            "a pool needs addresses",
        );
        invalid = true;
    }
    let alloc = spec.service_allocation.unwrap_or_default();
    let namespace_selectors = selectors(
        cx,
        "spec.serviceAllocation.namespaceSelectors",
        alloc.namespace_selectors,
    );
    let service_selectors = selectors(
        cx,
        "spec.serviceAllocation.serviceSelectors",
        alloc.service_selectors,
    );
    let (Ok(service_selectors), Ok(namespace_selectors)) = (service_selectors, namespace_selectors)
    else {
        return Err(Invalid);
    };
    if invalid {
        return Err(Invalid);
    }
    Ok(model::AddressPool {
        ranges,
        auto_assign: spec.auto_assign.unwrap_or(true),
        avoid_buggy_ips: spec.avoid_buggy_ips,
        priority: alloc.priority,
        namespaces: alloc.namespaces,
        namespace_selectors,
        service_selectors,
        origin: cx.origin.to_string(),
    })
}

/// Validates an L2Announcement. The pools it names need not exist (yet): an
/// announcement naming only missing pools announces nothing, as in MetalLB.
fn l2_announcement(
    cx: &mut Cx<'_>,
    doc: L2AnnouncementDoc,
) -> Result<model::L2Announcement, Invalid> {
    let spec = doc.spec;
    let mut invalid = false;
    if !spec.ip_address_pool_selectors.is_empty() {
        let message = "pool selectors are not supported yet; name the pools in ipAddressPools";
        cx.error(
            "spec.ipAddressPoolSelectors",
            ErrorKind::InvalidValue,
            message,
        );
        invalid = true;
    }
    let service_selectors = selectors(cx, "spec.serviceSelectors", spec.service_selectors);
    let node_selectors = selectors(cx, "spec.nodeSelectors", spec.node_selectors);
    for (i, name) in spec.interfaces.iter().enumerate() {
        // IFNAMSIZ: 15 bytes and a NUL; no '/' or whitespace (dev_valid_name).
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', ':'])
            || name.chars().any(char::is_whitespace)
        {
            let message = format!("{name:?} is not a valid interface name");
            cx.error(
                format!("spec.interfaces[{i}]"),
                ErrorKind::InvalidValue,
                message,
            );
            invalid = true;
        }
    }
    let (Ok(service_selectors), Ok(node_selectors)) = (service_selectors, node_selectors) else {
        return Err(Invalid);
    };
    if invalid {
        return Err(Invalid);
    }
    Ok(model::L2Announcement {
        ip_address_pools: spec.ip_address_pools,
        service_selectors,
        node_selectors,
        interfaces: spec.interfaces,
        origin: cx.origin.to_string(),
    })
}

/// `xlb.dev/v1alpha1 BGPPeer` as written (MetalLB BGPPeer v1beta2 field names).
#[derive(Deserialize)]
struct BgpPeerDoc {
    spec: crate::crd::BGPPeerSpec,
}

/// Validates a BGPPeer. Any bad field refuses the peer (its last good version is
/// kept): a session half-configured would come up with the wrong AS or timers.
fn bgp_peer(
    cx: &mut Cx<'_>,
    peer_namespace: &str,
    name: &str,
    doc: BgpPeerDoc,
) -> Result<model::BgpPeer, Invalid> {
    let spec = doc.spec;
    let mut invalid = false;
    for (field, asn) in [("spec.myASN", spec.my_asn), ("spec.peerASN", spec.peer_asn)] {
        // AS 0 is reserved (RFC 7607), AS_TRANS only stands in (RFC 6793 §9).
        if asn == 0 || asn == crate::bgp::codec::AS_TRANS {
            let message = format!("{asn} is not a usable AS number (0 and 23456 are reserved)");
            cx.error(field, ErrorKind::InvalidValue, message);
            invalid = true;
        }
    }
    let peer_address = cx.ip("spec.peerAddress", spec.peer_address.trim());
    let source_address = spec
        .source_address
        .as_deref()
        .map(|a| cx.ip("spec.sourceAddress", a.trim()))
        .transpose();
    let peer_port = match spec.peer_port {
        None => Some(179),
        Some(p) => cx.port("spec.peerPort", p),
    };
    let mut duration = |field: &str, text: Option<&str>| -> Option<Option<std::time::Duration>> {
        let Some(text) = text else {
            return Some(None);
        };
        match crate::duration::parse(text.trim()) {
            Some(d) => Some(Some(d)),
            None => {
                let message = format!("{text:?} is not a duration (90s, 500ms, 1m)");
                cx.error(field, ErrorKind::InvalidValue, message);
                None
            }
        }
    };
    let hold_time = duration("spec.holdTime", spec.hold_time.as_deref());
    let keepalive_time = duration("spec.keepaliveTime", spec.keepalive_time.as_deref());
    let hold = hold_time
        .flatten()
        .unwrap_or(std::time::Duration::from_secs(90));
    // RFC 4271 §4.2: zero, or at least three seconds; the OPEN carries 16 bits.
    if hold_time.is_some()
        && ((hold.as_secs() != 0 && hold.as_secs() < 3)
            || hold.as_secs() > 65535
            || hold.subsec_nanos() != 0)
    {
        let message = "must be 0s or whole seconds from 3s to 65535s (RFC 4271 section 4.2)";
        cx.error("spec.holdTime", ErrorKind::InvalidValue, message);
        invalid = true;
    }
    if let Some(Some(k)) = keepalive_time
        && (k.is_zero() != hold.is_zero() || k > hold)
    {
        let message = "must not exceed the hold time (and is 0s exactly when the hold time is)";
        cx.error("spec.keepaliveTime", ErrorKind::InvalidValue, message);
        invalid = true;
    }
    if let Some(pw) = &spec.password
        && pw.len() > 80
    {
        // TCP_MD5SIG_MAXKEYLEN (include/uapi/linux/tcp.h).
        let message = "longer than the kernel's 80-byte TCP MD5 key limit";
        cx.error("spec.password", ErrorKind::InvalidValue, message);
        invalid = true;
    }
    if spec.ttl_security && (spec.ebgp_multi_hop || spec.my_asn == spec.peer_asn) {
        // RFC 5082 §3 as BIRD and FRR offer it: the peer is one hop away, so its
        // packets arrive with TTL 255; a multihop or iBGP peer's arrive with less.
        let message = "GTSM is for a directly connected eBGP router: not with ebgpMultiHop or iBGP";
        cx.error("spec.ttlSecurity", ErrorKind::InvalidValue, message);
        invalid = true;
    }
    let password_secret = match &spec.password_secret {
        None => None,
        Some(_) if spec.password.as_deref().is_some_and(|p| !p.is_empty()) => {
            let message = "set either password or passwordSecret, not both";
            cx.error("spec.passwordSecret", ErrorKind::InvalidValue, message);
            invalid = true;
            None
        }
        Some(r) => {
            let namespace = r.namespace.as_deref().filter(|n| !n.is_empty());
            let namespace = namespace.unwrap_or(peer_namespace);
            if !is_dns_subdomain(&r.name) || !is_dns_label(namespace) {
                let message = "not a valid Secret name and namespace";
                cx.error("spec.passwordSecret", ErrorKind::InvalidValue, message);
                invalid = true;
            }
            Some(model::SecretRef {
                namespace: namespace.to_string(),
                name: r.name.clone(),
            })
        }
    };
    let router_id = match spec.router_id.as_deref().map(str::trim) {
        None => Ok(None),
        Some(text) => match text.parse::<std::net::Ipv4Addr>() {
            Ok(id) if !id.is_unspecified() => Ok(Some(id)),
            _ => {
                // RFC 6286 §2.1: a non-zero 32-bit value, written as an IPv4 address.
                let message = format!("{text:?} is not a non-zero IPv4-style identifier");
                cx.error("spec.routerID", ErrorKind::InvalidValue, message);
                Err(())
            }
        },
    };
    let node_selectors = selectors(cx, "spec.nodeSelectors", spec.node_selectors);
    let (
        Ok(peer_address),
        Ok(source_address),
        Some(peer_port),
        Some(_),
        Some(keepalive_time),
        Ok(router_id),
        Ok(node_selectors),
        false,
    ) = (
        peer_address,
        source_address,
        peer_port,
        hold_time,
        keepalive_time,
        router_id,
        node_selectors,
        invalid,
    )
    else {
        return Err(Invalid);
    };
    Ok(model::BgpPeer {
        name: name.to_string(),
        my_asn: spec.my_asn,
        peer_asn: spec.peer_asn,
        peer_address,
        peer_port,
        source_address,
        hold_time: hold,
        keepalive_time,
        password: spec.password.filter(|p| !p.is_empty()),
        password_secret,
        ebgp_multihop: spec.ebgp_multi_hop,
        ttl_security: spec.ttl_security,
        graceful_restart: spec.enable_graceful_restart,
        bfd_profile: spec.bfd_profile.filter(|p| !p.is_empty()),
        node_selectors,
        router_id,
        origin: cx.origin.to_string(),
    })
}

/// A Secret's `password` key: `data` (base64 on the wire, decoded by k8s-openapi),
/// else `stringData` (as a manifest may write it; the API server folds it into
/// `data`), as MetalLB's `passwordSecret` reads it.
fn secret_key(secret: core::Secret) -> SecretKey {
    const KEY: &str = "password";
    let bytes = match (secret.data, secret.string_data) {
        (Some(mut data), _) if data.contains_key(KEY) => data.remove(KEY).map(|b| b.0),
        (_, Some(mut text)) => text.remove(KEY).map(String::into_bytes),
        _ => None,
    };
    let Some(bytes) = bytes else {
        return SecretKey::Missing;
    };
    match String::from_utf8(bytes) {
        Err(_) => SecretKey::Invalid("its password is not UTF-8 text"),
        // TCP_MD5SIG_MAXKEYLEN (include/uapi/linux/tcp.h).
        Ok(k) if k.len() > 80 => {
            SecretKey::Invalid("its password is longer than the kernel's 80-byte TCP MD5 key limit")
        }
        Ok(k) if k.is_empty() => SecretKey::Invalid("its password is empty"),
        Ok(k) => SecretKey::Key(k),
    }
}

/// `xlb.dev/v1alpha1 BGPAnnouncement` as written (MetalLB BGPAdvertisement names).
#[derive(Deserialize)]
struct BgpAnnouncementDoc {
    #[serde(default)]
    spec: crate::crd::BGPAnnouncementSpec,
}

/// Validates a BGPAnnouncement. The pools and peers it names need not exist (yet).
fn bgp_announcement(
    cx: &mut Cx<'_>,
    doc: BgpAnnouncementDoc,
) -> Result<model::BgpAnnouncement, Invalid> {
    let spec = doc.spec;
    let mut invalid = false;
    let (mut communities, mut large_communities) = (Vec::new(), Vec::new());
    for (i, text) in spec.communities.iter().enumerate() {
        match parse_community(text.trim()) {
            Some(Community::Standard(c)) => communities.push(c),
            Some(Community::Large(c)) => large_communities.push(c),
            None => {
                let message = format!(
                    "{text:?} is neither a community (65535:65282) nor a large one (large:1:2:3)"
                );
                cx.error(
                    format!("spec.communities[{i}]"),
                    ErrorKind::InvalidValue,
                    message,
                );
                invalid = true;
            }
        }
    }
    let aggregation_length = match spec.aggregation_length {
        None => 32,
        Some(n) => match u8::try_from(n) {
            Ok(n) if n <= 32 => n,
            _ => {
                let message = format!("{n} is not an IPv4 prefix length (0-32)");
                cx.error("spec.aggregationLength", ErrorKind::InvalidValue, message);
                invalid = true;
                32
            }
        },
    };
    let service_selectors = selectors(cx, "spec.serviceSelectors", spec.service_selectors);
    let node_selectors = selectors(cx, "spec.nodeSelectors", spec.node_selectors);
    let (Ok(service_selectors), Ok(node_selectors), false) =
        (service_selectors, node_selectors, invalid)
    else {
        return Err(Invalid);
    };
    Ok(model::BgpAnnouncement {
        ip_address_pools: spec.ip_address_pools,
        service_selectors,
        node_selectors,
        peers: spec.peers,
        communities,
        large_communities,
        local_pref: spec.local_pref,
        aggregation_length,
        origin: cx.origin.to_string(),
    })
}

/// One `BGPAnnouncement.spec.communities` entry.
enum Community {
    Standard(u32),
    Large([u32; 3]),
}

/// `aa:nn` with 16-bit halves (RFC 1997), or `large:a:b:c` with 32-bit parts
/// (RFC 8092), as MetalLB writes them.
fn parse_community(text: &str) -> Option<Community> {
    if let Some(rest) = text.strip_prefix("large:") {
        let parts: Vec<u32> = rest
            .split(':')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        return <[u32; 3]>::try_from(parts).ok().map(Community::Large);
    }
    let (a, b) = text.split_once(':')?;
    let (a, b): (u16, u16) = (a.parse().ok()?, b.parse().ok()?);
    Some(Community::Standard(u32::from(a) << 16 | u32::from(b)))
}

/// `xlb.dev/v1alpha1 BFDProfile` as written (MetalLB BFDProfile names).
#[derive(Deserialize)]
struct BfdProfileDoc {
    #[serde(default)]
    spec: crate::crd::BFDProfileSpec,
}

/// Validates a BFDProfile: intervals 10 ms to 60 s, multiplier 2 to 255 (MetalLB's
/// ranges; RFC 5880 §6.8.1 only forbids zero).
fn bfd_profile(cx: &mut Cx<'_>, doc: BfdProfileDoc) -> Result<model::BfdProfile, Invalid> {
    let spec = doc.spec;
    let mut invalid = false;
    let mut interval = |field: &str, ms: Option<u32>| {
        let ms = ms.unwrap_or(300);
        if !(10..=60_000).contains(&ms) {
            let message = format!("{ms} ms is outside 10..=60000");
            cx.error(field, ErrorKind::InvalidValue, message);
            invalid = true;
        }
        std::time::Duration::from_millis(u64::from(ms))
    };
    let receive_interval = interval("spec.receiveInterval", spec.receive_interval);
    let transmit_interval = interval("spec.transmitInterval", spec.transmit_interval);
    let mult = spec.detect_multiplier.unwrap_or(3);
    let detect_multiplier = match u8::try_from(mult) {
        Ok(m) if m >= 2 => m,
        _ => {
            let message = format!("{mult} is outside 2..=255");
            cx.error("spec.detectMultiplier", ErrorKind::InvalidValue, message);
            invalid = true;
            3
        }
    };
    if invalid {
        return Err(Invalid);
    }
    Ok(model::BfdProfile {
        receive_interval,
        transmit_interval,
        detect_multiplier,
        passive_mode: spec.passive_mode,
        origin: cx.origin.to_string(),
    })
}

/// Checks a `metav1.LabelSelector` the way the API server's validation does
/// (operators, and values required for In/NotIn and forbidden for the others).
/// Validates a list of label selectors at `field` (`field[i]` in errors).
fn selectors(
    cx: &mut Cx<'_>,
    field: &str,
    list: Vec<LabelSelector>,
) -> Result<Vec<model::LabelSelector>, Invalid> {
    list.into_iter()
        .enumerate()
        .map(|(i, sel)| label_selector(cx, &format!("{field}[{i}]"), sel))
        .collect()
}

fn label_selector(
    cx: &mut Cx<'_>,
    field: &str,
    sel: LabelSelector,
) -> Result<model::LabelSelector, Invalid> {
    let mut out = model::LabelSelector {
        match_labels: sel.match_labels.unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for (i, e) in sel
        .match_expressions
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let values = e.values.unwrap_or_default();
        let f = format!("{field}.matchExpressions[{i}]");
        let needs_values = matches!(e.operator.as_str(), "In" | "NotIn");
        if needs_values == values.is_empty() {
            let message = if needs_values {
                "In and NotIn need at least one value"
            } else {
                "Exists and DoesNotExist take no values"
            };
            cx.error(format!("{f}.values"), ErrorKind::InvalidValue, message);
            return Err(Invalid);
        }
        out.match_expressions.push(match e.operator.as_str() {
            "In" => model::LabelRequirement::In(e.key, values),
            "NotIn" => model::LabelRequirement::NotIn(e.key, values),
            "Exists" => model::LabelRequirement::Exists(e.key),
            "DoesNotExist" => model::LabelRequirement::DoesNotExist(e.key),
            other => {
                let message =
                    format!("{other:?} is not an operator (In, NotIn, Exists, DoesNotExist)");
                cx.error(format!("{f}.operator"), ErrorKind::InvalidValue, message);
                return Err(Invalid);
            }
        });
    }
    Ok(out)
}

/// Validates an EndpointSlice. `Ok(None)` for an address type xlb does not handle yet.
fn slice(cx: &mut Cx<'_>, es: discovery::EndpointSlice) -> Result<Option<Slice>, Invalid> {
    let label = es
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    let Some(service) = label.filter(|s| !s.is_empty()).cloned() else {
        let field = format!("metadata.labels[{SERVICE_NAME_LABEL}]");
        cx.error(
            field,
            ErrorKind::MissingField,
            "required to join the slice to its Service",
        );
        return Err(Invalid);
    };
    match es.address_type.as_str() {
        "IPv4" => {}
        "IPv6" | "FQDN" => {
            let message = format!(
                "addressType {} is not supported yet; slice skipped",
                es.address_type
            );
            cx.error("addressType", ErrorKind::UnsupportedAddressType, message);
            return Ok(None);
        }
        other => {
            let message = format!("{other:?} is not IPv4, IPv6 or FQDN");
            cx.error("addressType", ErrorKind::InvalidValue, message);
            return Err(Invalid);
        }
    }

    let mut ports = Vec::new();
    for (i, p) in es.ports.unwrap_or_default().into_iter().enumerate() {
        let field = |f: &str| format!("ports[{i}].{f}");
        // SCTP is reported once, on the Service port it belongs to.
        let Some(protocol) = cx.protocol(&field("protocol"), p.protocol.as_deref(), true) else {
            continue;
        };
        // An unset port means "all ports" in the API, which a VIP:port cannot use.
        let Some(port) = p.port else {
            cx.error(
                field("port"),
                ErrorKind::MissingField,
                "port is required; port skipped",
            );
            continue;
        };
        let Some(port) = cx.port(&field("port"), port) else {
            continue;
        };
        ports.push(SlicePort {
            index: i,
            name: p.name.unwrap_or_default(),
            port,
            protocol,
        });
    }

    let mut endpoints = Vec::new();
    for (i, ep) in es.endpoints.unwrap_or_default().into_iter().enumerate() {
        let mut addrs = Vec::new();
        for (j, text) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            match text.parse::<Ipv4Addr>() {
                Ok(ip) => addrs.push(IpAddr::V4(ip)),
                Err(_) => {
                    let message = format!("{text:?} is not an IPv4 address; address skipped");
                    cx.error(field, ErrorKind::InvalidIp, message);
                }
            }
        }
        // EndpointConditions: nil ready means ready, nil serving means "same as
        // ready", nil terminating means not terminating.
        let c = ep.conditions.unwrap_or_default();
        let ready = c.ready.unwrap_or(true);
        endpoints.push(SliceEndpoint {
            addrs,
            ready,
            serving: c.serving.unwrap_or(ready),
            terminating: c.terminating.unwrap_or(false),
            node_name: ep.node_name.filter(|n| !n.is_empty()),
        });
    }

    Ok(Some(Slice {
        service,
        ports,
        endpoints,
    }))
}

#[cfg(test)]
mod pool_size {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn range(text: &str) -> (IpAddr, IpAddr) {
        let n: ipnet::IpNet = text.parse().unwrap();
        (n.network(), n.broadcast())
    }

    #[test]
    fn pools_past_a_slash16_are_told_apart() {
        assert!(!larger_than_slash16(range("10.0.0.0/16")));
        assert!(larger_than_slash16(range("10.0.0.0/15")));
        assert!(larger_than_slash16(range("10.0.0.0/8")));
        assert!(!larger_than_slash16(range("fd00::/112")));
        assert!(larger_than_slash16(range("fd00::/64")));
        let first: IpAddr = "10.0.0.0".parse().unwrap();
        let last: IpAddr = "10.1.0.0".parse().unwrap();
        assert!(larger_than_slash16((first, last)), "65,537 addresses");
    }
}
