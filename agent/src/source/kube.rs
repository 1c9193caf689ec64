//! The Kubernetes API source: kube-rs watchers on Services, EndpointSlices, Nodes,
//! Namespaces (their labels, for pools' `namespaceSelectors`) and xlb's L2Announcements and AddressPools feed the same conversion ([`super::convert`]) and assembly
//! ([`super::assemble`]) as the manifest directory, so nothing after the model knows
//! which source it was.
//!
//! Each API object is its own origin (`kube:/api/v1/namespaces/NS/services/NAME`),
//! holding its converted object or, when an update is invalid, its last good
//! version. The watchers (list, then watch from the list's resourceVersion; a relist
//! after `410 Gone`; reconnects with back-off: kube-runtime's `watcher`) run as tasks
//! and leave their updates in an inbox; [`KubeSource::load_if_changed`] takes them,
//! coalesced per object. A relist reports objects that vanished meanwhile as deleted.
//!
//! The dataplane never waits on the API server: until every kind has been listed once
//! ([`KubeSource::synced`]) nothing is loaded, so a restarted agent keeps serving what
//! the pinned maps hold instead of a half-listed cluster; while the API server is
//! unreachable the last model stays ([`ApiStatus`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    ops::RangeInclusive,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use futures::StreamExt;
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt, watcher},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

use super::{
    Changed, Loaded,
    assemble::{Document, Index},
    convert::{Object, parse_object},
};
use crate::model::{ConfigError, Probe};

/// The kinds watched, by the name used in logs and [`ApiStatus`].
pub const KINDS: [&str; 6] = [
    "Service",
    "EndpointSlice",
    "Node",
    "Namespace",
    "L2Announcement",
    "AddressPool",
];

/// What the API connection looks like, for metrics and `/healthz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiStatus {
    /// Kinds listed completely at least once.
    pub synced: BTreeSet<&'static str>,
    /// The last watch request failed (the model is the last good one); cleared by
    /// the next event.
    pub unreachable: Option<String>,
}

/// One API object's converted form (its last good version) and the errors of its
/// latest version.
#[derive(Debug, Default)]
struct ApiDoc {
    objects: Vec<Object>,
    errors: Vec<ConfigError>,
}

impl Document for ApiDoc {
    fn objects(&self) -> &[Object] {
        &self.objects
    }
}

/// Updates the watchers left for the next load.
#[derive(Debug, Default)]
struct Inbox {
    /// Latest state per origin: the object as JSON, or `None` for deleted.
    updates: BTreeMap<PathBuf, Option<Value>>,
    /// Origins present per kind, as the watchers last said.
    known: BTreeMap<&'static str, BTreeSet<PathBuf>>,
    /// Origins seen by a relist in progress, per kind.
    listing: BTreeMap<&'static str, BTreeSet<PathBuf>>,
    status: ApiStatus,
}

/// The source: the converted objects by origin and the model assembled from them.
pub struct KubeSource {
    docs: BTreeMap<PathBuf, ApiDoc>,
    index: Index,
    node_ports: RangeInclusive<u16>,
    inbox: Arc<Mutex<Inbox>>,
    /// Nothing loaded yet: the first load returns the model even if empty.
    first: bool,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock(inbox: &Mutex<Inbox>) -> MutexGuard<'_, Inbox> {
    // A watcher task that panicked mid-update leaves a usable inbox (plain maps).
    inbox.lock().unwrap_or_else(|e| e.into_inner())
}

impl KubeSource {
    /// Starts the watchers with `client`; `changed` gets a `()` after each batch of
    /// events (coalesced: a full channel means a load is pending already).
    pub fn start(
        client: Client,
        node_ports: RangeInclusive<u16>,
        changed: mpsc::Sender<()>,
    ) -> KubeSource {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let l2 = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("xlb.dev", "v1alpha1", "L2Announcement"),
            "l2announcements",
        );
        let pools = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("xlb.dev", "v1alpha1", "AddressPool"),
            "addresspools",
        );
        let tasks = vec![
            tokio::spawn(watch(
                Api::<core::Service>::all(client.clone()),
                (),
                "Service",
                inbox.clone(),
                changed.clone(),
            )),
            tokio::spawn(watch(
                Api::<discovery::EndpointSlice>::all(client.clone()),
                (),
                "EndpointSlice",
                inbox.clone(),
                changed.clone(),
            )),
            tokio::spawn(watch(
                Api::<core::Node>::all(client.clone()),
                (),
                "Node",
                inbox.clone(),
                changed.clone(),
            )),
            // For AddressPool namespaceSelectors: only labels are read.
            tokio::spawn(watch(
                Api::<core::Namespace>::all(client.clone()),
                (),
                "Namespace",
                inbox.clone(),
                changed.clone(),
            )),
            tokio::spawn(watch(
                Api::<DynamicObject>::all_with(client.clone(), &l2),
                l2.clone(),
                "L2Announcement",
                inbox.clone(),
                changed.clone(),
            )),
            tokio::spawn(watch(
                Api::<DynamicObject>::all_with(client, &pools),
                pools.clone(),
                "AddressPool",
                inbox.clone(),
                changed,
            )),
        ];
        KubeSource {
            docs: BTreeMap::new(),
            index: Index::new(),
            node_ports,
            inbox,
            first: true,
            tasks,
        }
    }

    /// Whether every kind has been listed once (before that, loads return nothing).
    pub fn synced(&self) -> bool {
        lock(&self.inbox).status.synced.len() == KINDS.len()
    }

    /// The connection's state now.
    pub fn status(&self) -> ApiStatus {
        lock(&self.inbox).status.clone()
    }

    /// The model with every update so far, or `None` if nothing changed since the last
    /// load (or not every kind is listed yet).
    pub fn load_if_changed(&mut self) -> Option<Loaded> {
        self.load_inner(false)
    }

    /// The whole model with every update so far (reported as [`Changed::All`]), or
    /// `None` while not every kind is listed yet.
    pub fn load(&mut self) -> Option<Loaded> {
        self.load_inner(true)
    }

    fn load_inner(&mut self, whole: bool) -> Option<Loaded> {
        if !self.synced() {
            return None;
        }
        let updates = std::mem::take(&mut lock(&self.inbox).updates);
        let rechecked = std::mem::take(&mut self.index.rechecked);
        if updates.is_empty() && rechecked.is_empty() && !self.first && !whole {
            return None;
        }
        let parsed = updates.len();
        let mut touched = Vec::with_capacity(updates.len());
        for (origin, value) in updates {
            let old = self.docs.remove(&origin);
            if let Some(value) = value {
                let name = origin.display().to_string();
                let mut errors = Vec::new();
                let last = old.as_ref().map(|d| d.objects.as_slice());
                let objects =
                    parse_object(&name, "object", value, last, &self.node_ports, &mut errors);
                let doc = ApiDoc {
                    objects: objects.into_iter().collect(),
                    errors,
                };
                self.docs.insert(origin.clone(), doc);
            }
            touched.push((origin, old.map(|d| d.objects).unwrap_or_default()));
        }
        let mut changed = self.index.update(&self.docs, touched);
        if std::mem::take(&mut self.first) || whole {
            changed = Changed::All;
        }
        if let Changed::Services(services) = &mut changed {
            services.extend(rechecked);
        }
        let mut errors: Vec<ConfigError> = self
            .docs
            .values()
            .flat_map(|d| d.errors.iter().cloned())
            .collect();
        errors.extend(self.index.duplicates.values().flatten().cloned());
        errors.extend(self.index.join_errors.values().flatten().cloned());
        errors.extend(self.index.ipam_errors.iter().cloned());
        Some(Loaded {
            snapshot: Arc::clone(&self.index.snapshot),
            changed,
            errors,
            parsed,
            recheck: None,
        })
    }

    /// StaticService health verdicts (see the manifest source's `set_health`; the API
    /// source carries no StaticServices today, so this only keeps the contract).
    pub fn set_health(&mut self, verdicts: BTreeMap<Probe, bool>) {
        self.index.set_health(&self.docs, verdicts);
    }
}

/// The origin of an API object: its path on the API server.
fn origin<K: Resource<DynamicType = D>, D>(obj: &K, dt: &D) -> PathBuf {
    let plural = K::plural(dt);
    let prefix = match K::group(dt).as_ref() {
        "" => format!("/api/{}", K::version(dt)),
        g => format!("/apis/{g}/{}", K::version(dt)),
    };
    let name = obj.name_any();
    PathBuf::from(match obj.namespace() {
        Some(ns) => format!("kube:{prefix}/namespaces/{ns}/{plural}/{name}"),
        None => format!("kube:{prefix}/{plural}/{name}"),
    })
}

/// Delays between reconnects: 200 ms doubling to 5 s, each with up to half its length
/// of jitter (so that a cluster's agents do not return in step). kube-rs's default
/// grows to 30 s, which after an outage leaves a node serving a stale model that long;
/// one watch per kind per node is cheap to retry.
struct Reconnect {
    next: std::time::Duration,
    seed: u64,
}

impl Reconnect {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(200);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);

    fn new(kind: &str) -> Self {
        // Jitter differs per process and kind; it needs no more than that.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let seed = kind
            .bytes()
            .fold(u64::from(now) ^ u64::from(std::process::id()), |h, b| {
                h.rotate_left(5) ^ u64::from(b)
            })
            | 1;
        Reconnect {
            next: Self::FIRST,
            seed,
        }
    }
}

impl Iterator for Reconnect {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        // xorshift64: a spread, not a secret.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        let jitter = base.mul_f64((self.seed % 1000) as f64 / 2000.0);
        Some(base + jitter)
    }
}

impl kube::runtime::utils::Backoff for Reconnect {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Runs one kind's watcher forever, leaving its events in `inbox`.
async fn watch<K>(
    api: Api<K>,
    dt: K::DynamicType,
    kind: &'static str,
    inbox: Arc<Mutex<Inbox>>,
    changed: mpsc::Sender<()>,
) where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
    K::DynamicType: Send,
{
    let mut stream = watcher(api, watcher::Config::default())
        .backoff(Reconnect::new(kind))
        .boxed();
    let mut reported: Option<String> = None;
    while let Some(item) = stream.next().await {
        let mut inbox = lock(&inbox);
        match item {
            Ok(event) => {
                if inbox.status.unreachable.take().is_some() {
                    info!(kind, "API server reachable again");
                }
                reported = None;
                apply(&mut inbox, kind, event, |o| {
                    (origin(o, &dt), serde_json::to_value(o).ok())
                });
            }
            // A kind whose CRD is not installed lists as empty (404): nothing of that
            // kind exists, which is not an outage.
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 404 => {
                if inbox.status.synced.insert(kind) {
                    warn!(
                        kind,
                        "not served by the API server (CRD not installed?): taken as empty"
                    );
                }
            }
            Err(e) => {
                let text = e.to_string();
                if reported.as_deref() != Some(text.as_str()) {
                    warn!(kind, error = %text, "watching the API server failed; keeping the last model and retrying");
                    reported = Some(text.clone());
                }
                inbox.status.unreachable = Some(text);
            }
        }
        drop(inbox);
        let _ = changed.try_send(());
    }
}

/// Records one watcher event.
fn apply<K>(
    inbox: &mut Inbox,
    kind: &'static str,
    event: watcher::Event<K>,
    convert: impl Fn(&K) -> (PathBuf, Option<Value>),
) {
    match event {
        watcher::Event::Init => {
            inbox.listing.insert(kind, BTreeSet::new());
        }
        watcher::Event::InitApply(obj) => {
            let (path, value) = convert(&obj);
            inbox.listing.entry(kind).or_default().insert(path.clone());
            inbox.updates.insert(path, value);
        }
        watcher::Event::InitDone => {
            let listed = inbox.listing.remove(&kind).unwrap_or_default();
            let known = inbox.known.insert(kind, listed.clone()).unwrap_or_default();
            for gone in known.difference(&listed) {
                inbox.updates.insert(gone.clone(), None);
            }
            if inbox.status.synced.insert(kind) {
                info!(kind, objects = listed.len(), "listed");
            }
        }
        watcher::Event::Apply(obj) => {
            let (path, value) = convert(&obj);
            inbox.known.entry(kind).or_default().insert(path.clone());
            inbox.updates.insert(path, value);
        }
        watcher::Event::Delete(obj) => {
            let (path, _) = convert(&obj);
            inbox.known.entry(kind).or_default().remove(&path);
            inbox.updates.insert(path, None);
        }
    }
}
