//! xlb's own resources (`xlb.dev/v1alpha1`) as Rust types: the conversion parses
//! them ([`crate::source::convert`]) and their CustomResourceDefinitions are
//! generated from them (`xlb crds`, `cargo xtask crds` into `deploy/crds/`), so the
//! API server checks the same shape the agent reads. The schema states what it can
//! (ports in 1-65535, counts in range, known enum values); the agent checks
//! everything again, since the manifest source has no API server in front of it.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `L2Announcement`: MetalLB's L2Advertisement, same field names. An empty spec
/// announces every VIP from every node.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "xlb.dev",
    version = "v1alpha1",
    kind = "L2Announcement",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L2AnnouncementSpec {
    /// Only VIPs inside these AddressPools (none: every VIP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    /// MetalLB's pool selectors: not supported yet (refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// Only Services these select (none: every Service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
    /// Only nodes these select may announce (none: every node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// Only where the agent's `--interface` is one of these (none: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

/// `AddressPool`: MetalLB's IPAddressPool, same field names.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "xlb.dev",
    version = "v1alpha1",
    kind = "AddressPool",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressPoolSpec {
    /// CIDRs (`10.0.0.0/24`) or inclusive ranges (`10.0.0.10-10.0.0.20`).
    #[schemars(length(min = 1))]
    pub addresses: Vec<String>,
    /// Whether Services that name no pool may get addresses from it (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
    /// Never hand out IPv4 addresses ending in .0 or .255.
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,
    /// Which Services may use the pool, and in what order pools are tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

/// `AddressPool.spec.serviceAllocation`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAllocation {
    /// Pools with a lower value are tried first; pools without one last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Only Services in these namespaces (none, and no namespaceSelectors: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Only Services in namespaces whose labels these select; with namespaces, either
    /// admits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_selectors: Vec<LabelSelector>,
    /// Only Services these select (none: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
}

/// `StaticService`: a VIP in front of machines named by address, without Kubernetes
/// (read from the manifest source).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "xlb.dev",
    version = "v1alpha1",
    kind = "StaticService",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticServiceSpec {
    /// The VIPs.
    #[schemars(length(min = 1))]
    pub addresses: Vec<String>,
    /// Ports, each with its backends.
    pub ports: Vec<StaticPort>,
    /// Active health check of every backend (none: every backend is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<StaticHealthCheck>,
    /// `SNAT` (default) or `DSR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(SNAT|DSR)$"))]
    pub forwarding: Option<String>,
}

/// `StaticService.spec.ports[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticPort {
    /// Port name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The port on the VIP.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `TCP` (default) or `UDP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(TCP|UDP)$"))]
    pub protocol: Option<String>,
    /// `address:port` of each backend (`[v6]:port` for IPv6).
    pub backends: Vec<String>,
}

/// `StaticService.spec.healthCheck`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticHealthCheck {
    /// `TCP`, `HTTP` or `HTTPS`.
    #[serde(rename = "type")]
    #[schemars(regex(pattern = r"^(TCP|HTTP|HTTPS)$"))]
    pub kind: String,
    /// Request path for HTTP(S), e.g. `/readyz` (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Port checked on each backend's address (default: the backend's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Time between checks (`500ms`, `2s`, `1m`; default 2s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// How long one check may take (default min(1s, interval)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Passes that bring a failed backend back (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub rise: Option<u32>,
    /// Failures that take a backend out (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub fall: Option<u32>,
}

/// `BGPPeer`: MetalLB's BGPPeer (v1beta2), same field names: a router the selected
/// nodes open a BGP session to.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(group = "xlb.dev", version = "v1alpha1", kind = "BGPPeer", namespaced)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPPeerSpec {
    /// This node's AS number (4-octet).
    #[serde(rename = "myASN")]
    pub my_asn: u32,
    /// The router's AS number; equal to myASN for iBGP.
    #[serde(rename = "peerASN")]
    pub peer_asn: u32,
    /// The router's address.
    pub peer_address: String,
    /// The router's TCP port (default 179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub peer_port: Option<i32>,
    /// The session's local address (default: chosen by the kernel's route).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    /// Proposed hold time (`90s` default; 0s or at least 3s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<String>,
    /// Keepalive interval (default a third of the hold time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<String>,
    /// TCP MD5 signature key (RFC 2385), at most 80 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// A Secret holding the key under `password` (with the API source: in the agent's
    /// namespace); not with `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretRef>,
    /// The router is more than one hop away (eBGP TTL 255).
    #[serde(default)]
    pub ebgp_multi_hop: bool,
    /// GTSM (RFC 5082) for a directly connected router: send with TTL 255 and accept
    /// only TTL 255, so no host further away can reach the session, even with the
    /// router's address. The router must enable it too (BIRD `ttl security on`, FRR
    /// `neighbor ... ttl-security hops 1`). Not with `ebgpMultiHop`.
    #[serde(default)]
    pub ttl_security: bool,
    /// Advertise graceful restart (RFC 4724): routes survive an agent restart.
    #[serde(default)]
    pub enable_graceful_restart: bool,
    /// The BFDProfile to run BFD with (none: no BFD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd_profile: Option<String>,
    /// Only nodes these select peer (none: every node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// BGP identifier (default: the node's IPv4 address).
    #[serde(default, rename = "routerID", skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
}

/// `BGPPeer.spec.passwordSecret`: a Secret reference.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// The Secret's name.
    pub name: String,
    /// The Secret's namespace (default: the peer's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `BGPAnnouncement`: MetalLB's BGPAdvertisement, same field names (and
/// serviceSelectors, as L2Announcement has). An empty spec announces every VIP to
/// every peer from every node.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "xlb.dev",
    version = "v1alpha1",
    kind = "BGPAnnouncement",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BGPAnnouncementSpec {
    /// Only VIPs inside these AddressPools (none: every VIP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    /// Only Services these select (none: every Service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
    /// Only from nodes these select (none: every node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// Only to the BGPPeers of these names (none: every peer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// `65535:65282` (RFC 1997) or `large:1:2:3` (RFC 8092) communities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// LOCAL_PREF for iBGP peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
    /// Announce the VIP's covering IPv4 prefix of this length (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 32))]
    pub aggregation_length: Option<i32>,
}

/// `BFDProfile`: MetalLB's BFDProfile timers (milliseconds, as MetalLB spells them).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "xlb.dev",
    version = "v1alpha1",
    kind = "BFDProfile",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BFDProfileSpec {
    /// Required Min RX Interval in ms (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 60000))]
    pub receive_interval: Option<u32>,
    /// Desired Min TX Interval in ms (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 60000))]
    pub transmit_interval: Option<u32>,
    /// Detect multiplier (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 255))]
    pub detect_multiplier: Option<u32>,
    /// Send only once the router has sent (RFC 5880 §6.1 passive role).
    #[serde(default)]
    pub passive_mode: bool,
}

/// Every CRD as YAML, by file name under `deploy/crds/`.
pub fn all_yaml() -> Result<Vec<(String, String)>, serde_yaml_ng::Error> {
    let crds = [
        ("addresspools.yaml", AddressPool::crd()),
        ("bfdprofiles.yaml", BFDProfile::crd()),
        ("bgpannouncements.yaml", BGPAnnouncement::crd()),
        ("bgppeers.yaml", BGPPeer::crd()),
        ("l2announcements.yaml", L2Announcement::crd()),
        ("staticservices.yaml", StaticService::crd()),
    ];
    crds.into_iter()
        .map(|(file, crd)| {
            let text = serde_yaml_ng::to_string(&crd)?;
            Ok((
                file.to_string(),
                format!(
                    "# Generated by `cargo xtask crds` from agent/src/crd.rs; do not edit.\n{text}"
                ),
            ))
        })
        .collect()
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The committed CRDs are what the types generate: run `cargo xtask crds` after
    /// changing a type.
    #[test]
    fn committed_crds_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        for (file, text) in all_yaml().unwrap() {
            let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
            assert!(
                committed == text,
                "deploy/crds/{file} differs from agent/src/crd.rs: run `cargo xtask crds`"
            );
        }
    }

    /// The schema says what it can: ports, counts, enums.
    #[test]
    fn schemas_carry_the_validation() {
        let crd = serde_json::to_value(StaticService::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let port = &spec["properties"]["ports"]["items"]["properties"]["port"];
        assert_eq!(
            (port["minimum"].as_f64(), port["maximum"].as_f64()),
            (Some(1.0), Some(65535.0))
        );
        let kind = &spec["properties"]["healthCheck"]["properties"]["type"];
        assert_eq!(kind["pattern"], "^(TCP|HTTP|HTTPS)$");
        let pool = serde_json::to_value(AddressPool::crd()).unwrap();
        let addresses = &pool["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["addresses"];
        assert_eq!(addresses["minItems"], 1);
    }
}
