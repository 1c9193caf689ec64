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

/// Every CRD as YAML, by file name under `deploy/crds/`.
pub fn all_yaml() -> Result<Vec<(String, String)>, serde_yaml_ng::Error> {
    let crds = [
        ("addresspools.yaml", AddressPool::crd()),
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
