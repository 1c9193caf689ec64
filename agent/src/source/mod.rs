//! Where the model comes from. Every source turns its input into one
//! [`Snapshot`] plus the errors it found; nothing downstream knows
//! which source it was.
//!
//! - [`manifests`]: a directory of Kubernetes manifests, watched with inotify (the
//!   embedded default and the way to run without an API server);
//! - [`kube`]: the Kubernetes API (kube-rs watchers), producing the same model.
//!
//! Both share the rules: [`convert`] turns one object into its part of the model (or
//! errors naming object and field), and [`assemble`] joins the objects of every
//! origin (a file, an API object) into the [`Snapshot`], object by object.
pub mod assemble;
pub mod convert;
pub mod kube;
pub mod manifests;

use std::{collections::BTreeSet, sync::Arc};

use crate::model::{ConfigError, ServiceRef, Snapshot};

/// What a load changed compared with the load before it, so that the reconciler can
/// recompute only that part of the desired state (one EndpointSlice changing among
/// 10,000 Services recomputes one Service, not 10,000).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Changed {
    /// Anything may have changed (the first load, a Node, a kind with cluster-wide
    /// effect): recompute everything.
    #[default]
    All,
    /// Only these Services (added, removed, or their object or EndpointSlices
    /// changed); the rest of the snapshot is as it was.
    Services(BTreeSet<ServiceRef>),
}

/// The result of one load: the model and the errors of this load.
///
/// `errors` is the complete list for the current input, not only new ones: the same
/// broken file yields the same errors on every load until it is fixed, so the caller
/// can report each distinct error once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    /// Everything that could be used, with the last good version of what is broken.
    /// Shared with the source, which keeps it up to date in place between loads.
    pub snapshot: Arc<Snapshot>,
    /// What differs from the previous load's snapshot.
    pub changed: Changed,
    /// What was wrong, each naming file, object and field.
    pub errors: Vec<ConfigError>,
    /// Files parsed by this load (unchanged files are not parsed again).
    pub parsed: usize,
    /// Load again after this long even without a change: a file that emptied is
    /// only believed once it stays empty (see the manifest source).
    pub recheck: Option<std::time::Duration>,
}

/// A source that cannot run at all (as opposed to bad input, which is a [`ConfigError`]).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// inotify could not be set up on the directory.
    #[error("inotify: {0}")]
    Watch(#[from] notify::Error),
}

/// The source an agent runs with, as the reconciler uses it.
pub enum Source {
    /// A manifest directory (`--manifests`).
    Manifests(manifests::ManifestSource),
    /// The Kubernetes API (`--kubeconfig`, or in-cluster).
    Kubernetes(kube::KubeSource),
}

impl Source {
    /// The whole model (every change reported), or `None` while the source has
    /// nothing complete to give (the API not listed yet).
    pub fn load(&mut self) -> Option<Loaded> {
        match self {
            Source::Manifests(m) => Some(m.load()),
            Source::Kubernetes(k) => k.load(),
        }
    }

    /// The model if anything changed since the last load.
    pub fn load_if_changed(&mut self) -> Option<Loaded> {
        match self {
            Source::Manifests(m) => m.load_if_changed(),
            Source::Kubernetes(k) => k.load_if_changed(),
        }
    }

    /// StaticService health verdicts (see the manifest source).
    pub fn set_health(&mut self, verdicts: std::collections::BTreeMap<crate::model::Probe, bool>) {
        match self {
            Source::Manifests(m) => m.set_health(verdicts),
            Source::Kubernetes(k) => k.set_health(verdicts),
        }
    }

    /// The API connection's state (`None` for a manifest directory).
    pub fn api_status(&self) -> Option<kube::ApiStatus> {
        match self {
            Source::Manifests(_) => None,
            Source::Kubernetes(k) => Some(k.status()),
        }
    }
}
