//! `xlb.dev/v1alpha1 L2Announcement` through the manifest source: parsed into the
//! model with MetalLB's field names, and refused field by field when invalid, with
//! the last good version kept.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::collections::BTreeMap;

use xlb::{
    model::{LabelRequirement, LabelSelector, any_selects},
    source::manifests::ManifestSource,
};

const GOOD: &str = "apiVersion: xlb.dev/v1alpha1
kind: L2Announcement
metadata: { name: lan, namespace: xlb-system }
spec:
  serviceSelectors:
    - matchLabels: { expose: lan }
  nodeSelectors:
    - matchExpressions:
        - { key: node-role.kubernetes.io/edge, operator: Exists }
  interfaces: [eth0]
---
apiVersion: xlb.dev/v1alpha1
kind: L2Announcement
metadata: { name: everything }
";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn l2_announcements_are_read_with_metallb_field_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("l2.yaml"), GOOD).unwrap();
    let loaded = ManifestSource::new(dir.path()).load();
    assert_eq!(loaded.errors, vec![]);
    let l2 = &loaded.snapshot.l2_announcements;
    assert_eq!(
        l2.keys().collect::<Vec<_>>(),
        ["default/everything", "xlb-system/lan"]
    );
    let every = &l2["default/everything"];
    assert!(every.service_selectors.is_empty() && every.node_selectors.is_empty());
    assert!(every.interfaces.is_empty() && every.ip_address_pools.is_empty());
    let lan = &l2["xlb-system/lan"];
    assert_eq!(lan.interfaces, ["eth0"]);
    assert_eq!(
        lan.node_selectors,
        [LabelSelector {
            match_labels: BTreeMap::new(),
            match_expressions: vec![LabelRequirement::Exists(
                "node-role.kubernetes.io/edge".into()
            )],
        }]
    );
    assert!(any_selects(
        &lan.service_selectors,
        &labels(&[("expose", "lan")])
    ));
    assert!(!any_selects(
        &lan.service_selectors,
        &labels(&[("expose", "wan")])
    ));
    assert!(any_selects(&every.service_selectors, &labels(&[])));
}

#[test]
fn invalid_l2_announcement_names_the_field_and_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l2.yaml");
    std::fs::write(&path, GOOD).unwrap();
    let mut source = ManifestSource::new(dir.path());
    let first = source.load();
    assert_eq!(first.errors, vec![]);
    let bad = GOOD.replace("operator: Exists", "operator: Near").replace(
        "kind: L2Announcement\nmetadata: { name: everything }",
        "kind: L2Announcement\nmetadata: { name: everything }\nspec: { ipAddressPoolSelectors: [{ matchLabels: { zone: east } }] }",
    );
    // A different size, so the source sees the file changed.
    std::fs::write(&path, format!("{bad}\n# edited\n")).unwrap();
    let loaded = source.load();
    let mut got: Vec<(String, String, String)> = loaded
        .errors
        .iter()
        .map(|e| (e.object.clone(), e.field.clone(), e.kind().to_string()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "L2Announcement default/everything".to_string(),
                "spec.ipAddressPoolSelectors".to_string(),
                "invalid_value".to_string()
            ),
            (
                "L2Announcement xlb-system/lan".to_string(),
                "spec.nodeSelectors[0].matchExpressions[0].operator".to_string(),
                "invalid_value".to_string()
            ),
        ]
    );
    assert!(
        loaded
            .errors
            .iter()
            .any(|e| e.message.contains("pool selectors are not supported yet"))
    );
    // Both keep their last good version.
    assert_eq!(
        loaded.snapshot.l2_announcements,
        first.snapshot.l2_announcements
    );
}
