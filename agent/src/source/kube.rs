//! The Kubernetes API source: kube-rs watchers on Services, EndpointSlices, Nodes,
//! Namespaces (their labels, for pools' `namespaceSelectors`), every xlb.dev kind
//! (L2Announcement, AddressPool, StaticService, BGPPeer, BGPAnnouncement, BFDProfile)
//! and the Secrets of the agent's own namespace (BGPPeer `passwordSecret`) feed the
//! same conversion ([`super::convert`]) and assembly ([`super::assemble`]) as the
//! manifest directory, so nothing after the model knows which source it was.
//!
//! Each API object is its own origin (`kube:/api/v1/namespaces/NS/services/NAME`),
//! holding its converted object or, when an update is invalid, its last good
//! version. The watchers (list, then watch from the list's resourceVersion; a relist
//! after `410 Gone`; reconnects with back-off: kube-runtime's `watcher`) run as tasks
//! and leave their updates in an inbox; [`KubeSource::load_if_changed`] takes them,
//! coalesced per object. A relist reports objects that vanished meanwhile as deleted.
//!
//! A kind the API server refuses (403: the agent's RBAC lacks it, as after an upgrade
//! that kept an older ClusterRole) or does not serve (404: its CRD is not installed)
//! is reported once, naming the permission, and taken as empty if it was never
//! listed (else its last listed objects stay); the other kinds keep working.
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
pub const KINDS: [&str; 11] = [
    "Service",
    "EndpointSlice",
    "Node",
    "Namespace",
    "L2Announcement",
    "AddressPool",
    "StaticService",
    "BGPPeer",
    "BGPAnnouncement",
    "BFDProfile",
    "Secret",
];

/// xlb.dev kinds (v1alpha1) with their plurals, watched in every namespace.
const XLB_KINDS: [(&str, &str); 6] = [
    ("L2Announcement", "l2announcements"),
    ("AddressPool", "addresspools"),
    ("StaticService", "staticservices"),
    ("BGPPeer", "bgppeers"),
    ("BGPAnnouncement", "bgpannouncements"),
    ("BFDProfile", "bfdprofiles"),
];

/// What the API connection looks like, for metrics and `/healthz`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiStatus {
    /// Kinds listed completely at least once.
    pub synced: BTreeSet<&'static str>,
    /// The last watch request failed (the model is the last good one); cleared by
    /// the next event.
    pub unreachable: Option<String>,
    /// Kinds the API server refuses (403 Forbidden, 404 Not Found), with the verb.
    pub refused: BTreeMap<&'static str, String>,
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
    /// Starts the watchers with `client`; Secrets are read in `namespace` only (the
    /// agent's own). `changed` gets a `()` after each batch of events (coalesced: a
    /// full channel means a load is pending already).
    pub fn start(
        client: Client,
        node_ports: RangeInclusive<u16>,
        namespace: &str,
        changed: mpsc::Sender<()>,
    ) -> KubeSource {
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let mut tasks = vec![
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
            // BGPPeer passwordSecrets: only the agent's namespace (RBAC: a Role there).
            tokio::spawn(watch(
                Api::<core::Secret>::namespaced(client.clone(), namespace),
                (),
                "Secret",
                inbox.clone(),
                changed.clone(),
            )),
        ];
        for (kind, plural) in XLB_KINDS {
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("xlb.dev", "v1alpha1", kind),
                plural,
            );
            tasks.push(tokio::spawn(watch(
                Api::<DynamicObject>::all_with(client.clone(), &ar),
                ar.clone(),
                kind,
                inbox.clone(),
                changed.clone(),
            )));
        }
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
        errors.extend(self.index.errors().cloned());
        Some(Loaded {
            snapshot: Arc::clone(&self.index.snapshot),
            changed,
            errors,
            parsed,
            recheck: None,
        })
    }

    /// StaticService health verdicts (see the manifest source's `set_health`).
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
    let resource = match K::group(&dt).as_ref() {
        "" => K::plural(&dt).into_owned(),
        g => format!("{}.{g}", K::plural(&dt)),
    };
    let scope = match api.namespace() {
        Some(ns) => format!("in namespace {ns}"),
        None => "cluster-wide".to_string(),
    };
    let mut stream = watcher(api, watcher::Config::default())
        .backoff(Reconnect::new(kind))
        .boxed();
    let mut reported: Option<String> = None;
    // The refusal last reported (403/404 and the verb), so that it is said once.
    let mut refused: Option<(u16, &str)> = None;
    while let Some(item) = stream.next().await {
        // The guard must not live across the pause below (the task must stay Send).
        let pause = {
            let mut pause = false;
            let mut inbox = lock(&inbox);
            match item {
                Ok(event) => {
                    if inbox.status.unreachable.take().is_some() {
                        info!(kind, "API server reachable again");
                    }
                    reported = None;
                    // A watch event proves watching works; a complete list, listing.
                    let listed = matches!(event, watcher::Event::InitDone)
                        && refused.is_some_and(|(_, verb)| verb == "list");
                    if listed {
                        info!(kind, "listed now: the API server no longer refuses it");
                    }
                    if listed
                        || matches!(event, watcher::Event::Apply(_) | watcher::Event::Delete(_))
                    {
                        refused = None;
                        inbox.status.refused.remove(kind);
                    }
                    apply(&mut inbox, kind, event, |o| {
                        (origin(o, &dt), serde_json::to_value(o).ok())
                    });
                }
                Err(e) => match refusal(&e) {
                    Some((code, verb)) => {
                        if refused != Some((code, verb)) {
                            refused = Some((code, verb));
                            let what = match code {
                                403 => format!("{verb} forbidden"),
                                _ => "not served".to_string(),
                            };
                            inbox.status.refused.insert(kind, what);
                            if code == 403 {
                                warn!(
                                    kind,
                                    permission = %format!("{verb} {resource} {scope}"),
                                    "forbidden by RBAC (grant the agent's service account this permission); taken as empty, the other kinds keep working"
                                );
                            } else {
                                warn!(
                                    kind,
                                    resource = %resource,
                                    "not served by the API server (CRD not installed?); taken as empty, the other kinds keep working"
                                );
                            }
                        }
                        // Refused from the start: nothing of this kind is visible, which is
                        // not an outage. Listed before: what was listed stays.
                        if verb == "list" {
                            inbox.status.synced.insert(kind);
                        } else {
                            // A list allowed and a watch refused: each retry lists again,
                            // and the back-off restarts after every good list; this keeps
                            // those lists 5 s apart.
                            pause = true;
                        }
                    }
                    None => {
                        let text = e.to_string();
                        if reported.as_deref() != Some(text.as_str()) {
                            warn!(kind, error = %text, "watching the API server failed; keeping the last model and retrying");
                            reported = Some(text.clone());
                        }
                        inbox.status.unreachable = Some(text);
                    }
                },
            }
            pause
        };
        let _ = changed.try_send(());
        if pause {
            tokio::time::sleep(Reconnect::MAX).await;
        }
    }
}

/// A refusal of a kind rather than an outage: `403 Forbidden` (RBAC) or `404 Not
/// Found` (the resource is not served), with the verb refused (`list`, `watch`).
fn refusal(e: &watcher::Error) -> Option<(u16, &'static str)> {
    let (verb, status) = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s)) => ("list", s),
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => ("watch", s),
        _ => return None,
    };
    matches!(status.code, 403 | 404).then_some((status.code, verb))
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
