//! The manifest-directory source: every `*.yaml`, `*.yml` and `*.json` file of one
//! directory, each holding any number of standard Kubernetes objects, parsed with the
//! k8s-openapi types and turned into the [`model`].
//!
//! Understood: `v1 Service` (`type: LoadBalancer` only) and `discovery.k8s.io/v1
//! EndpointSlice`; a `v1 List` is read as its items. Other kinds are ignored.
//!
//! Bad input never takes down what works:
//! - a file that does not parse at all keeps the objects of its last good parse;
//! - an object that is invalid in an essential way (does not deserialise, invalid VIP,
//!   missing service-name label, ...) keeps its last good version from the same file,
//!   keyed by kind/namespace/name, or is skipped if it never had one;
//! - a non-essential part (one SCTP port, one bad endpoint address) is skipped alone;
//! - something valid that xlb does not support yet (IPv6 VIP, IPv6/FQDN slice) is
//!   reported and skipped, not replaced by an older version.
//!
//! Each problem is a [`ConfigError`] naming file, object and field.
use std::{
    collections::BTreeMap,
    fs, io,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::sync::mpsc;

pub use super::Loaded;
use super::SourceError;
use crate::model::{
    self, ConfigError, Endpoint, ErrorKind, Protocol, ServiceRef, Snapshot, TrafficPolicy,
};

/// The EndpointSlice label naming the Service it belongs to (set by the EndpointSlice
/// controller; see the Kubernetes "EndpointSlices" concept page, "Ownership").
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Reads a manifest directory and remembers the last good objects of every file.
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    /// Last good objects per file, by path; files iterate in name order.
    files: BTreeMap<PathBuf, Vec<Object>>,
}

impl ManifestSource {
    /// A source for `dir`; nothing is read until [`load`](Self::load).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Reads every `*.yaml` / `*.yml` / `*.json` file in the directory (not recursive;
    /// hidden files and editor temp files are skipped) and returns the model and this
    /// load's errors.
    pub fn load(&mut self) -> Loaded {
        let mut errors = Vec::new();
        match manifest_files(&self.dir) {
            Ok(paths) => {
                let mut files = BTreeMap::new();
                for path in paths {
                    let last = self.files.remove(&path);
                    let origin = path.display().to_string();
                    let objects = match fs::read_to_string(&path) {
                        // Removed between listing and reading: gone like any deleted file.
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => {
                            errors.push(file_error(&origin, ErrorKind::Io, e.to_string()));
                            last
                        }
                        Ok(text) => match parse_file(&path, &text, last.as_deref(), &mut errors) {
                            Ok(objects) => Some(objects),
                            Err(e) => {
                                errors.push(e);
                                last
                            }
                        },
                    };
                    if let Some(objects) = objects {
                        files.insert(path, objects);
                    }
                }
                // Files not listed any more are dropped with their objects.
                self.files = files;
            }
            Err(e) => {
                let origin = self.dir.display().to_string();
                errors.push(file_error(&origin, ErrorKind::Io, e.to_string()));
            }
        }
        let snapshot = assemble(&self.files, &mut errors);
        Loaded { snapshot, errors }
    }
}

/// Watches the directory; sends `()` on every relevant change (create, modify, remove
/// or rename of any file in it). The returned watcher must be kept alive.
///
/// Events are not filtered by file name: a ConfigMap volume updates its files by
/// renaming a hidden `..data` symlink. Bursts coalesce into one pending `()`.
pub fn watch(dir: &Path) -> Result<(RecommendedWatcher, mpsc::Receiver<()>), SourceError> {
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            // Reads and opens change nothing; close-after-write marks a finished write.
            Ok(e) => match e.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                _ => true,
            },
            // An error (e.g. inotify queue overflow) may hide changes: reload.
            Err(_) => true,
        };
        if relevant {
            // Full means a reload is already pending; closed means nobody listens.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((watcher, rx))
}

/// A parsed object, kept as the last good version of itself.
#[derive(Clone, Debug)]
struct Object {
    key: ObjectKey,
    body: Body,
}

/// Identity of an object across loads and files.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    kind: Kind,
    namespace: String,
    name: String,
}

impl ObjectKey {
    fn label(&self) -> String {
        format!("{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// The kinds this source understands.
// `v1 Node` goes here when the multi-node dataplane needs node addresses and labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }
}

#[derive(Clone, Debug)]
enum Body {
    /// `None` for a Service that is not `type: LoadBalancer`: ignored, but it still
    /// occupies its name.
    Service(Option<model::Service>),
    Slice(Slice),
}

/// A validated IPv4 EndpointSlice, not yet joined to its Service.
#[derive(Clone, Debug)]
struct Slice {
    service: String,
    ports: Vec<SlicePort>,
    endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug)]
struct SlicePort {
    /// Index in `ports[]`, for error messages.
    index: usize,
    name: String,
    port: u16,
    protocol: Protocol,
}

#[derive(Clone, Debug)]
struct SliceEndpoint {
    addrs: Vec<IpAddr>,
    ready: bool,
    serving: bool,
    terminating: bool,
    node_name: Option<String>,
}

/// The manifest files of `dir`, sorted by path.
fn manifest_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // Editors' swap and lock files are hidden (`.x.yaml.swp`, `.#x.yaml`) or carry
        // a suffix (`x.yaml~`, `#x.yaml#`), so the extension test catches the rest.
        let manifest = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        // `metadata` follows symlinks, as in ConfigMap volumes.
        if !name.starts_with('.') && manifest && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Parses one file. `Err` means the file as a whole is unreadable (syntax error); errors
/// of single objects go to `errors`, and such objects fall back to their version in
/// `last` (this file's previous good parse).
fn parse_file(
    path: &Path,
    text: &str,
    last: Option<&[Object]>,
    errors: &mut Vec<ConfigError>,
) -> Result<Vec<Object>, ConfigError> {
    let origin = path.display().to_string();
    let documents = if path.extension().is_some_and(|e| e == "json") {
        serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(&origin, ErrorKind::Parse, format!("invalid JSON: {e}")))?
    } else {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(Value::deserialize)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(&origin, ErrorKind::Parse, format!("invalid YAML: {e}")))?
    };

    let mut objects = Vec::new();
    for (i, mut doc) in documents.into_iter().enumerate() {
        let position = format!("document {}", i + 1);
        if is_list(&doc) {
            let Some(Value::Array(items)) = doc.get_mut("items").map(Value::take) else {
                continue;
            };
            for (j, item) in items.into_iter().enumerate() {
                let position = format!("{position}, items[{j}]");
                objects.extend(parse_object(&origin, &position, item, last, errors));
            }
        } else {
            objects.extend(parse_object(&origin, &position, doc, last, errors));
        }
    }
    Ok(objects)
}

/// `kind: List`, what `kubectl get -o yaml` prints for several objects.
fn is_list(doc: &Value) -> bool {
    doc.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && doc.get("kind").and_then(Value::as_str) == Some("List")
}

/// One document: identifies it, decodes it, and falls back to its last good version if
/// it is invalid. `None` when it is empty, of an ignored kind, or skipped.
fn parse_object(
    origin: &str,
    position: &str,
    doc: Value,
    last: Option<&[Object]>,
    errors: &mut Vec<ConfigError>,
) -> Option<Object> {
    if doc.is_null() {
        return None;
    }
    let mut cx = Cx {
        origin,
        object: position.to_string(),
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
        // `v1 Node` will be read here (node addresses and labels); other kinds
        // (ConfigMaps, xlb.dev resources, ...) are not this source's business yet.
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
    let key = ObjectKey {
        kind,
        // Namespaced objects without one land in `default`, as with `kubectl apply`.
        namespace: meta("namespace").unwrap_or("default").to_string(),
        name: name.to_string(),
    };
    cx.object = key.label();
    let decoded = match kind {
        Kind::Service => cx
            .deserialize(doc)
            .and_then(|s| service(&mut cx, s))
            .map(|s| Some(Body::Service(s))),
        Kind::EndpointSlice => cx
            .deserialize(doc)
            .and_then(|s| slice(&mut cx, s))
            .map(|s| s.map(Body::Slice)),
    };
    match decoded {
        Ok(body) => body.map(|body| Object { key, body }),
        Err(Invalid) => last?.iter().find(|o| o.key == key).cloned(),
    }
}

/// An essential part of an object is invalid: its last good version is used instead.
struct Invalid;

/// The object being decoded and where its errors go.
struct Cx<'a> {
    origin: &'a str,
    /// `Service default/web`, or the document's position while it has no name.
    object: String,
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

/// Validates a Service. `Ok(None)` for one that is not `type: LoadBalancer`.
fn service(cx: &mut Cx<'_>, svc: core::Service) -> Result<Option<model::Service>, Invalid> {
    let spec = svc.spec.unwrap_or_default();
    if spec.type_.as_deref() != Some("LoadBalancer") {
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

    // Every ingress IP; `spec.loadBalancerIP` (deprecated, but what a manifest without
    // status carries) only when status has none. No address is fine: pending allocation.
    let ingress = svc
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .unwrap_or_default();
    let mut candidates: Vec<(String, String)> = ingress
        .into_iter()
        .enumerate()
        .filter_map(|(i, ing)| Some((format!("status.loadBalancer.ingress[{i}].ip"), ing.ip?)))
        .collect();
    if candidates.is_empty() {
        candidates.extend(
            spec.load_balancer_ip
                .filter(|ip| !ip.is_empty())
                .map(|ip| ("spec.loadBalancerIP".to_string(), ip)),
        );
    }
    let mut vips = Vec::new();
    let mut invalid = false;
    for (field, text) in candidates {
        match cx.ip(&field, &text) {
            Ok(IpAddr::V6(_)) => {
                cx.error(
                    field,
                    ErrorKind::UnsupportedIpFamily,
                    "IPv6 not supported yet; VIP skipped",
                );
            }
            Ok(ip) if !vips.contains(&ip) => vips.push(ip),
            Ok(_) => {}
            Err(()) => invalid = true,
        }
    }
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
        ports.push(model::ServicePort {
            name,
            port,
            protocol,
            endpoints: Vec::new(),
        });
    }

    Ok(Some(model::Service {
        vips,
        traffic_policy,
        ports,
        origin: cx.origin.to_string(),
    }))
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

/// Builds the snapshot from every file's objects: the first definition of an object
/// (in file-name order) wins, and slices are joined to their Services.
fn assemble(files: &BTreeMap<PathBuf, Vec<Object>>, errors: &mut Vec<ConfigError>) -> Snapshot {
    let mut first_seen: BTreeMap<&ObjectKey, String> = BTreeMap::new();
    let mut services = BTreeMap::new();
    let mut slices = BTreeMap::new();
    for (path, objects) in files {
        let origin = path.display().to_string();
        for obj in objects {
            if let Some(first) = first_seen.get(&obj.key) {
                errors.push(ConfigError {
                    origin: origin.clone(),
                    object: obj.key.label(),
                    field: String::new(),
                    message: format!("already defined in {first}; this definition is ignored"),
                    kind: ErrorKind::DuplicateObject,
                });
                continue;
            }
            first_seen.insert(&obj.key, origin.clone());
            match &obj.body {
                Body::Service(Some(svc)) => {
                    let sref = ServiceRef::new(&obj.key.namespace, &obj.key.name);
                    services.insert(sref, svc.clone());
                }
                Body::Service(None) => {}
                Body::Slice(s) => {
                    slices.insert(&obj.key, (origin.clone(), s));
                }
            }
        }
    }

    // Slices merge in name order, so endpoint order does not depend on file layout.
    for (key, (origin, slice)) in slices {
        let sref = ServiceRef::new(&key.namespace, &slice.service);
        // A slice of a Service that is absent or not a LoadBalancer is simply unused.
        let Some(svc) = services.get_mut(&sref) else {
            continue;
        };
        for sp in &slice.ports {
            // Slice and Service ports match by name ("" for the unnamed port) and
            // protocol, as the EndpointSlice controller pairs them.
            let Some(target) = svc
                .ports
                .iter_mut()
                .find(|p| p.name == sp.name && p.protocol == sp.protocol)
            else {
                errors.push(ConfigError {
                    origin: origin.clone(),
                    object: key.label(),
                    field: format!("ports[{}].name", sp.index),
                    message: format!(
                        "unknown port name: Service {sref} has no {} port named {:?}",
                        sp.protocol, sp.name
                    ),
                    kind: ErrorKind::UnknownPortName,
                });
                continue;
            };
            for ep in &slice.endpoints {
                target
                    .endpoints
                    .extend(ep.addrs.iter().map(|&addr| Endpoint {
                        addr,
                        port: sp.port,
                        ready: ep.ready,
                        serving: ep.serving,
                        terminating: ep.terminating,
                        node_name: ep.node_name.clone(),
                    }));
            }
        }
    }
    Snapshot { services }
}

fn file_error(origin: &str, kind: ErrorKind, message: String) -> ConfigError {
    ConfigError {
        origin: origin.to_string(),
        object: String::new(),
        field: String::new(),
        message,
        kind,
    }
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn web(ns: &str, name: &str) -> ServiceRef {
        ServiceRef::new(ns, name)
    }

    /// A LoadBalancer Service `default/<name>` with one TCP port 80 named http.
    fn lb_service(name: &str, vip: &str) -> String {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{ name: {name} }}
spec:
  type: LoadBalancer
  ports: [{{ name: http, port: 80 }}]
status: {{ loadBalancer: {{ ingress: [{{ ip: \"{vip}\" }}] }} }}
"
        )
    }

    fn only_kinds(errors: &[ConfigError]) -> Vec<&'static str> {
        errors.iter().map(ConfigError::kind).collect()
    }

    const REALISTIC: &str = r#"
# Two documents plus an empty one and an ignored kind.
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: LoadBalancer
  ports:
    - { name: http, protocol: TCP, port: 80, targetPort: 8080 }
    - { name: dns, protocol: UDP, port: 53, targetPort: 5353 }
status:
  loadBalancer:
    ingress: [{ ip: 192.0.2.10 }]
---
---
apiVersion: v1
kind: ConfigMap
metadata: { name: unrelated, namespace: shop }
data: { a: b }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x7k2p
  namespace: shop
  labels: { kubernetes.io/service-name: web }
addressType: IPv4
ports:
  - { name: http, protocol: TCP, port: 8080 }
  - { name: dns, protocol: UDP, port: 5353 }
endpoints:
  - addresses: [10.1.0.5]
    conditions: { ready: true, serving: true, terminating: false }
    nodeName: node-a
  - addresses: [10.1.0.6]
    conditions: { ready: false }
    nodeName: node-a
  - addresses: [10.2.0.7]
    nodeName: node-b
"#;

    #[test]
    fn realistic_multi_document_file_becomes_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "shop.yaml", REALISTIC);
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(loaded.errors, vec![]);
        let svc = &loaded.snapshot.services[&web("shop", "web")];
        assert_eq!(svc.vips, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(svc.traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(svc.origin, path.display().to_string());
        let ep = |addr: &str, port, ready, node: &str| Endpoint {
            addr: addr.parse().unwrap(),
            port,
            ready,
            serving: ready,
            terminating: false,
            node_name: Some(node.into()),
        };
        let port = |name: &str, port, protocol, target| model::ServicePort {
            name: name.into(),
            port,
            protocol,
            endpoints: vec![
                ep("10.1.0.5", target, true, "node-a"),
                ep("10.1.0.6", target, false, "node-a"),
                ep("10.2.0.7", target, true, "node-b"),
            ],
        };
        assert_eq!(
            svc.ports,
            vec![
                port("http", 80, Protocol::Tcp, 8080),
                port("dns", 53, Protocol::Udp, 5353)
            ]
        );
    }

    #[test]
    fn lab_example_parses_into_the_demo_service() {
        let lab = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/lab.yaml");
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "lab.yaml", &fs::read_to_string(lab).unwrap());
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(loaded.errors, vec![]);
        let endpoints = |port| {
            ["10.0.1.11", "10.0.1.12", "10.0.1.13"]
                .iter()
                .map(|a| Endpoint {
                    addr: a.parse().unwrap(),
                    port,
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some("node-a".into()),
                })
                .collect()
        };
        let expected = Snapshot {
            services: BTreeMap::from([(
                web("demo", "web"),
                model::Service {
                    vips: vec!["10.0.100.1".parse().unwrap()],
                    traffic_policy: TrafficPolicy::Local,
                    ports: vec![
                        model::ServicePort {
                            name: "http".into(),
                            port: 80,
                            protocol: Protocol::Tcp,
                            endpoints: endpoints(8080),
                        },
                        model::ServicePort {
                            name: "dns".into(),
                            port: 53,
                            protocol: Protocol::Udp,
                            endpoints: endpoints(5353),
                        },
                    ],
                    origin: path.display().to_string(),
                },
            )]),
        };
        assert_eq!(loaded.snapshot, expected);
    }

    #[test]
    fn sctp_port_is_rejected_by_field_and_the_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "svc.yaml",
            "apiVersion: v1
kind: Service
metadata: { name: web }
spec:
  type: LoadBalancer
  loadBalancerIP: 192.0.2.1
  ports:
    - { name: a, port: 80 }
    - { name: b, port: 53, protocol: UDP }
    - { name: c, port: 9, protocol: SCTP }
",
        );
        let loaded = ManifestSource::new(dir.path()).load();
        let [e] = &loaded.errors[..] else {
            panic!("{:?}", loaded.errors)
        };
        assert_eq!(e.kind(), "unsupported_protocol");
        assert_eq!(e.object, "Service default/web");
        assert_eq!(e.field, "spec.ports[2].protocol");
        assert!(e.message.contains("SCTP is not supported"));
        let svc = &loaded.snapshot.services[&web("default", "web")];
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect();
        assert_eq!(ports, [("a", 80, Protocol::Tcp), ("b", 53, Protocol::Udp)]);
        assert_eq!(svc.vips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn bad_yaml_file_is_reported_and_the_good_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "good.yaml", &lb_service("good", "192.0.2.1"));
        let bad = write(
            dir.path(),
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
        );
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(only_kinds(&loaded.errors), ["parse"]);
        assert_eq!(loaded.errors[0].origin, bad.display().to_string());
        assert!(
            loaded.errors[0]
                .to_string()
                .starts_with(&format!("{}: invalid YAML", bad.display()))
        );
        assert!(
            loaded
                .snapshot
                .services
                .contains_key(&web("default", "good"))
        );
    }

    #[test]
    fn file_that_becomes_unparseable_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        write(dir.path(), "a.yaml", &lb_service("web", "192.0.2.1"));
        let good = source.load().snapshot;
        assert_eq!(good.services.len(), 1);

        write(
            dir.path(),
            "a.yaml",
            "kind: Service\n  bad: indentation\n: :\n",
        );
        let loaded = source.load();
        assert_eq!(only_kinds(&loaded.errors), ["parse"]);
        assert_eq!(loaded.snapshot, good);
        // Still kept on the next load, e.g. one triggered by another file.
        assert_eq!(source.load().snapshot, good);

        // Fixed: the new content replaces it.
        write(dir.path(), "a.yaml", &lb_service("web", "192.0.2.2"));
        let loaded = source.load();
        assert!(loaded.errors.is_empty());
        assert_eq!(
            loaded.snapshot.services[&web("default", "web")].vips,
            vec!["192.0.2.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn object_whose_vip_becomes_invalid_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        let two = |vip: &str| {
            format!(
                "{}---\n{}",
                lb_service("web", vip),
                lb_service("other", "192.0.2.9")
            )
        };
        write(dir.path(), "a.yaml", &two("192.0.2.1"));
        let good = source.load().snapshot;

        write(
            dir.path(),
            "a.yaml",
            &format!("{}---\n{}", two("192.0.2.300"), lb_service("new", "bogus")),
        );
        let loaded = source.load();
        assert_eq!(only_kinds(&loaded.errors), ["invalid_ip", "invalid_ip"]);
        let e = &loaded.errors[0];
        assert_eq!(e.object, "Service default/web");
        assert_eq!(e.field, "status.loadBalancer.ingress[0].ip");
        // web keeps its old VIP, other is untouched, new (never good) is skipped.
        assert_eq!(loaded.snapshot, good);
    }

    #[test]
    fn deserialisation_error_names_the_field_path() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "svc.yaml",
            "apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  type: LoadBalancer
  ports: [{ name: a, port: 80 }, { name: b, port: eighty }]
",
        );
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(only_kinds(&loaded.errors), ["parse"]);
        assert_eq!(loaded.errors[0].object, "Service shop/web");
        assert_eq!(loaded.errors[0].field, "spec.ports[1].port");
        assert!(loaded.snapshot.services.is_empty());
    }

    #[test]
    fn slice_port_with_unknown_name_is_reported_on_the_slice() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "svc.yaml", &lb_service("web", "192.0.2.1"));
        write(
            dir.path(),
            "slice.yaml",
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-1, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [{ name: http, port: 8080 }, { name: htp, port: 8081 }]
endpoints: [{ addresses: [10.1.0.5] }]
",
        );
        let loaded = ManifestSource::new(dir.path()).load();
        let [e] = &loaded.errors[..] else {
            panic!("{:?}", loaded.errors)
        };
        assert_eq!(e.kind(), "unknown_port_name");
        assert_eq!(e.object, "EndpointSlice default/web-1");
        assert_eq!(e.field, "ports[1].name");
        assert!(e.origin.ends_with("slice.yaml"));
        let port = &loaded.snapshot.services[&web("default", "web")].ports[0];
        assert_eq!(port.endpoints.len(), 1);
        assert_eq!(port.endpoints[0].port, 8080);
    }

    #[test]
    fn invalid_endpoint_address_skips_only_that_address() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "all.yaml",
            &format!(
                "{}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: web-1, labels: {{ kubernetes.io/service-name: web }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080 }}]
endpoints:
  - addresses: [10.1.0.5]
  - addresses: [10.1.0.6, 10.1.0.600]
    conditions: {{ ready: false, serving: true, terminating: true }}
",
                lb_service("web", "192.0.2.1")
            ),
        );
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(only_kinds(&loaded.errors), ["invalid_ip"]);
        assert_eq!(loaded.errors[0].field, "endpoints[1].addresses[1]");
        let eps = &loaded.snapshot.services[&web("default", "web")].ports[0].endpoints;
        let got: Vec<_> = eps
            .iter()
            .map(|e| (e.addr.to_string(), e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            got,
            [
                ("10.1.0.5".to_string(), true, true, false),
                ("10.1.0.6".to_string(), false, true, true)
            ]
        );
    }

    #[test]
    fn unsupported_families_and_missing_identity_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "odd.yaml",
            r#"apiVersion: v1
kind: Service
metadata: { name: dual }
spec: { type: LoadBalancer, ports: [{ port: 80 }] }
status: { loadBalancer: { ingress: [{ ip: "2001:db8::1" }, { ip: 192.0.2.1 }] } }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: dual-v6, labels: { kubernetes.io/service-name: dual } }
addressType: IPv6
endpoints: [{ addresses: ["2001:db8::5"] }]
---
metadata: { name: no-kind }
---
apiVersion: v1
kind: Service
metadata: { namespace: x }
---
apiVersion: v1
kind: Service
metadata: { name: pending }
spec: { type: LoadBalancer, ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: cluster-ip }
spec: { ports: [{ port: 80, protocol: SCTP }] }
---
apiVersion: v1
kind: Node
metadata: { name: node-a }
"#,
        );
        let loaded = ManifestSource::new(dir.path()).load();
        let got: Vec<_> = loaded
            .errors
            .iter()
            .map(|e| (e.kind(), e.object.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "unsupported_ip_family",
                    "Service default/dual",
                    "status.loadBalancer.ingress[0].ip"
                ),
                (
                    "unsupported_address_type",
                    "EndpointSlice default/dual-v6",
                    "addressType"
                ),
                ("missing_field", "document 3", "apiVersion"),
                ("missing_field", "Service in document 4", "metadata.name"),
            ]
        );
        let dual = &loaded.snapshot.services[&web("default", "dual")];
        assert_eq!(dual.vips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(dual.ports[0].name, "");
        assert!(dual.ports[0].endpoints.is_empty());
        assert!(
            loaded.snapshot.services[&web("default", "pending")]
                .vips
                .is_empty()
        );
        assert!(
            !loaded
                .snapshot
                .services
                .contains_key(&web("default", "cluster-ip"))
        );
    }

    #[test]
    fn json_files_and_lists_are_read_and_other_files_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"NAME"},
            "spec":{"type":"LoadBalancer","externalTrafficPolicy":"Local","ports":[{"port":80}]},
            "status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.1"}]}}}"#;
        write(dir.path(), "one.json", &svc.replace("NAME", "json"));
        let list = format!(
            r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
            svc.replace("NAME", "listed")
        );
        write(dir.path(), "list.json", &list);
        for skipped in [
            ".hidden.yaml",
            ".web.yaml.swp",
            "web.yaml~",
            "#web.yaml#",
            "notes.txt",
        ] {
            write(dir.path(), skipped, "not: [valid");
        }
        fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(loaded.errors, vec![]);
        let names: Vec<_> = loaded
            .snapshot
            .services
            .keys()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["json", "listed"]);
        assert_eq!(
            loaded.snapshot.services[&web("default", "json")].traffic_policy,
            TrafficPolicy::Local
        );
    }

    #[test]
    fn same_object_in_two_files_first_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &lb_service("web", "192.0.2.1"));
        let b = write(dir.path(), "b.yaml", &lb_service("web", "192.0.2.2"));
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(only_kinds(&loaded.errors), ["duplicate_object"]);
        assert_eq!(loaded.errors[0].origin, b.display().to_string());
        assert!(loaded.errors[0].message.contains("a.yaml"));
        assert_eq!(
            loaded.snapshot.services[&web("default", "web")].vips,
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn deleting_a_file_removes_its_services() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        let a = write(dir.path(), "a.yaml", &lb_service("a", "192.0.2.1"));
        write(dir.path(), "b.yaml", &lb_service("b", "192.0.2.2"));
        assert_eq!(source.load().snapshot.services.len(), 2);
        fs::remove_file(a).unwrap();
        let loaded = source.load();
        let names: Vec<_> = loaded
            .snapshot
            .services
            .keys()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["b"]);
        assert!(loaded.errors.is_empty());
    }

    #[test]
    fn missing_directory_is_an_error_and_keeps_what_was_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("m");
        fs::create_dir(&sub).unwrap();
        let mut source = ManifestSource::new(&sub);
        write(&sub, "a.yaml", &lb_service("a", "192.0.2.1"));
        let good = source.load().snapshot;
        fs::remove_dir_all(&sub).unwrap();
        let loaded = source.load();
        assert_eq!(only_kinds(&loaded.errors), ["io"]);
        assert_eq!(loaded.snapshot, good);
    }

    #[tokio::test]
    async fn watcher_fires_on_a_file_write() {
        let dir = tempfile::tempdir().unwrap();
        let (_watcher, mut changes) = watch(dir.path()).unwrap();
        write(dir.path(), "web.yaml", &lb_service("web", "192.0.2.1"));
        tokio::time::timeout(Duration::from_secs(10), changes.recv())
            .await
            .expect("no change notification within 10s")
            .expect("watcher channel closed");
    }
}
