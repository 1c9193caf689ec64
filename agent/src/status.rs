//! Service status and Events, with the Kubernetes API source: a side branch off the
//! model (like L2's plan), written by the IPAM leader only ([`crate::leader`]).
//!
//! Every agent computes the same allocation from the same objects ([`crate::ipam`]);
//! the leader writes the addresses each Service holds (allocated, or named and
//! allowed by the sharing rules) to its `status.loadBalancer.ingress` (a merge PATCH of the `status` subresource), which
//! then comes back through the watch and is what every agent serves from then on
//! (recovered, never reshuffled: see `AddressRequest::from_status`). Problems
//! (unknown pool, pools exhausted, no pool admits the Service, two Services claiming
//! one address against the sharing rules, an address named or in status that no
//! pool holds) become `events.k8s.io/v1` Warning Events on the Service, once per
//! distinct problem and leader term. Nothing here feeds the model except through the
//! objects the API server sends back.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{core::v1 as core, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    ipam,
    model::{ConfigError, ErrorKind, ServiceRef, ServiceType, Snapshot},
};

/// `reportingController` of xlb's Events.
pub const CONTROLLER: &str = "xlb.dev/ipam";

/// What the leader should write, from one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Services of the API whose status does not show the addresses they hold
    /// (allocated, one per family, or named and allowed by the sharing rules).
    pub pending: BTreeMap<ServiceRef, Vec<IpAddr>>,
    /// Problems to report on each Service of the API: (reason, note).
    pub problems: BTreeMap<ServiceRef, BTreeSet<(String, String)>>,
}

/// The Service an API origin (`kube:/api/v1/namespaces/NS/services/NAME`) names.
fn service_of(origin: &str) -> Option<ServiceRef> {
    let rest = origin.strip_prefix("kube:/api/v1/namespaces/")?;
    let (ns, name) = rest.split_once("/services/")?;
    (!name.contains('/')).then(|| ServiceRef::new(ns, name))
}

/// The Event reason for an error that concerns a Service's address, if it is one.
fn reason(e: &ConfigError) -> Option<&'static str> {
    match e.kind {
        ErrorKind::AddressUnavailable if e.message.starts_with("no AddressPool named") => {
            Some("AddressPoolUnknown")
        }
        ErrorKind::AddressUnavailable if e.message.starts_with("no free address") => {
            Some("AddressPoolExhausted")
        }
        ErrorKind::AddressUnavailable => Some("NoAddressPool"),
        ErrorKind::VipConflict => Some("AddressConflict"),
        ErrorKind::AddressRefused => Some("AddressRefused"),
        _ => None,
    }
}

/// The plan for `snapshot` and the errors of its load (model and desired state).
pub fn plan(snapshot: &Snapshot, errors: &[ConfigError]) -> Plan {
    let mut out = Plan::default();
    for (sref, svc) in &snapshot.services {
        if service_of(&svc.origin).is_none() || svc.service_type != ServiceType::LoadBalancer {
            continue;
        }
        let Some(req) = &svc.address_request else {
            continue;
        };
        let allocated = req.named.is_empty();
        // What it holds (allocated, or named and allowed by the sharing rules),
        // where status does not show it yet: `kubectl get svc` shows the address.
        if !svc.vips.is_empty() && svc.vips != req.status {
            out.pending.insert(sref.clone(), svc.vips.clone());
        }
        // An address it named (or one left in status) that no pool holds: served only
        // because status already shows it (`ipam` refuses it otherwise), as a Service
        // from before the pools were added.
        if !allocated {
            for ip in svc
                .vips
                .iter()
                .filter(|ip| !ipam::in_some_pool(snapshot, **ip))
            {
                let note = format!(
                    "{ip} is outside every AddressPool; kept because status already shows it"
                );
                out.problems
                    .entry(sref.clone())
                    .or_default()
                    .insert(("AddressOutsidePools".to_string(), note));
            }
        }
    }
    for e in errors {
        if let (Some(sref), Some(reason)) = (service_of(&e.origin), reason(e)) {
            let note = match e.field.as_str() {
                "" => e.message.clone(),
                f => format!("{f}: {}", e.message),
            };
            out.problems
                .entry(sref)
                .or_default()
                .insert((reason.to_string(), note));
        }
    }
    out
}

/// What the writer did in this leader term, so that it does each thing once.
#[derive(Debug, Default)]
struct Written {
    status: BTreeMap<ServiceRef, Vec<IpAddr>>,
    events: BTreeMap<ServiceRef, BTreeSet<(String, String)>>,
}

/// Writes what `plan` asks while `leads` is true; retries failed writes every few
/// seconds. `identity` is the Events' `reportingInstance`.
pub fn start(
    client: Client,
    identity: String,
    mut leads: watch::Receiver<bool>,
    mut plans: watch::Receiver<Arc<Plan>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut done = Written::default();
        let mut retry = tokio::time::interval(Duration::from_secs(3));
        loop {
            if *leads.borrow_and_update() {
                let plan = plans.borrow_and_update().clone();
                write(&client, &identity, &plan, &mut done).await;
            } else {
                done = Written::default();
            }
            tokio::select! {
                r = leads.changed() => if r.is_err() { return },
                r = plans.changed() => if r.is_err() { return },
                _ = retry.tick() => {}
            }
        }
    })
}

async fn write(client: &Client, identity: &str, plan: &Plan, done: &mut Written) {
    done.status.retain(|s, _| plan.pending.contains_key(s));
    for (sref, ips) in &plan.pending {
        if done.status.get(sref) == Some(ips) {
            continue;
        }
        let api: Api<core::Service> = Api::namespaced(client.clone(), &sref.namespace);
        let ingress: Vec<_> = ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect();
        let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
        match api
            .patch_status(&sref.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
                let ips = ips.join(",");
                info!(service = %sref, %ips, "addresses written to status.loadBalancer.ingress");
                done.status.insert(sref.clone(), plan.pending[sref].clone());
            }
            // The Service is gone: the next plan no longer has it.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => warn!(service = %sref, error = %e, "writing the Service's status; retrying"),
        }
    }
    done.events.retain(|s, _| plan.problems.contains_key(s));
    for (sref, problems) in &plan.problems {
        let seen = done.events.entry(sref.clone()).or_default();
        seen.retain(|p| problems.contains(p));
        for (reason, note) in problems {
            let key = (reason.clone(), note.clone());
            if seen.contains(&key) {
                continue;
            }
            match post_event(client, identity, sref, reason, note).await {
                Ok(()) => {
                    seen.insert(key);
                }
                Err(e) => warn!(service = %sref, error = %e, "posting an Event; retrying"),
            }
        }
    }
}

/// A Warning Event about `sref`.
fn event(identity: &str, sref: &ServiceRef, reason: &str, note: &str) -> Event {
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", sref.name)),
            namespace: Some(sref.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        type_: Some("Warning".to_string()),
        reason: Some(reason.to_string()),
        action: Some("AllocateAddress".to_string()),
        // The API server refuses notes over 1 kB.
        note: Some(note.chars().take(1000).collect()),
        reporting_controller: Some(CONTROLLER.to_string()),
        reporting_instance: Some(identity.to_string()),
        regarding: Some(core::ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Service".to_string()),
            namespace: Some(sref.namespace.clone()),
            name: Some(sref.name.clone()),
            ..core::ObjectReference::default()
        }),
        ..Event::default()
    }
}

async fn post_event(
    client: &Client,
    identity: &str,
    sref: &ServiceRef,
    reason: &str,
    note: &str,
) -> kube::Result<()> {
    let api: Api<Event> = Api::namespaced(client.clone(), &sref.namespace);
    api.create(&PostParams::default(), &event(identity, sref, reason, note))
        .await?;
    info!(service = %sref, reason, note, "Warning Event posted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AddressPool, AddressRequest, Service, TrafficPolicy};

    /// A Service whose `vips` were allocated, or (`from_status`) recovered.
    fn svc(origin: &str, vips: &[&str], from_status: bool) -> Service {
        let vips: Vec<IpAddr> = vips.iter().map(|v| v.parse().unwrap()).collect();
        Service {
            service_type: ServiceType::LoadBalancer,
            vips: vips.clone(),
            external_ips: vec![],
            traffic_policy: TrafficPolicy::Cluster,
            source_ranges: vec![],
            affinity_timeout: None,
            health_check_node_port: None,
            ports: vec![],
            created: None,
            labels: BTreeMap::new(),
            sharing_key: None,
            selector: BTreeMap::new(),
            static_service: None,
            address_request: Some(AddressRequest {
                named: if from_status { vips.clone() } else { vec![] },
                status: if from_status { vips } else { vec![] },
                from_status,
                ..AddressRequest::default()
            }),
            origin: origin.to_string(),
        }
    }

    #[test]
    fn only_allocated_addresses_of_api_services_are_pending() {
        let mut snap = Snapshot::default();
        let o = |n: &str| format!("kube:/api/v1/namespaces/shop/services/{n}");
        snap.services.insert(
            ServiceRef::new("shop", "new"),
            svc(&o("new"), &["192.0.2.1"], false),
        );
        snap.services.insert(
            ServiceRef::new("shop", "done"),
            svc(&o("done"), &["192.0.2.2"], true),
        );
        snap.services
            .insert(ServiceRef::new("shop", "none"), svc(&o("none"), &[], false));
        snap.services.insert(
            ServiceRef::new("shop", "file"),
            svc("m/web.yaml", &["192.0.2.3"], false),
        );
        let p = plan(&snap, &[]);
        let want = BTreeMap::from([(
            ServiceRef::new("shop", "new"),
            vec!["192.0.2.1".parse().unwrap()],
        )]);
        assert_eq!(p.pending, want);
        // No pools: nothing is outside them.
        assert!(p.problems.is_empty());
        snap.address_pools.insert(
            "p".into(),
            AddressPool {
                ranges: vec![("192.0.2.0".parse().unwrap(), "192.0.2.1".parse().unwrap())],
                ..AddressPool::default()
            },
        );
        let p = plan(&snap, &[]);
        let outside: Vec<&ServiceRef> = p.problems.keys().collect();
        assert_eq!(outside, [&ServiceRef::new("shop", "done")]);
        assert!(
            p.problems[outside[0]]
                .iter()
                .all(|(r, _)| r == "AddressOutsidePools")
        );
    }

    #[test]
    fn address_errors_become_problems_with_a_reason() {
        let e = |message: &str, kind| ConfigError {
            origin: "kube:/api/v1/namespaces/shop/services/web".into(),
            object: "Service shop/web".into(),
            field: String::new(),
            message: message.into(),
            kind,
        };
        let errors = [
            e(
                "no free address in public; no address assigned",
                ErrorKind::AddressUnavailable,
            ),
            e(
                "no AddressPool named \"x\"; no address assigned",
                ErrorKind::AddressUnavailable,
            ),
            e(
                "port 80 of 192.0.2.1 is served by shop/db",
                ErrorKind::VipConflict,
            ),
            e("bad", ErrorKind::InvalidValue),
        ];
        let p = plan(&Snapshot::default(), &errors);
        let reasons: Vec<&str> = p.problems[&ServiceRef::new("shop", "web")]
            .iter()
            .map(|(r, _)| r.as_str())
            .collect();
        assert_eq!(
            reasons,
            [
                "AddressConflict",
                "AddressPoolExhausted",
                "AddressPoolUnknown"
            ]
        );
        assert_eq!(
            service_of("kube:/apis/xlb.dev/v1alpha1/namespaces/a/staticservices/b"),
            None
        );
    }
}
