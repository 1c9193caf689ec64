//! Joins converted objects into the model and keeps it up to date object by object,
//! for any source: each source holds its objects by origin (a manifest file, an API
//! object) and tells the `Index` which origins changed; the index says which
//! Services that changed (see [`super::Changed`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
};

use super::{
    Changed,
    convert::{Body, Kind, Object, ObjectKey, SecretKey},
};
use crate::model::{self, ConfigError, Endpoint, ErrorKind, Probe, ServiceRef, Snapshot};

/// What a source holds per origin: the objects defined there, in order.
pub(crate) trait Document {
    /// The origin's objects (its last good versions).
    fn objects(&self) -> &[Object];
}

/// The model assembled from every file's objects, with what it takes to update it
/// when a few objects change instead of assembling it again: where each object is
/// defined, which EndpointSlices belong to which Service, and the errors of the
/// assembly by the object they concern.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Every definition of each object, in (path, position) order: the first is used,
    /// the others are duplicates.
    defs: BTreeMap<ObjectKey, Vec<(PathBuf, usize)>>,
    /// The EndpointSlices (by key) whose used definition names each Service.
    slices_of: BTreeMap<ServiceRef, BTreeSet<ObjectKey>>,
    /// The Service each used EndpointSlice definition names.
    slice_service: BTreeMap<ObjectKey, ServiceRef>,
    /// `duplicate_object` errors, by the object defined more than once.
    pub(crate) duplicates: BTreeMap<ObjectKey, Vec<ConfigError>>,
    /// Errors joining slices to a Service (unknown port names), by Service.
    pub(crate) join_errors: BTreeMap<ServiceRef, Vec<ConfigError>>,
    /// The assembled model.
    pub(crate) snapshot: Arc<Snapshot>,
    /// Nothing assembled yet: the next update is a whole one.
    pub(crate) empty: bool,
    /// Health check verdicts of StaticService backends (absent: not checked yet,
    /// taken as healthy), joined in as their endpoints' `ready`.
    verdicts: BTreeMap<Probe, bool>,
    /// Services whose endpoints a verdict changed since the last load.
    pub(crate) rechecked: BTreeSet<ServiceRef>,
    /// Addresses given to Services that asked for one (see [`crate::ipam`]).
    allocated: BTreeMap<ServiceRef, Vec<std::net::IpAddr>>,
    /// Why Services that asked for an address got none.
    pub(crate) ipam_errors: Vec<ConfigError>,
    /// Secrets by namespace and name: their `password` key (BGPPeer `passwordSecret`).
    secrets: BTreeMap<model::SecretRef, SecretKey>,
    /// Why BGPPeers naming a Secret have no key, by peer `namespace/name`.
    secret_errors: BTreeMap<String, ConfigError>,
}

impl Index {
    /// An index with nothing assembled yet: its first update is a whole one.
    pub(crate) fn new() -> Self {
        Index {
            empty: true,
            ..Index::default()
        }
    }

    /// The errors of the assembly (objects defined twice, slices joined to no port,
    /// addresses not given, Secrets not readable), for the source's load.
    pub(crate) fn errors(&self) -> impl Iterator<Item = &ConfigError> {
        self.duplicates
            .values()
            .flatten()
            .chain(self.join_errors.values().flatten())
            .chain(self.ipam_errors.iter())
            .chain(self.secret_errors.values())
    }

    /// Brings the model up to date after the files in `touched` changed (each with its
    /// objects before; its objects now are in `files`), and says what changed.
    ///
    /// Rules, as `kubectl apply` of the whole directory would see it: an object defined
    /// twice is used from the first file (then the first position) and reported where
    /// it is repeated; a slice joins the Service its `kubernetes.io/service-name` label
    /// names, in slice-name order.
    pub(crate) fn update<D: Document>(
        &mut self,
        files: &BTreeMap<PathBuf, D>,
        touched: Vec<(PathBuf, Vec<Object>)>,
    ) -> Changed {
        let whole = std::mem::take(&mut self.empty);
        let mut keys: BTreeSet<ObjectKey> = BTreeSet::new();
        for (path, old) in touched {
            let new = files.get(&path).map_or(&[][..], |f| f.objects());
            fn positions(objects: &[Object]) -> BTreeMap<&ObjectKey, Vec<usize>> {
                let mut at: BTreeMap<&ObjectKey, Vec<usize>> = BTreeMap::new();
                for (i, o) in objects.iter().enumerate() {
                    at.entry(&o.key).or_default().push(i);
                }
                at
            }
            let (was, now) = (positions(&old), positions(new));
            for (key, at) in &was {
                if now.get(key) != Some(at) || old[at[0]] != new[at[0]] {
                    keys.insert((*key).clone());
                }
                if let Some(defs) = self.defs.get_mut(*key) {
                    defs.retain(|(p, _)| *p != path);
                }
            }
            for (key, at) in now {
                if !was.contains_key(key) {
                    keys.insert(key.clone());
                }
                let defs = self.defs.entry(key.clone()).or_default();
                let from = defs.partition_point(|(p, _)| *p < path);
                defs.splice(from..from, at.into_iter().map(|i| (path.clone(), i)));
            }
        }
        if keys.is_empty() && !whole {
            return Changed::Services(BTreeSet::new());
        }
        let mut services: BTreeSet<ServiceRef> = BTreeSet::new();
        let mut all = whole;
        let mut keyed = whole;
        for key in keys {
            let used = self.used(files, &key);
            match self.defs.get(&key) {
                Some(defs) if defs.len() > 1 => {
                    let first = defs[0].0.display().to_string();
                    let errors = defs[1..]
                        .iter()
                        .map(|(p, _)| ConfigError {
                            origin: p.display().to_string(),
                            object: key.label(),
                            field: String::new(),
                            message: format!(
                                "already defined in {first}; this definition is ignored"
                            ),
                            kind: ErrorKind::DuplicateObject,
                        })
                        .collect();
                    self.duplicates.insert(key.clone(), errors);
                }
                _ => {
                    self.duplicates.remove(&key);
                }
            }
            match key.kind {
                Kind::Service | Kind::StaticService => {
                    services.insert(ServiceRef::new(&key.namespace, &key.name));
                }
                Kind::EndpointSlice => {
                    if let Some(was) = self.slice_service.remove(&key) {
                        if let Some(set) = self.slices_of.get_mut(&was) {
                            set.remove(&key);
                            if set.is_empty() {
                                self.slices_of.remove(&was);
                            }
                        }
                        services.insert(was);
                    }
                    if let Some((
                        _,
                        Object {
                            body: Body::Slice(slice),
                            ..
                        },
                    )) = used
                    {
                        let sref = ServiceRef::new(&key.namespace, &slice.service);
                        self.slices_of
                            .entry(sref.clone())
                            .or_default()
                            .insert(key.clone());
                        self.slice_service.insert(key.clone(), sref.clone());
                        services.insert(sref);
                    }
                }
                Kind::L2Announcement => {
                    // Which VIPs are announced where: not part of the desired maps,
                    // but the whole model is handed on again.
                    all = true;
                    let name = format!("{}/{}", key.namespace, key.name);
                    let l2 = &mut Arc::make_mut(&mut self.snapshot).l2_announcements;
                    upsert(l2, name, used.map(|(_, o)| &o.body), |b| match b {
                        Body::L2(a) => Some(a),
                        _ => None,
                    });
                }
                Kind::AddressPool => {
                    // Pools change which addresses Services get: everything again.
                    all = true;
                    let pools = &mut Arc::make_mut(&mut self.snapshot).address_pools;
                    upsert(
                        pools,
                        key.name.clone(),
                        used.map(|(_, o)| &o.body),
                        |b| match b {
                            Body::Pool(p) => Some(p),
                            _ => None,
                        },
                    );
                }
                Kind::Secret => {
                    // Only BGPPeers read Secrets: resolved below, and the model handed
                    // on again only if a peer's key changed.
                    keyed = true;
                    let name = model::SecretRef {
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                    };
                    match used {
                        Some((
                            _,
                            Object {
                                body: Body::Secret(k),
                                ..
                            },
                        )) => self.secrets.insert(name, k.clone()),
                        _ => self.secrets.remove(&name),
                    };
                }
                Kind::BgpPeer | Kind::BgpAnnouncement | Kind::BfdProfile => {
                    // What BGP announces where: not part of the desired maps, but the
                    // whole model is handed on again.
                    all = true;
                    keyed |= key.kind == Kind::BgpPeer;
                    let name = format!("{}/{}", key.namespace, key.name);
                    let bgp = &mut Arc::make_mut(&mut self.snapshot).bgp;
                    let body = used.map(|(_, o)| &o.body);
                    match key.kind {
                        Kind::BgpPeer => upsert(&mut bgp.peers, name, body, |b| match b {
                            Body::BgpPeer(p) => Some(p),
                            _ => None,
                        }),
                        Kind::BgpAnnouncement => {
                            upsert(&mut bgp.announcements, name, body, |b| match b {
                                Body::BgpAnnouncement(a) => Some(a),
                                _ => None,
                            })
                        }
                        // Peers name profiles alone, as MetalLB's do.
                        _ => upsert(&mut bgp.bfd_profiles, key.name.clone(), body, |b| match b {
                            Body::BfdProfile(p) => Some(p),
                            _ => None,
                        }),
                    }
                }
                Kind::Namespace => {
                    // Labels only matter to pools' namespaceSelectors: allocation
                    // below runs over the whole model and reports what it moved.
                    let namespaces = &mut Arc::make_mut(&mut self.snapshot).namespaces;
                    upsert(
                        namespaces,
                        key.name.clone(),
                        used.map(|(_, o)| &o.body),
                        |b| match b {
                            Body::Namespace(labels) => Some(labels),
                            _ => None,
                        },
                    );
                }
                Kind::Node => {
                    all = true;
                    match used {
                        Some((
                            _,
                            Object {
                                body: Body::Node(n),
                                ..
                            },
                        )) => {
                            let nodes = &mut Arc::make_mut(&mut self.snapshot).nodes;
                            nodes.insert(key.name.clone(), n.clone());
                        }
                        _ => {
                            Arc::make_mut(&mut self.snapshot).nodes.remove(&key.name);
                        }
                    }
                }
            }
            if self.defs.get(&key).is_some_and(Vec::is_empty) {
                self.defs.remove(&key);
            }
        }
        if keyed && self.resolve_passwords() {
            all = true;
        }
        let joined: Vec<_> = services.iter().map(|s| self.join(files, s)).collect();
        let snapshot = Arc::make_mut(&mut self.snapshot);
        for (sref, (svc, errors)) in services.iter().zip(joined) {
            match svc {
                Some(svc) => snapshot.services.insert(sref.clone(), svc),
                None => snapshot.services.remove(sref),
            };
            if errors.is_empty() {
                self.join_errors.remove(sref);
            } else {
                self.join_errors.insert(sref.clone(), errors);
            }
        }
        self.allocate(&mut services);
        if all {
            Changed::All
        } else {
            Changed::Services(services)
        }
    }

    /// Gives every BGPPeer with a `passwordSecret` the key its Secret holds now (none
    /// while the Secret or its key is missing or unusable, reported as an error);
    /// whether any peer's key changed.
    fn resolve_passwords(&mut self) -> bool {
        let mut changed = false;
        let mut errors = BTreeMap::new();
        let peers = &mut Arc::make_mut(&mut self.snapshot).bgp.peers;
        for (name, peer) in peers.iter_mut() {
            let Some(secret) = &peer.password_secret else {
                continue;
            };
            let why = match self.secrets.get(secret) {
                Some(SecretKey::Key(k)) => {
                    if peer.password.as_ref() != Some(k) {
                        peer.password = Some(k.clone());
                        changed = true;
                    }
                    continue;
                }
                Some(SecretKey::Invalid(why)) => (*why).to_string(),
                Some(SecretKey::Missing) => "it has no password key".to_string(),
                None => {
                    "not found (the Kubernetes API source reads Secrets in the agent's namespace only)"
                        .to_string()
                }
            };
            if peer.password.take().is_some() {
                changed = true;
            }
            errors.insert(
                name.clone(),
                ConfigError {
                    origin: peer.origin.clone(),
                    object: format!("BGPPeer {name}"),
                    field: "spec.passwordSecret".into(),
                    message: format!(
                        "Secret {secret}: {why}; the peer has no session until it has a key"
                    ),
                    kind: ErrorKind::SecretUnavailable,
                },
            );
        }
        self.secret_errors = errors;
        changed
    }

    /// The used definition of `key`: its file and object.
    fn used<'a, D: Document>(
        &self,
        files: &'a BTreeMap<PathBuf, D>,
        key: &ObjectKey,
    ) -> Option<(&'a PathBuf, &'a Object)> {
        let (path, i) = self.defs.get(key)?.first()?;
        let (path, file) = files.get_key_value(path)?;
        Some((path, file.objects().get(*i)?))
    }

    /// `sref`'s Service with the endpoints of its slices joined in (slices in name
    /// order, so endpoint order does not depend on file layout), and the errors of the
    /// join. `None` when there is no such Service of a type xlb serves; a slice of such
    /// a Service is simply unused.
    fn join<D: Document>(
        &self,
        files: &BTreeMap<PathBuf, D>,
        sref: &ServiceRef,
    ) -> (Option<model::Service>, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let key = |kind| ObjectKey {
            kind,
            namespace: sref.namespace.clone(),
            name: sref.name.clone(),
        };
        let (service, static_service) = (
            self.used(files, &key(Kind::Service)),
            self.used(files, &key(Kind::StaticService)),
        );
        if let (Some((first, _)), Some((path, _))) = (service, static_service) {
            errors.push(ConfigError {
                origin: path.display().to_string(),
                object: key(Kind::StaticService).label(),
                field: "metadata.name".into(),
                message: format!(
                    "Service {sref} (in {}) has the same namespace and name; this StaticService is ignored",
                    first.display()
                ),
                kind: ErrorKind::DuplicateObject,
            });
        }
        let Some((
            _,
            Object {
                body: Body::Service(Some(svc)),
                ..
            },
        )) = service.or(static_service)
        else {
            return (None, errors);
        };
        let mut svc = model::Service::clone(svc);
        if let Some(check) = svc
            .static_service
            .as_ref()
            .and_then(|s| s.health_check.clone())
        {
            for ep in svc.ports.iter_mut().flat_map(|p| &mut p.endpoints) {
                let probe = check.probe(std::net::SocketAddr::new(ep.addr, ep.port));
                ep.ready = self.verdicts.get(&probe).copied().unwrap_or(true);
                ep.serving = ep.ready;
            }
        }
        for slice_key in self.slices_of.get(sref).into_iter().flatten() {
            let Some((
                path,
                Object {
                    body: Body::Slice(slice),
                    ..
                },
            )) = self.used(files, slice_key)
            else {
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
                        origin: path.display().to_string(),
                        object: slice_key.label(),
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
        (Some(svc), errors)
    }

    /// Takes the health checker's verdicts (every probe's current one): StaticService
    /// backends whose verdict changed get it as their endpoints' `ready`, and the
    /// next load reports their Services as changed, as the kubelet's readiness probes
    /// reach Services through EndpointSlices.
    pub(crate) fn set_health<D: Document>(
        &mut self,
        files: &BTreeMap<PathBuf, D>,
        verdicts: BTreeMap<Probe, bool>,
    ) {
        let index = self;
        let changed: BTreeSet<&Probe> = verdicts
            .iter()
            .filter(|(p, v)| index.verdicts.get(*p).copied().unwrap_or(true) != **v)
            .map(|(p, _)| p)
            .chain(
                index
                    .verdicts
                    .iter()
                    .filter(|(p, v)| !**v && !verdicts.contains_key(*p))
                    .map(|(p, _)| p),
            )
            .collect();
        if changed.is_empty() {
            index.verdicts = verdicts;
            return;
        }
        let affected: Vec<ServiceRef> = index
            .snapshot
            .services
            .iter()
            .filter(|(_, svc)| {
                let Some(check) = svc
                    .static_service
                    .as_ref()
                    .and_then(|s| s.health_check.as_ref())
                else {
                    return false;
                };
                svc.ports.iter().flat_map(|p| &p.endpoints).any(|e| {
                    changed.contains(&check.probe(std::net::SocketAddr::new(e.addr, e.port)))
                })
            })
            .map(|(r, _)| r.clone())
            .collect();
        index.verdicts = verdicts;
        let joined: Vec<_> = affected.iter().map(|r| index.join(files, r)).collect();
        let snapshot = Arc::make_mut(&mut index.snapshot);
        for (sref, (svc, _)) in affected.into_iter().zip(joined) {
            if let Some(svc) = svc {
                snapshot.services.insert(sref.clone(), svc);
            }
            index.rechecked.insert(sref);
        }
    }

    /// Allocates addresses over the whole model (any change may change what is free)
    /// and writes them into the Services that asked, adding those whose address
    /// changed to `services`.
    fn allocate(&mut self, services: &mut BTreeSet<ServiceRef>) {
        // Without pools and nodes there is nothing to allocate or refuse.
        if self.snapshot.address_pools.is_empty()
            && self.allocated.is_empty()
            && self.snapshot.nodes.is_empty()
        {
            self.ipam_errors.clear();
            return;
        }
        let alloc = crate::ipam::allocate(&self.snapshot);
        let snapshot = Arc::make_mut(&mut self.snapshot);
        for (sref, svc) in snapshot.services.iter_mut() {
            if svc.address_request.is_none() {
                continue;
            }
            let want = alloc.addresses.get(sref).cloned().unwrap_or_default();
            if svc.vips != want {
                svc.vips = want;
                services.insert(sref.clone());
            }
        }
        // Without pools nothing is allocated: the next load may skip this.
        self.allocated = if self.snapshot.address_pools.is_empty() {
            BTreeMap::new()
        } else {
            alloc.addresses
        };
        self.ipam_errors = alloc.errors;
    }
}

/// Puts `body`'s value (picked by `pick`) under `name` in `map`, or removes `name`
/// when the object is gone.
fn upsert<T: Clone>(
    map: &mut std::collections::BTreeMap<String, T>,
    name: String,
    body: Option<&Body>,
    pick: impl Fn(&Body) -> Option<&T>,
) {
    match body.and_then(pick) {
        Some(v) => {
            map.insert(name, v.clone());
        }
        None => {
            map.remove(&name);
        }
    }
}
