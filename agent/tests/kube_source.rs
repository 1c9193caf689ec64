//! The Kubernetes API source against a fake API server that speaks the real list/watch
//! protocol (`xlb_lab::apiserver`), inside a network namespace made for the test:
//!
//! - the same objects through the API and through a manifest directory give the same
//!   model (one conversion, two sources), every xlb.dev kind included, and a BGPPeer's
//!   `passwordSecret` read from a Secret of the agent's namespace;
//! - a new key in that Secret reaches the peer;
//! - a change of one EndpointSlice reaches the model as that one Service changed;
//! - a watch that ends in `410 Gone` relists, and an object deleted meanwhile goes;
//! - while the API server is down the model stays as it was, and says so.
//!
//! Needs root (network namespace).

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use xlb::{
    model::{ServiceRef, Snapshot},
    source::{
        Changed, Loaded,
        kube::KubeSource,
        manifests::{DEFAULT_NODE_PORTS, ManifestSource},
    },
};
use xlb_lab::{apiserver::FakeApiServer, netns::Netns};

const LAB: &str = include_str!("../src/source/testdata/three-nodes.yaml");
const L2: &str = "apiVersion: xlb.dev/v1alpha1
kind: L2Announcement
metadata: { name: lan, namespace: xlb-system }
spec: { interfaces: [eth0] }
---
apiVersion: xlb.dev/v1alpha1
kind: AddressPool
metadata: { name: public, namespace: xlb-system }
spec: { addresses: [192.0.2.0/28] }
---
apiVersion: xlb.dev/v1alpha1
kind: AddressPool
metadata: { name: lab, namespace: xlb-system }
spec: { addresses: [10.0.100.0/24], autoAssign: false }
---
apiVersion: v1
kind: Service
metadata: { name: asks, namespace: shop }
spec: { type: LoadBalancer, ports: [{ name: http, port: 80 }] }
---
apiVersion: xlb.dev/v1alpha1
kind: BGPPeer
metadata: { name: tor, namespace: xlb-system }
spec: { myASN: 4200000002, peerASN: 4200000001, peerAddress: 10.0.0.1, bfdProfile: fast, passwordSecret: { name: tor-key } }
---
apiVersion: xlb.dev/v1alpha1
kind: BGPAnnouncement
metadata: { name: all, namespace: xlb-system }
spec: { communities: [\"64512:100\"] }
---
apiVersion: xlb.dev/v1alpha1
kind: BFDProfile
metadata: { name: fast, namespace: xlb-system }
spec: { receiveInterval: 100 }
---
apiVersion: v1
kind: Secret
metadata: { name: tor-key, namespace: xlb-system }
type: kubernetes.io/basic-auth
data: { password: czNjcmV0 }
---
apiVersion: xlb.dev/v1alpha1
kind: StaticService
metadata: { name: kube-apiserver, namespace: kube-system }
spec:
  addresses: [192.0.2.100]
  ports: [{ name: https, port: 6443, backends: [\"10.0.0.11:6443\", \"10.0.0.12:6443\"] }]
";

/// The documents of a multi-document YAML text.
fn documents(text: &str) -> Result<Vec<Value>> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(Value::deserialize)
        .filter(|d| !matches!(d, Ok(Value::Null)))
        .collect::<Result<_, _>>()
        .context("test YAML")
}

/// Stores `doc` in the fake server the way the API server would serialise it: through
/// its k8s-openapi type where it has one.
fn put(api: &FakeApiServer, doc: Value) -> Result<()> {
    match doc["kind"].as_str() {
        Some("Service") => api.put(&serde_json::from_value::<core::Service>(doc)?),
        Some("EndpointSlice") => api.put(&serde_json::from_value::<discovery::EndpointSlice>(doc)?),
        Some("Node") => api.put(&serde_json::from_value::<core::Node>(doc)?),
        Some("Secret") => api.put(&serde_json::from_value::<core::Secret>(doc)?),
        Some(
            "L2Announcement" | "AddressPool" | "StaticService" | "BGPPeer" | "BGPAnnouncement"
            | "BFDProfile",
        ) => api.put_value(doc),
        other => bail!("unexpected kind {other:?}"),
    }
}

/// The model without where things came from (file paths vs API paths).
fn without_origins(s: &Snapshot) -> Snapshot {
    let mut s = s.clone();
    s.services.values_mut().for_each(|v| v.origin.clear());
    s.nodes.values_mut().for_each(|v| v.origin.clear());
    s.l2_announcements
        .values_mut()
        .for_each(|v| v.origin.clear());
    s.address_pools.values_mut().for_each(|v| v.origin.clear());
    s.bgp.peers.values_mut().for_each(|v| v.origin.clear());
    s.bgp
        .announcements
        .values_mut()
        .for_each(|v| v.origin.clear());
    s.bgp
        .bfd_profiles
        .values_mut()
        .for_each(|v| v.origin.clear());
    s
}

/// Loads from `source` until a load comes (or fails after 10 s).
async fn next_load(source: &mut KubeSource, rx: &mut mpsc::Receiver<()>) -> Result<Loaded> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = source.load_if_changed() {
            return Ok(l);
        }
        tokio::time::timeout_at(deadline, rx.recv())
            .await
            .context("no change from the API source in time")?;
    }
}

/// How many times the Services were listed (not watched).
fn service_lists(api: &FakeApiServer) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/services") && !r.contains("watch="))
        .count()
}

fn manifests_model(dir: &Path, text: &str) -> Result<Arc<Snapshot>> {
    std::fs::write(dir.join("all.yaml"), text)?;
    let loaded = ManifestSource::new(dir).load();
    anyhow::ensure!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    Ok(loaded.snapshot)
}

#[test]
fn the_api_source_builds_the_same_model_and_follows_changes() -> Result<()> {
    let ns = Netns::create(&format!("xlbks-{}", std::process::id()))?;
    ns.enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(scenario())
    })
}

async fn scenario() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let text = format!("{LAB}---\n{L2}");
    for doc in documents(&text)? {
        put(&api, doc)?;
    }
    let config = kube::Config::new(api.url().parse()?);
    let client = kube::Client::try_from(config)?;
    let (tx, mut rx) = mpsc::channel(1);
    let mut source = KubeSource::start(client, DEFAULT_NODE_PORTS, "xlb-system", tx);

    // 1. One conversion, two sources: the same model.
    let first = next_load(&mut source, &mut rx).await?;
    assert_eq!(first.errors, []);
    assert_eq!(first.changed, Changed::All);
    let dir = tempfile::tempdir()?;
    let from_files = manifests_model(dir.path(), &text)?;
    assert_eq!(
        without_origins(&first.snapshot),
        without_origins(&from_files)
    );
    assert_eq!(
        first.snapshot.services.len(),
        5,
        "ClusterIP `internal` is not served; the StaticService is"
    );
    let tor = &first.snapshot.bgp.peers["xlb-system/tor"];
    assert_eq!(tor.password.as_deref(), Some("s3cret"), "the Secret's key");
    assert!(first.snapshot.bgp.bfd_profiles.contains_key("fast"));
    assert!(
        first
            .snapshot
            .bgp
            .announcements
            .contains_key("xlb-system/all")
    );
    // The pool gave the Service that asked an address, the same as from files.
    let asks = &first.snapshot.services[&ServiceRef::new("shop", "asks")];
    assert_eq!(asks.vips.len(), 1);
    assert!(asks.vips[0].to_string().starts_with("192.0.2."));
    let web = ServiceRef::new("shop", "web");
    let origin = &first.snapshot.services[&web].origin;
    assert_eq!(origin, "kube:/api/v1/namespaces/shop/services/web");

    // 2. One EndpointSlice changes: that Service alone, as the files would say.
    let slices: Vec<Value> = documents(LAB)?
        .into_iter()
        .filter(|d| d["kind"] == "EndpointSlice")
        .collect();
    let web_slice = slices
        .iter()
        .find(|d| d["metadata"]["labels"]["kubernetes.io/service-name"] == "web")
        .context("web's slice")?
        .clone();
    let mut fewer = web_slice.clone();
    let endpoints = fewer["endpoints"].as_array_mut().context("endpoints")?;
    endpoints.truncate(1);
    put(&api, fewer.clone())?;
    let loaded = next_load(&mut source, &mut rx).await?;
    assert_eq!(loaded.changed, Changed::Services([web.clone()].into()));
    let mut docs = documents(&text)?;
    for d in &mut docs {
        if *d == web_slice {
            *d = fewer.clone();
        }
    }
    let yaml: Vec<String> = docs
        .iter()
        .map(serde_yaml_ng::to_string)
        .collect::<Result<_, _>>()?;
    let sub = tempfile::tempdir()?;
    let expected = manifests_model(sub.path(), &yaml.join("---\n"))?;
    assert_eq!(
        without_origins(&loaded.snapshot),
        without_origins(&expected)
    );

    // 2b. A new key in the Secret: the peer has it, and the whole model is handed on
    //     (BGP is not in the desired maps).
    let mut secret = documents(L2)?
        .into_iter()
        .find(|d| d["kind"] == "Secret")
        .context("the Secret")?;
    secret["data"]["password"] = Value::from("bjN3"); // "n3w"
    put(&api, secret)?;
    let rekeyed = next_load(&mut source, &mut rx).await?;
    assert_eq!(rekeyed.changed, Changed::All);
    let tor = &rekeyed.snapshot.bgp.peers["xlb-system/tor"];
    assert_eq!(tor.password.as_deref(), Some("n3w"));

    // 3. The API server goes away: nothing changes, and the source says why.
    api.set_down(true);
    let down = tokio::time::Instant::now() + Duration::from_secs(10);
    while source.status().unreachable.is_none() {
        tokio::time::timeout_at(down, rx.recv())
            .await
            .with_context(|| {
                format!(
                    "the source never noticed the API server was down: {:#?}",
                    api.requests()
                )
            })?;
    }
    assert!(
        source.load_if_changed().is_none(),
        "an unreachable API server changes nothing"
    );

    // 4. Meanwhile a Service is deleted and history compacted: the watch resumes
    //    into 410 Gone, lists again, and the Service goes (no event ever said so).
    let lists_before = service_lists(&api);
    api.delete("Service", "shop", "web")?;
    api.compact();
    api.set_down(false);
    let gone = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let l = next_load(&mut source, &mut rx).await?;
        if !l.snapshot.services.contains_key(&web) {
            assert!(
                l.snapshot
                    .services
                    .contains_key(&ServiceRef::new("shop", "admin"))
            );
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < gone, "web never went");
    }
    assert!(source.status().unreachable.is_none());
    assert!(
        service_lists(&api) > lists_before,
        "Services listed again after 410 Gone: {:?}",
        api.requests()
    );
    Ok(())
}
