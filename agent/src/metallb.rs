//! `xlb convert-metallb`: MetalLB configuration (IPAddressPool, L2Advertisement,
//! BGPPeer v1beta1/v1beta2, BGPAdvertisement, Community, BFDProfile) turned into the
//! xlb.dev objects that mean the same, with one warning per field that cannot be
//! carried over. xlb's resources use MetalLB's field names where they mean the same,
//! so most fields are copied as they are.
//!
//! | MetalLB | xlb.dev/v1alpha1 | not carried over |
//! |---|---|---|
//! | IPAddressPool | AddressPool | |
//! | L2Advertisement | L2Announcement | `ipAddressPoolSelectors` |
//! | BGPPeer | BGPPeer | `vrf`, `connectTime`, `dynamicASN`, `disableMP`, and others not listed in [`BGP_PEER`] |
//! | BGPAdvertisement | BGPAnnouncement | `ipAddressPoolSelectors`, `aggregationLengthV6` |
//! | Community | (none: aliases are replaced by their values) | |
//! | BFDProfile | BFDProfile | `echoMode`, `echoInterval`, `minimumTtl` |
//!
//! Objects move from the `metallb-system` namespace to `xlb-system`.
use serde_json::{Map, Value, json};

/// The output objects and the warnings, each naming the object and field.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Converted {
    /// xlb.dev objects, in input order.
    pub objects: Vec<Value>,
    /// What could not be carried over, and why.
    pub warnings: Vec<String>,
}

/// `spec` fields of each kind that carry over as they are.
const ADDRESS_POOL: &[&str] = &[
    "addresses",
    "autoAssign",
    "avoidBuggyIPs",
    "serviceAllocation",
];
const L2: &[&str] = &["ipAddressPools", "nodeSelectors", "interfaces"];
/// BGPPeer fields xlb's BGPPeer has (issue 19's list).
pub const BGP_PEER: &[&str] = &[
    "myASN",
    "peerASN",
    "peerAddress",
    "peerPort",
    "sourceAddress",
    "holdTime",
    "keepaliveTime",
    "password",
    "passwordSecret",
    "ebgpMultiHop",
    "enableGracefulRestart",
    "bfdProfile",
    "nodeSelectors",
    "routerID",
];
const BGP_ADV: &[&str] = &[
    "ipAddressPools",
    "nodeSelectors",
    "peers",
    "communities",
    "localPref",
    "aggregationLength",
];
const BFD: &[&str] = &[
    "receiveInterval",
    "transmitInterval",
    "detectMultiplier",
    "passiveMode",
];

/// Converts `docs` (every document of the input, `kind: List` already flattened or
/// not). Documents that are not MetalLB configuration are skipped.
pub fn convert(docs: Vec<Value>) -> Converted {
    let mut out = Converted::default();
    let docs: Vec<Value> = docs.into_iter().flat_map(flatten).collect();
    // Community aliases first: advertisements may use them.
    let mut aliases = Map::new();
    for d in docs
        .iter()
        .filter(|d| is_metallb(d) && d["kind"] == "Community")
    {
        for c in d["spec"]["communities"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (c["name"].as_str(), c.get("value")) {
                aliases.insert(name.to_string(), value.clone());
            }
        }
    }
    for d in &docs {
        if !is_metallb(d) {
            continue;
        }
        let kind = d["kind"].as_str().unwrap_or_default();
        let (to, keep) = match kind {
            "IPAddressPool" => ("AddressPool", ADDRESS_POOL),
            "L2Advertisement" => ("L2Announcement", L2),
            "BGPPeer" => ("BGPPeer", BGP_PEER),
            "BGPAdvertisement" => ("BGPAnnouncement", BGP_ADV),
            "BFDProfile" => ("BFDProfile", BFD),
            "Community" => continue,
            other => {
                out.warnings.push(format!(
                    "{other} {}: not configuration (status or unknown kind); skipped",
                    name_of(d)
                ));
                continue;
            }
        };
        let object = format!("{kind} {}", name_of(d));
        let mut spec = Map::new();
        for (field, value) in d["spec"].as_object().into_iter().flatten() {
            if keep.contains(&field.as_str()) {
                spec.insert(field.clone(), value.clone());
            } else {
                out.warnings.push(format!(
                    "{object}: spec.{field}: xlb's {to} has no such field; dropped"
                ));
            }
        }
        if kind == "BGPAdvertisement"
            && let Some(list) = spec.get_mut("communities").and_then(Value::as_array_mut)
        {
            for (i, c) in list.iter_mut().enumerate() {
                let Some(text) = c.as_str() else { continue };
                // A value has a colon (65535:65282 or large a:b:c); else an alias.
                if text.contains(':') {
                    continue;
                }
                match aliases.get(text) {
                    Some(v) => *c = v.clone(),
                    None => out.warnings.push(format!(
                        "{object}: spec.communities[{i}]: no Community defines {text:?}; kept as written"
                    )),
                }
            }
        }
        let mut metadata = Map::new();
        metadata.insert("name".into(), d["metadata"]["name"].clone());
        let ns = d["metadata"]["namespace"]
            .as_str()
            .unwrap_or("metallb-system");
        let ns = if ns == "metallb-system" {
            "xlb-system"
        } else {
            ns
        };
        metadata.insert("namespace".into(), json!(ns));
        if let Some(labels) = d["metadata"].get("labels") {
            metadata.insert("labels".into(), labels.clone());
        }
        out.objects.push(json!({
            "apiVersion": "xlb.dev/v1alpha1",
            "kind": to,
            "metadata": metadata,
            "spec": spec,
        }));
    }
    out
}

fn is_metallb(d: &Value) -> bool {
    d["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("metallb.io/"))
}

fn name_of(d: &Value) -> String {
    let ns = d["metadata"]["namespace"]
        .as_str()
        .unwrap_or("metallb-system");
    let name = d["metadata"]["name"].as_str().unwrap_or("(unnamed)");
    format!("{ns}/{name}")
}

/// A `v1 List` (what `kubectl get -o yaml` prints) as its items; anything else as is.
fn flatten(d: Value) -> Vec<Value> {
    if d["kind"] == "List" {
        d["items"].as_array().cloned().unwrap_or_default()
    } else if d.is_null() {
        Vec::new()
    } else {
        vec![d]
    }
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use serde::Deserialize;

    use super::*;

    fn docs(text: &str) -> Vec<Value> {
        serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).unwrap())
            .collect()
    }

    /// The shapes of MetalLB's documented examples (its `configsamples/`: a pool with
    /// service allocation, L2 by pool list and node selector, peers with a BFD
    /// profile and session options, an advertisement with a community alias and
    /// local preference), as `kubectl get -o yaml` would print some of them.
    const METALLB: &str = "apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: ippool-sample, namespace: metallb-system, labels: {zone: east}}
spec:
  addresses: [192.168.20.0/24, 192.168.9.1-192.168.9.5]
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 50
    namespaces: [namespace-a]
    namespaceSelectors: [{matchLabels: {foo: bar}}]
    serviceSelectors: [{matchExpressions: [{key: app, operator: In, values: [bar]}]}]
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: l2adv, namespace: metallb-system}
spec:
  ipAddressPools: [ippool-sample]
  nodeSelectors: [{matchLabels: {kubernetes.io/hostname: kind-worker}}]
---
apiVersion: v1
kind: List
items:
- apiVersion: metallb.io/v1beta2
  kind: BGPPeer
  metadata: {name: peer, namespace: metallb-system}
  spec: {myASN: 64512, peerASN: 64512, peerAddress: 172.30.0.3, connectTime: 120s, bfdProfile: fast}
- apiVersion: metallb.io/v1beta1
  kind: BFDProfile
  metadata: {name: fast, namespace: metallb-system}
  spec: {receiveInterval: 380, transmitInterval: 270, echoMode: true}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {name: advertisement, namespace: metallb-system}
spec:
  communities: [NO_ADVERTISE, \"65535:65281\", UNKNOWN]
  ipAddressPools: [ippool-sample]
  localPref: 150
---
apiVersion: metallb.io/v1beta1
kind: Community
metadata: {name: community1, namespace: metallb-system}
spec:
  communities: [{name: NO_ADVERTISE, value: \"65535:65282\"}]
---
apiVersion: v1
kind: Namespace
metadata: {name: metallb-system}
";

    #[test]
    fn metallb_examples_become_xlb_objects_with_a_warning_per_lost_field() {
        let c = convert(docs(METALLB));
        let kinds: Vec<&str> = c
            .objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "AddressPool",
                "L2Announcement",
                "BGPPeer",
                "BFDProfile",
                "BGPAnnouncement"
            ]
        );
        let pool = &c.objects[0];
        assert_eq!(
            pool["metadata"],
            json!({"name": "ippool-sample", "namespace": "xlb-system", "labels": {"zone": "east"}})
        );
        assert_eq!(
            pool["spec"]["addresses"],
            json!(["192.168.20.0/24", "192.168.9.1-192.168.9.5"])
        );
        assert_eq!(pool["spec"]["serviceAllocation"]["priority"], 50);
        assert_eq!(
            pool["spec"]["serviceAllocation"]["namespaceSelectors"],
            json!([{"matchLabels": {"foo": "bar"}}])
        );
        assert_eq!(c.objects[2]["spec"]["bfdProfile"], "fast");
        assert!(c.objects[2]["spec"].get("connectTime").is_none());
        assert_eq!(
            c.objects[4]["spec"]["communities"],
            json!(["65535:65282", "65535:65281", "UNKNOWN"])
        );
        assert_eq!(
            c.warnings,
            [
                "BGPPeer metallb-system/peer: spec.connectTime: xlb's BGPPeer has no such field; dropped",
                "BFDProfile metallb-system/fast: spec.echoMode: xlb's BFDProfile has no such field; dropped",
                "BGPAdvertisement metallb-system/advertisement: spec.communities[2]: no Community defines \"UNKNOWN\"; kept as written",
            ]
        );
    }

    #[test]
    fn converted_pools_and_announcements_are_read_by_the_manifest_source() {
        let c = convert(docs(METALLB));
        let dir = tempfile::tempdir().unwrap();
        let yaml: Vec<String> = c
            .objects
            .iter()
            .filter(|o| matches!(o["kind"].as_str(), Some("AddressPool" | "L2Announcement")))
            .map(|o| serde_yaml_ng::to_string(o).unwrap())
            .collect();
        std::fs::write(dir.path().join("x.yaml"), yaml.join("---\n")).unwrap();
        let loaded = crate::source::manifests::ManifestSource::new(dir.path()).load();
        assert_eq!(loaded.errors, []);
        assert_eq!(
            loaded.snapshot.address_pools["ippool-sample"].priority,
            Some(50)
        );
        assert_eq!(
            loaded.snapshot.l2_announcements["xlb-system/l2adv"].ip_address_pools,
            ["ippool-sample"]
        );
    }
}
