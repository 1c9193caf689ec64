//! Small builders for the standard Kubernetes objects the agent reads from `--manifests`, and
//! atomic file edits (write a temporary file, then rename) so the agent never sees half a file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

/// One Service port and the matching EndpointSlice port.
#[derive(Clone, Debug)]
pub struct PortSpec {
    /// Port name (joins Service and EndpointSlice ports).
    pub name: String,
    /// `TCP` / `UDP` / `SCTP`.
    pub protocol: String,
    /// The Service (VIP) port.
    pub port: u16,
    /// The backend port (`targetPort`, and the EndpointSlice port).
    pub target_port: u16,
}

impl PortSpec {
    /// A port named `name`, `protocol` `port` → `target_port`.
    pub fn new(name: &str, protocol: &str, port: u16, target_port: u16) -> PortSpec {
        PortSpec {
            name: name.to_string(),
            protocol: protocol.to_string(),
            port,
            target_port,
        }
    }
}

/// One EndpointSlice endpoint.
#[derive(Clone, Debug)]
pub struct EndpointSpec {
    /// The pod's IP.
    pub ip: String,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving` (as `ready` unless set with [`EndpointSpec::terminating`]).
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// `nodeName`.
    pub node: String,
}

impl EndpointSpec {
    /// An endpoint `ip` on `node` with readiness `ready`.
    pub fn new(ip: impl ToString, ready: bool, node: &str) -> EndpointSpec {
        EndpointSpec {
            ip: ip.to_string(),
            ready,
            serving: ready,
            terminating: false,
            node: node.to_string(),
        }
    }

    /// The same endpoint shutting down: not ready, terminating, still `serving`.
    pub fn terminating(mut self, serving: bool) -> EndpointSpec {
        self.ready = false;
        self.serving = serving;
        self.terminating = true;
        self
    }
}

/// A `v1 Service` of type LoadBalancer with `spec.loadBalancerIP: vip` (written verbatim,
/// quoted, so tests can pass invalid addresses) and externalTrafficPolicy Local or Cluster.
pub fn service_yaml(
    namespace: &str,
    name: &str,
    vip: &str,
    ports: &[PortSpec],
    local: bool,
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  type: LoadBalancer\n  externalTrafficPolicy: {}\n  loadBalancerIP: \"{vip}\"\n\
         \x20 selector:\n    app: {name}\n  ports:\n",
        if local { "Local" } else { "Cluster" }
    );
    for p in ports {
        let _ = write!(
            y,
            "  - name: {}\n    protocol: {}\n    port: {}\n    targetPort: {}\n",
            p.name, p.protocol, p.port, p.target_port
        );
    }
    y
}

/// `service` (from [`service_yaml`]) with `spec.healthCheckNodePort: port`.
pub fn with_health_check_node_port(service: &str, port: u16) -> String {
    service.replace(
        "  ports:\n",
        &format!("  healthCheckNodePort: {port}\n  ports:\n"),
    )
}

/// A `discovery.k8s.io/v1 EndpointSlice` for Service `service` (label
/// `kubernetes.io/service-name`), with the ports' names/protocols/target ports.
pub fn endpointslice_yaml(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[PortSpec],
    endpoints: &[EndpointSpec],
) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         \x20 labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for p in ports {
        let _ = write!(
            y,
            "- name: {}\n  protocol: {}\n  port: {}\n",
            p.name, p.protocol, p.target_port
        );
    }
    y.push_str("endpoints:\n");
    if endpoints.is_empty() {
        y.truncate(y.len() - 1);
        y.push_str(" []\n");
    }
    for e in endpoints {
        let _ = write!(
            y,
            "- addresses: [\"{}\"]\n  conditions:\n    ready: {}\n    serving: {}\n    terminating: {}\n  nodeName: {}\n",
            e.ip, e.ready, e.serving, e.terminating, e.node,
        );
    }
    y
}

/// A `v1 Node` named `name` whose `status.addresses` is one `InternalIP` (written verbatim).
pub fn node_yaml(name: &str, internal_ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n  \
         - type: InternalIP\n    address: \"{internal_ip}\"\n"
    )
}

/// Joins YAML documents into one multi-document file.
pub fn multi_doc(docs: &[String]) -> String {
    docs.iter()
        .map(|d| format!("---\n{d}"))
        .collect::<Vec<_>>()
        .join("")
}

/// The lab's standard service, as in `deploy/examples/lab.yaml`: namespace `demo`.
pub const WEB_NAMESPACE: &str = "demo";
/// The standard service's name.
pub const WEB_SERVICE: &str = "web";
/// The standard service's EndpointSlice name.
pub const WEB_SLICE: &str = "web-abc12";
/// The standard service's VIP.
pub const WEB_VIP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 100, 1);
/// The standard service's TCP port (`http`, → 8080).
pub const WEB_TCP_PORT: u16 = 80;
/// The standard service's UDP port (`dns`, → 5353).
pub const WEB_UDP_PORT: u16 = 53;

/// The standard service's UDP frontend, `WEB_VIP:WEB_UDP_PORT`.
pub fn web_udp_vip() -> std::net::SocketAddr {
    std::net::SocketAddr::from((WEB_VIP, WEB_UDP_PORT))
}

/// The standard service's TCP frontend, `WEB_VIP:WEB_TCP_PORT`.
pub fn web_tcp_vip() -> std::net::SocketAddr {
    std::net::SocketAddr::from((WEB_VIP, WEB_TCP_PORT))
}

/// The standard service's ports: `http` TCP 80→8080 and `dns` UDP 53→5353.
pub fn web_ports() -> Vec<PortSpec> {
    vec![
        PortSpec::new("http", "TCP", WEB_TCP_PORT, crate::servers::TCP_LINE_PORT),
        PortSpec::new("dns", "UDP", WEB_UDP_PORT, crate::servers::UDP_ECHO_PORT),
    ]
}

/// The standard Service `demo/web` (Local, VIP 10.0.100.1).
pub fn web_service_yaml() -> String {
    service_yaml(
        WEB_NAMESPACE,
        WEB_SERVICE,
        &WEB_VIP.to_string(),
        &web_ports(),
        true,
    )
}

/// The standard EndpointSlice `demo/web-abc12` with the given endpoints.
pub fn web_slice_yaml(endpoints: &[EndpointSpec]) -> String {
    endpointslice_yaml(
        WEB_NAMESPACE,
        WEB_SLICE,
        WEB_SERVICE,
        &web_ports(),
        endpoints,
    )
}

/// Service `demo/web` plus its EndpointSlice, as one multi-document file.
pub fn web_yaml(endpoints: &[EndpointSpec]) -> String {
    multi_doc(&[web_service_yaml(), web_slice_yaml(endpoints)])
}

/// Replaces `path` atomically: writes `.{name}.tmp` in the same directory (a name the agent
/// ignores: it does not end in .yaml/.yml/.json), then renames it over `path`.
pub fn write_atomic(path: &Path, content: &str) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, content).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Removes `path` (a manifest) from the watched directory.
pub fn remove(path: &Path) -> Result<()> {
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

/// One endpoint of the churn runs' `web` slice: (pod index 1-based on node-a, ready,
/// serving, terminating).
pub type WebEndpoint = (usize, bool, bool, bool);

/// Writes Service `demo/web` with `eps` of the lab's node-a pods as node-a's
/// `web.yaml`, atomically.
pub fn write_web(lab: &crate::lab::Lab, eps: &[WebEndpoint]) -> Result<()> {
    let specs: Vec<EndpointSpec> = eps
        .iter()
        .map(|&(i, ready, serving, terminating)| {
            let e = EndpointSpec::new(lab.node().pods[i - 1].ip, ready, "node-a");
            if terminating {
                e.terminating(serving)
            } else {
                e
            }
        })
        .collect();
    write_atomic(
        &lab.node().manifests_dir.join("web.yaml"),
        &web_yaml(&specs),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_expected_yaml() {
        let svc = web_service_yaml();
        assert!(svc.contains("loadBalancerIP: \"10.0.100.1\""), "{svc}");
        assert!(svc.contains("externalTrafficPolicy: Local"));
        assert!(
            svc.contains("  - name: dns\n    protocol: UDP\n    port: 53\n    targetPort: 5353\n"),
            "{svc}"
        );
        let slice = web_slice_yaml(&[EndpointSpec::new("10.0.1.11", true, "node-a")]);
        assert!(slice.contains("kubernetes.io/service-name: web"));
        assert!(
            slice.contains("- name: http\n  protocol: TCP\n  port: 8080\n"),
            "{slice}"
        );
        assert!(
            slice.contains("addresses: [\"10.0.1.11\"]\n  conditions:\n    ready: true"),
            "{slice}"
        );
        let empty = web_slice_yaml(&[]);
        assert!(empty.ends_with("endpoints: []\n"), "{empty}");
        let node = node_yaml("node-b", "10.0.0.12");
        assert!(
            node.contains("kind: Node\nmetadata:\n  name: node-b\n"),
            "{node}"
        );
        assert!(
            node.contains("  - type: InternalIP\n    address: \"10.0.0.12\"\n"),
            "{node}"
        );
    }
}
