//! A small stand-in for the Kubernetes API server, for testing the agent's Kubernetes
//! source where no real one can run. It speaks the list/watch protocol as the API
//! server does (API concepts, "Efficient detection of changes"):
//!
//! - `GET <collection>`: a `…List` with `metadata.resourceVersion`; every item carries
//!   its own `resourceVersion`;
//! - `GET <collection>?watch=1&resourceVersion=N`: a chunked stream of JSON lines,
//!   `{"type": ADDED|MODIFIED|DELETED|BOOKMARK, "object": …}` for every change after
//!   `N`, then the changes as they happen; a `BOOKMARK` first when bookmarks are
//!   allowed; an `ERROR` event with a `410 Gone` Status when `N` is older than the last
//!   [`FakeApiServer::compact`], as etcd compaction does;
//! - while [`FakeApiServer::set_down`] is on, nothing listens (connections are
//!   refused, as when the API server or the path to it is gone) and open watches end.
//!
//! What the IPAM leader writes, recorded for assertions:
//!
//! - `PATCH /api/v1/namespaces/NS/services/NAME/status` (JSON merge patch): applied to
//!   the stored Service (a MODIFIED event for its watches) and recorded
//!   ([`FakeApiServer::status_patches`]);
//! - Leases (`/apis/coordination.k8s.io/v1/namespaces/NS/leases[/NAME]`): GET, POST
//!   (`409 AlreadyExists` if it exists) and PUT (`409 Conflict` unless the body
//!   carries the stored resourceVersion), as optimistic concurrency does;
//! - `POST /apis/events.k8s.io/v1/namespaces/NS/events` (with `generateName`):
//!   recorded ([`FakeApiServer::events`]).
//!
//! Objects are whatever the test stores, normally k8s-openapi types serialised with
//! their `apiVersion` and `kind` ([`FakeApiServer::put`]). Collections are served
//! cluster-wide (`/api/v1/services`) and per namespace
//! (`/api/v1/namespaces/NS/secrets`: that namespace's objects only, lists and
//! watches alike), as the agent's watchers use them.
//!
//! [`FakeApiServer::refuse`] makes a collection answer as the real server does when
//! the client's RBAC lacks it (`403 Forbidden`, reason `Forbidden`, naming the verb,
//! resource and scope) or its CRD is not installed (`404 Not Found`).
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context, Result};
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{ConnectInfo, Query, State},
    http::{Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::watch;

/// A collection the server serves: URL path and list kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Collection {
    /// `/api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, ...
    pub path: &'static str,
    /// `apiVersion` of the list.
    pub api_version: &'static str,
    /// `kind` of the items (`Service`); the list is `<kind>List`.
    pub kind: &'static str,
}

/// The collections xlb watches.
pub const COLLECTIONS: [Collection; 11] = [
    Collection {
        path: "/api/v1/services",
        api_version: "v1",
        kind: "Service",
    },
    Collection {
        path: "/apis/discovery.k8s.io/v1/endpointslices",
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
    },
    Collection {
        path: "/api/v1/nodes",
        api_version: "v1",
        kind: "Node",
    },
    Collection {
        path: "/api/v1/namespaces",
        api_version: "v1",
        kind: "Namespace",
    },
    Collection {
        path: "/apis/xlb.dev/v1alpha1/l2announcements",
        api_version: "xlb.dev/v1alpha1",
        kind: "L2Announcement",
    },
    Collection {
        path: "/apis/xlb.dev/v1alpha1/addresspools",
        api_version: "xlb.dev/v1alpha1",
        kind: "AddressPool",
    },
    Collection {
        path: "/apis/xlb.dev/v1alpha1/staticservices",
        api_version: "xlb.dev/v1alpha1",
        kind: "StaticService",
    },
    Collection {
        path: "/apis/xlb.dev/v1alpha1/bgppeers",
        api_version: "xlb.dev/v1alpha1",
        kind: "BGPPeer",
    },
    Collection {
        path: "/apis/xlb.dev/v1alpha1/bgpannouncements",
        api_version: "xlb.dev/v1alpha1",
        kind: "BGPAnnouncement",
    },
    Collection {
        path: "/apis/xlb.dev/v1alpha1/bfdprofiles",
        api_version: "xlb.dev/v1alpha1",
        kind: "BFDProfile",
    },
    Collection {
        path: "/api/v1/secrets",
        api_version: "v1",
        kind: "Secret",
    },
];

impl Collection {
    /// The collection serving `path`, cluster-wide or (`Some(namespace)`) in one
    /// namespace: `/api/v1/namespaces/NS/secrets` is `/api/v1/secrets` in `NS`.
    fn find(path: &str) -> Option<(Collection, Option<String>)> {
        if let Some(c) = COLLECTIONS.iter().find(|c| c.path == path) {
            return Some((*c, None));
        }
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (prefix, ns, plural) = match parts.as_slice() {
            ["api", v, "namespaces", ns, plural] => (format!("/api/{v}"), *ns, *plural),
            ["apis", g, v, "namespaces", ns, plural] => (format!("/apis/{g}/{v}"), *ns, *plural),
            _ => return None,
        };
        let cluster = format!("{prefix}/{plural}");
        let c = COLLECTIONS.iter().find(|c| c.path == cluster)?;
        Some((*c, Some(ns.to_string())))
    }

    /// The resource as RBAC names it: `services`, `bgppeers.xlb.dev`; and its group.
    fn resource(&self) -> (&'static str, &'static str) {
        let plural = self.path.rsplit('/').next().unwrap_or_default();
        let group = match self.api_version.split_once('/') {
            Some((g, _)) => g,
            None => "",
        };
        (plural, group)
    }
}

/// Whether `object` is in `namespace` (every object is, for `None`: cluster-wide).
fn in_namespace(object: &Value, namespace: Option<&str>) -> bool {
    namespace.is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
}

/// A `PATCH …/services/NAME/status` the server applied.
#[derive(Clone, Debug)]
pub struct StatusPatch {
    /// The client's address (which agent wrote it).
    pub from: IpAddr,
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The patch as sent.
    pub patch: Value,
}

#[derive(Default)]
struct Store {
    /// The last resourceVersion handed out.
    rv: u64,
    /// Watches from a resourceVersion at or below this get 410 Gone.
    compacted: u64,
    down: bool,
    /// Objects per collection path, by (namespace, name).
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    /// Every change: (resourceVersion, collection path, event type, object).
    log: Vec<(u64, &'static str, &'static str, Value)>,
    /// Requests served, by "METHOD path?query" (for assertions on what was asked).
    requests: Vec<String>,
    /// Leases by (namespace, name).
    leases: BTreeMap<(String, String), Value>,
    /// Events posted, in order, with who posted them.
    events: Vec<(IpAddr, Value)>,
    /// Status patches, in order.
    status_patches: Vec<StatusPatch>,
    /// Collections (by kind) answered with this status code (403, 404) instead.
    refused: BTreeMap<String, u16>,
}

#[derive(Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    /// Bumped on every change, so open watches wake up.
    tick: watch::Sender<u64>,
}

fn lock(s: &Mutex<Store>) -> MutexGuard<'_, Store> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// The running fake API server.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Shared,
    task: Option<tokio::task::JoinHandle<()>>,
    /// For [`FakeApiServer::spawn_in`]: the thread running the server's runtime, and
    /// how to stop it.
    thread: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some((stop, thread)) = self.thread.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

/// Serves on `addr` (first with `listener`) while up; while down, nothing listens.
async fn serve(addr: SocketAddr, listener: tokio::net::TcpListener, shared: Shared) {
    let mut listener = Some(listener);
    let mut tick = shared.tick.subscribe();
    loop {
        let down = lock(&shared.store).down;
        if down {
            listener = None;
            if tick.changed().await.is_err() {
                return;
            }
            continue;
        }
        let Some(l) = listener.take() else {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => listener = Some(l),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            continue;
        };
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let mut until_down = shared.tick.subscribe();
        let state = shared.store.clone();
        let shutdown = async move {
            while !lock(&state).down {
                if until_down.changed().await.is_err() {
                    return;
                }
            }
        };
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let _ = axum::serve(l, app).with_graceful_shutdown(shutdown).await;
    }
}

impl FakeApiServer {
    /// Serves on `127.0.0.1:0` of the current network namespace (call it from a
    /// runtime running inside a test's namespace).
    pub async fn start() -> Result<FakeApiServer> {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves on `addr` (port 0: any) from the current runtime.
    pub async fn start_at(addr: SocketAddr) -> Result<FakeApiServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Shared {
            store: Arc::new(Mutex::new(Store::default())),
            tick: watch::channel(0).0,
        };
        let task = Some(tokio::spawn(serve(addr, listener, shared.clone())));
        Ok(FakeApiServer {
            addr,
            shared,
            task,
            thread: None,
        })
    }

    /// Serves on `addr` inside the namespace `ns`, from a thread of its own (for
    /// tests without a runtime: the agent under test then reaches it over the lab's
    /// network, as a real node reaches its API server).
    pub fn spawn_in(ns: &crate::netns::Netns, addr: SocketAddr) -> Result<FakeApiServer> {
        let path = ns.path();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let ready = tx.clone();
            let run = move || -> Result<()> {
                crate::netns::enter_here(&path)?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let server = FakeApiServer::start_at(addr).await?;
                    let handle = (server.addr, server.shared.clone());
                    let _ = ready.send(Ok(handle));
                    let _ = stopped.await;
                    drop(server);
                    Ok(())
                })
            };
            if let Err(e) = run() {
                let _ = tx.send(Err(e));
            }
        });
        let (addr, shared) = rx.recv().context("the fake API server thread ended")??;
        Ok(FakeApiServer {
            addr,
            shared,
            task: None,
            thread: Some((stop, thread)),
        })
    }

    /// `http://ADDR:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (ADDED or MODIFIED), giving it the next
    /// resourceVersion. `object` must carry `apiVersion`, `kind` and `metadata.name`.
    pub fn put_value(&self, mut object: Value) -> Result<()> {
        let kind = object["kind"]
            .as_str()
            .context("object without kind")?
            .to_string();
        let c = COLLECTIONS
            .iter()
            .find(|c| c.kind == kind)
            .with_context(|| format!("no collection for kind {kind}"))?;
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without metadata.name")?
            .to_string();
        let mut s = lock(&self.shared.store);
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let objects = s.objects.entry(c.path).or_default();
        let kind = if objects.insert((ns, name), object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.log.push((rv, c.path, kind, object));
        drop(s);
        self.shared.tick.send_modify(|t| *t += 1);
        Ok(())
    }

    /// [`put_value`](Self::put_value) of a k8s-openapi object, serialised as the real
    /// API server would send it (with `apiVersion` and `kind`).
    pub fn put<K: serde::Serialize>(&self, object: &K) -> Result<()> {
        self.put_value(serde_json::to_value(object)?)
    }

    /// Stores every document of a multi-document YAML text, each through its
    /// k8s-openapi type where it has one (Service, EndpointSlice, Node, Namespace,
    /// Secret: `data` base64-encoded), as the API
    /// server would serialise it; other kinds (xlb.dev) as written.
    pub fn put_yaml(&self, text: &str) -> Result<()> {
        use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
        use serde::Deserialize;
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let doc = Value::deserialize(doc).context("test YAML")?;
            match doc["kind"].as_str() {
                None if doc.is_null() => {}
                Some("Service") => self.put(&serde_json::from_value::<core::Service>(doc)?)?,
                Some("EndpointSlice") => {
                    self.put(&serde_json::from_value::<discovery::EndpointSlice>(doc)?)?
                }
                Some("Node") => self.put(&serde_json::from_value::<core::Node>(doc)?)?,
                Some("Namespace") => self.put(&serde_json::from_value::<core::Namespace>(doc)?)?,
                Some("Secret") => self.put(&serde_json::from_value::<core::Secret>(doc)?)?,
                _ => self.put_value(doc)?,
            }
        }
        Ok(())
    }

    /// A kubeconfig for this server (no TLS, no credentials), as YAML.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]
users: [{{name: fake, user: {{}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]
current-context: fake
",
            self.url()
        )
    }

    /// Deletes an object (DELETED with the object's last state).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let c = COLLECTIONS
            .iter()
            .find(|c| c.kind == kind)
            .with_context(|| format!("no collection for kind {kind}"))?;
        let mut s = lock(&self.shared.store);
        let mut object = s
            .objects
            .entry(c.path)
            .or_default()
            .remove(&(namespace.to_string(), name.to_string()))
            .with_context(|| format!("no {kind} {namespace}/{name}"))?;
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.log.push((rv, c.path, "DELETED", object));
        drop(s);
        self.shared.tick.send_modify(|t| *t += 1);
        Ok(())
    }

    /// Forgets history up to now, as etcd compaction does: a watch resuming from an
    /// older resourceVersion gets `410 Gone` and must list again. Open watches are
    /// ended so that they resume (and meet the 410).
    pub fn compact(&self) {
        let mut s = lock(&self.shared.store);
        s.compacted = s.rv;
        s.log.clear();
        drop(s);
        self.shared.tick.send_modify(|t| *t += 1);
    }

    /// Stops listening (new connections are refused, open watches end), or listens
    /// again on the same address.
    pub fn set_down(&self, down: bool) {
        lock(&self.shared.store).down = down;
        self.shared.tick.send_modify(|t| *t += 1);
    }

    /// Answers every request for `kind`'s collection with `code` from now on: 403 as
    /// when the client's RBAC lacks the resource, 404 as when its CRD is not
    /// installed; `None` serves it again. Open watches of it end.
    pub fn refuse(&self, kind: &str, code: Option<u16>) -> Result<()> {
        anyhow::ensure!(
            COLLECTIONS.iter().any(|c| c.kind == kind),
            "no collection for kind {kind}"
        );
        let mut s = lock(&self.shared.store);
        match code {
            Some(code) => s.refused.insert(kind.to_string(), code),
            None => s.refused.remove(kind),
        };
        drop(s);
        self.shared.tick.send_modify(|t| *t += 1);
        Ok(())
    }

    /// The requests served so far, as "GET /path?query".
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.store).requests.clone()
    }

    /// The status patches of Services so far.
    pub fn status_patches(&self) -> Vec<StatusPatch> {
        lock(&self.shared.store).status_patches.clone()
    }

    /// The Events posted so far, with the address each came from.
    pub fn events(&self) -> Result<Vec<(IpAddr, k8s_openapi::api::events::v1::Event)>> {
        let events = lock(&self.shared.store).events.clone();
        events
            .into_iter()
            .map(|(from, e)| Ok((from, serde_json::from_value(e).context("a stored Event")?)))
            .collect()
    }

    /// A Lease as stored.
    pub fn lease(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<k8s_openapi::api::coordination::v1::Lease>> {
        let key = (namespace.to_string(), name.to_string());
        let lease = lock(&self.shared.store).leases.get(&key).cloned();
        lease
            .map(|l| serde_json::from_value(l).context("the stored Lease"))
            .transpose()
    }

    /// A stored Service, as the API server would send it.
    pub fn service(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<k8s_openapi::api::core::v1::Service>> {
        let key = (namespace.to_string(), name.to_string());
        let svc = lock(&self.shared.store)
            .objects
            .get("/api/v1/services")
            .and_then(|m| m.get(&key))
            .cloned();
        svc.map(|s| serde_json::from_value(s).context("the stored Service"))
            .transpose()
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn reply(code: StatusCode, body: Value) -> Response {
    (code, axum::Json(body)).into_response()
}

/// The writes the IPAM leader makes (status, Leases, Events); `None`: not one of them.
fn write(
    shared: &Shared,
    peer: SocketAddr,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Option<Response> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let bad = |m: &str| Some(reply(StatusCode::BAD_REQUEST, status(400, "BadRequest", m)));
    let parsed = || serde_json::from_slice::<Value>(body);
    match (method.as_str(), parts.as_slice()) {
        ("PATCH", ["api", "v1", "namespaces", ns, "services", name, "status"]) => {
            let Ok(patch) = parsed() else {
                return bad("the patch is not JSON");
            };
            let mut s = lock(&shared.store);
            let key = (ns.to_string(), name.to_string());
            let Some(mut object) = s
                .objects
                .get("/api/v1/services")
                .and_then(|m| m.get(&key))
                .cloned()
            else {
                let m = format!("services \"{name}\" not found");
                return Some(reply(StatusCode::NOT_FOUND, status(404, "NotFound", &m)));
            };
            // The status subresource changes status only.
            if let Some(st) = patch.get("status") {
                merge(&mut object["status"], st);
            }
            s.rv += 1;
            let rv = s.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            s.objects
                .entry("/api/v1/services")
                .or_default()
                .insert(key, object.clone());
            s.log
                .push((rv, "/api/v1/services", "MODIFIED", object.clone()));
            s.status_patches.push(StatusPatch {
                from: peer.ip(),
                namespace: ns.to_string(),
                name: name.to_string(),
                patch,
            });
            drop(s);
            shared.tick.send_modify(|t| *t += 1);
            Some(reply(StatusCode::OK, object))
        }
        (
            "GET",
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
                name,
            ],
        ) => {
            let s = lock(&shared.store);
            Some(match s.leases.get(&(ns.to_string(), name.to_string())) {
                Some(l) => reply(StatusCode::OK, l.clone()),
                None => {
                    let m = format!("leases.coordination.k8s.io \"{name}\" not found");
                    reply(StatusCode::NOT_FOUND, status(404, "NotFound", &m))
                }
            })
        }
        (
            "POST",
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
            ],
        )
        | (
            "PUT",
            [
                "apis",
                "coordination.k8s.io",
                "v1",
                "namespaces",
                ns,
                "leases",
                _,
            ],
        ) => {
            let Ok(mut lease) = parsed() else {
                return bad("the Lease is not JSON");
            };
            let Some(name) = lease["metadata"]["name"].as_str().map(String::from) else {
                return bad("a Lease without metadata.name");
            };
            let mut s = lock(&shared.store);
            let key = (ns.to_string(), name.clone());
            let stored = s
                .leases
                .get(&key)
                .map(|l| l["metadata"]["resourceVersion"].clone());
            let conflict = match (method.as_str(), stored) {
                ("POST", Some(_)) => Some((
                    "AlreadyExists",
                    format!("leases.coordination.k8s.io \"{name}\" already exists"),
                )),
                ("PUT", None) => {
                    let m = format!("leases.coordination.k8s.io \"{name}\" not found");
                    return Some(reply(StatusCode::NOT_FOUND, status(404, "NotFound", &m)));
                }
                ("PUT", Some(rv)) if rv != lease["metadata"]["resourceVersion"] => Some((
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                )),
                _ => None,
            };
            if let Some((reason, m)) = conflict {
                return Some(reply(StatusCode::CONFLICT, status(409, reason, &m)));
            }
            s.rv += 1;
            lease["apiVersion"] = json!("coordination.k8s.io/v1");
            lease["kind"] = json!("Lease");
            lease["metadata"]["namespace"] = json!(ns);
            lease["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.leases.insert(key, lease.clone());
            let code = if method == Method::POST {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Some(reply(code, lease))
        }
        ("POST", ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            let Ok(mut event) = parsed() else {
                return bad("the Event is not JSON");
            };
            let mut s = lock(&shared.store);
            s.rv += 1;
            if event["metadata"]["name"].as_str().is_none() {
                let prefix = event["metadata"]["generateName"].as_str().unwrap_or("");
                event["metadata"]["name"] = json!(format!("{prefix}{:x}", s.rv));
            }
            event["apiVersion"] = json!("events.k8s.io/v1");
            event["kind"] = json!("Event");
            event["metadata"]["namespace"] = json!(ns);
            event["metadata"]["resourceVersion"] = json!(s.rv.to_string());
            s.events.push((peer.ip(), event.clone()));
            Some(reply(StatusCode::CREATED, event))
        }
        _ => None,
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

async fn handle(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    {
        let mut s = lock(&shared.store);
        s.requests.push(format!("{method} {uri}"));
        if s.down {
            let body = status(503, "ServiceUnavailable", "the fake API server is down");
            return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        }
    }
    if let Some(r) = write(&shared, peer, &method, &path, &body) {
        return r;
    }
    if method != Method::GET {
        let m = format!("{method} {path} is not served by the fake API server");
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed", &m),
        );
    }
    let not_found = || {
        let body = status(
            404,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        );
        (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
    };
    let Some((c, namespace)) = Collection::find(&path) else {
        return not_found();
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    let refused = lock(&shared.store).refused.get(c.kind).copied();
    match refused {
        Some(404) => return not_found(),
        Some(code) => {
            // As the API server words an RBAC denial (an authorization failure is 403
            // Forbidden with the resource in `details`).
            let (plural, group) = c.resource();
            let verb = if watching { "watch" } else { "list" };
            let scope = match &namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".to_string(),
            };
            let qualified = if group.is_empty() {
                plural.to_string()
            } else {
                format!("{plural}.{group}")
            };
            let message = format!(
                "{qualified} is forbidden: User \"system:serviceaccount:xlb-system:xlb\" cannot {verb} resource \"{plural}\" in API group \"{group}\" {scope}"
            );
            let mut body = status(code, "Forbidden", &message);
            body["details"] = json!({"group": group, "kind": plural});
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::FORBIDDEN);
            return (code, axum::Json(body)).into_response();
        }
        None => {}
    }
    if !watching {
        let s = lock(&shared.store);
        let items: Vec<Value> = s
            .objects
            .get(c.path)
            .map(|m| {
                m.values()
                    .filter(|o| in_namespace(o, namespace.as_deref()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let list = json!({
            "apiVersion": c.api_version,
            "kind": format!("{}List", c.kind),
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        return axum::Json(list).into_response();
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(300), Duration::from_secs);
    let stream = watch_stream(shared, c, namespace, from, bookmarks, timeout);
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The JSON lines of one watch: what happened after `from`, then what happens, until
/// `timeout`, compaction past it, or the server going down.
fn watch_stream(
    shared: Shared,
    c: Collection,
    namespace: Option<String>,
    from: u64,
    bookmarks: bool,
    timeout: Duration,
) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let tick = shared.tick.subscribe();
    let state = (shared, tick, from, bookmarks, false);
    futures::stream::unfold(
        state,
        move |(shared, mut tick, mut seen, bookmark, done)| {
            let namespace = namespace.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let line = {
                        let s = lock(&shared.store);
                        if s.down || s.refused.contains_key(c.kind) {
                            return None;
                        }
                        if seen < s.compacted {
                            let gone = status(
                                410,
                                "Expired",
                                &format!("too old resource version: {seen} ({})", s.compacted),
                            );
                            let line = json!({"type": "ERROR", "object": gone}).to_string() + "\n";
                            return Some((Ok(line), (shared.clone(), tick, seen, false, true)));
                        }
                        if bookmark {
                            // Everything up to `seen` has been sent (it is where the watch
                            // started), so that is what the bookmark may say.
                            let object = json!({
                                "apiVersion": c.api_version, "kind": c.kind,
                                "metadata": {"resourceVersion": seen.to_string()},
                            });
                            let line =
                                json!({"type": "BOOKMARK", "object": object}).to_string() + "\n";
                            drop(s);
                            return Some((Ok(line), (shared, tick, seen, false, false)));
                        }
                        s.log
                            .iter()
                            .find(|(rv, path, _, object)| {
                                *rv > seen
                                    && *path == c.path
                                    && in_namespace(object, namespace.as_deref())
                            })
                            .map(|(rv, _, kind, object)| {
                                (
                                    *rv,
                                    json!({"type": kind, "object": object}).to_string() + "\n",
                                )
                            })
                    };
                    if let Some((rv, line)) = line {
                        seen = rv;
                        return Some((Ok(line), (shared, tick, seen, false, false)));
                    }
                    // Nothing new: wait for a change, or end at the timeout.
                    tokio::select! {
                        r = tick.changed() => if r.is_err() { return None; },
                        _ = tokio::time::sleep_until(deadline) => return None,
                    }
                }
            }
        },
    )
}
