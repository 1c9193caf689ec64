//! IPAM on the Kubernetes API source (issue 18, tests 1, 2 and 4), against the fake
//! API server (`xlb_lab::apiserver`) in the client's namespace:
//!
//! - a Service without an address gets one from the pool that admits it; the leader
//!   PATCHes it into `status.loadBalancer.ingress` and the dataplane serves it with
//!   real packets; after a restart the address is recovered from status, not
//!   reshuffled, even though a new pool would now be preferred;
//! - an unknown pool, an exhausted pool, an address named outside every pool and two
//!   Services naming one address become Warning Events on the Service, once each;
//! - two agents, one Lease: only the holder writes status; killing it hands over,
//!   and the next Service gets an address of its own.
//!
//! Needs root and the built binary (`XLB_BIN`, else `target/release/xlb`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use xlb_lab::agent::xlb_bin;
use xlb_lab::apiserver::FakeApiServer;
use xlb_lab::lab::{CLIENT_ADDR, Lab, NodeSpec, SOON};
use xlb_lab::manifests::{
    EndpointSpec, WEB_NAMESPACE, multi_doc, service_yaml, web_ports, web_slice_yaml,
};
use xlb_lab::poll;

const STEP: Duration = Duration::from_millis(100);
/// Short, so that a killed leader is replaced within seconds.
const LEASE: &str = "3s";

/// An `xlb.dev/v1alpha1 AddressPool`.
fn pool(name: &str, cidr: &str, extra: &str) -> String {
    format!(
        "apiVersion: xlb.dev/v1alpha1\nkind: AddressPool\nmetadata: {{name: {name}, namespace: xlb-system}}\n\
         spec:\n  addresses: [\"{cidr}\"]\n{extra}"
    )
}

/// A LoadBalancer Service in `demo` naming no address, with `annotations` (YAML
/// lines under `metadata.annotations`, or empty).
fn service(name: &str, annotations: &[(&str, &str)]) -> String {
    let mut y = service_yaml(WEB_NAMESPACE, name, "", &web_ports(), false)
        .replace("  loadBalancerIP: \"\"\n", "");
    if !annotations.is_empty() {
        let lines: String = annotations
            .iter()
            .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
            .collect();
        y = y.replace(
            &format!("  namespace: {WEB_NAMESPACE}\n"),
            &format!("  namespace: {WEB_NAMESPACE}\n  annotations:\n{lines}"),
        );
    }
    y
}

/// The address the status PATCH for `demo/name` wrote (the last one), if any.
fn patched(api: &FakeApiServer, name: &str) -> Option<(IpAddr, IpAddr)> {
    api.status_patches()
        .iter()
        .rev()
        .find(|p| p.namespace == WEB_NAMESPACE && p.name == name)
        .and_then(|p| {
            let ip = p.patch["status"]["loadBalancer"]["ingress"][0]["ip"].as_str()?;
            Some((p.from, ip.parse().ok()?))
        })
}

/// Polls until `demo/name`'s status has been PATCHed; (who, address).
fn wait_patched(api: &FakeApiServer, name: &str) -> Result<(IpAddr, IpAddr)> {
    poll(&format!("status PATCH of demo/{name}"), SOON, STEP, || {
        Ok(patched(api, name))
    })
}

fn patches_of(api: &FakeApiServer, name: &str) -> usize {
    api.status_patches()
        .iter()
        .filter(|p| p.namespace == WEB_NAMESPACE && p.name == name)
        .count()
}

/// Warning Events about `demo/name` with `reason`.
fn events(api: &FakeApiServer, name: &str, reason: &str) -> Result<usize> {
    Ok(api
        .events()?
        .iter()
        .filter(|(_, e)| {
            e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.regarding.as_ref().and_then(|r| r.namespace.as_deref()) == Some(WEB_NAMESPACE)
        })
        .count())
}

fn in_range(ip: IpAddr, first: [u8; 4], count: u32) -> bool {
    let first = u32::from(Ipv4Addr::from(first));
    matches!(ip, IpAddr::V4(v) if (first..first + count).contains(&u32::from(v)))
}

fn holder(api: &FakeApiServer) -> Result<Option<String>> {
    Ok(api
        .lease("xlb-system", "xlb-ipam")?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

/// The pods that new connections to `vip:80` reached.
fn reached(lab: &Lab, vip: IpAddr) -> Result<BTreeSet<String>> {
    let replies = lab
        .client
        .tcp_flows(SocketAddr::new(vip, 80), 10, Duration::from_secs(2))?;
    Ok(replies.into_iter().map(|r| r.server).collect())
}

fn kube_args(lab: &Lab, api: &FakeApiServer) -> Result<Vec<String>> {
    let kubeconfig = lab.scratch().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    Ok(vec![
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--lease-duration".into(),
        LEASE.into(),
    ])
}

#[test]
fn a_service_gets_an_address_from_its_pool_in_status_and_problems_become_events() -> Result<()> {
    let mut lab = Lab::one_node(2)?;
    let api = FakeApiServer::spawn_in(&lab.client.ns, SocketAddr::from((CLIENT_ADDR, 0)))?;
    let node = lab.node().name.clone();
    let eps: Vec<EndpointSpec> = lab
        .node()
        .pods
        .iter()
        .map(|p| EndpointSpec::new(p.ip, true, &node))
        .collect();
    let pods: BTreeSet<String> = lab.node().pods.iter().map(|p| p.name.clone()).collect();
    api.put_yaml(&multi_doc(&[
        // Preferred, but not for demo: never used here.
        pool(
            "elsewhere",
            "10.0.100.32/28",
            "  serviceAllocation: {priority: 1, namespaces: [other]}\n",
        ),
        pool(
            "lab",
            "10.0.100.16/28",
            "  serviceAllocation: {priority: 2, namespaces: [demo]}\n",
        ),
        pool("tiny", "10.0.100.48/32", "  autoAssign: false\n"),
        service("web", &[]),
        web_slice_yaml(&eps),
    ]))?;
    let args = kube_args(&lab, &api)?;
    lab.node_mut().agent_args.extend(args);
    lab.start_agent()?.wait_healthy(SOON)?;

    // Test 1: the address comes from the pool admitting demo, is PATCHed into status
    // by the leader (the only agent), and is served.
    let (from, vip) = wait_patched(&api, "web")?;
    ensure!(
        in_range(vip, [10, 0, 100, 16], 16),
        "{vip} is not from pool lab"
    );
    ensure!(
        from == IpAddr::V4(lab.node().host.addr),
        "patched by {from}"
    );
    let stored = api
        .service(WEB_NAMESPACE, "web")?
        .context("demo/web gone")?;
    let ingress = stored
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .unwrap_or_default();
    ensure!(
        ingress.len() == 1 && ingress[0].ip.as_deref() == Some(vip.to_string().as_str()),
        "stored status: {ingress:?}"
    );
    ensure!(
        holder(&api)?.as_deref() == Some(node.as_str()),
        "Lease holder"
    );
    poll("the allocated VIP served", SOON, STEP, || {
        Ok((reached(&lab, vip)? == pods).then_some(()))
    })?;
    println!("demo/web got {vip} (pool lab), written to status and served");

    // Test 2: an unknown pool and an exhausted one are Warning Events, once each.
    api.put_yaml(&multi_doc(&[
        service("t1", &[("xlb.dev/address-pool", "tiny")]),
        service("t2", &[("metallb.io/address-pool", "tiny")]),
        service("lost", &[("metallb.universe.tf/address-pool", "nope")]),
        // Named outside every pool: served as named, and warned about.
        service("named", &[("xlb.dev/loadBalancerIPs", "10.0.200.1")]),
        // Two Services naming one address with the same ports: one loses.
        service("clash-a", &[("metallb.io/loadBalancerIPs", "10.0.100.40")]),
        service("clash-b", &[("metallb.io/loadBalancerIPs", "10.0.100.40")]),
    ]))?;
    let (_, t1) = wait_patched(&api, "t1")?;
    ensure!(t1 == IpAddr::from([10, 0, 100, 48]), "t1 got {t1}");
    let clashes = || -> Result<(usize, usize)> {
        Ok((
            events(&api, "clash-a", "AddressConflict")?,
            events(&api, "clash-b", "AddressConflict")?,
        ))
    };
    poll("Warning Events for each problem", SOON, STEP, || {
        let (a, b) = clashes()?;
        Ok((events(&api, "lost", "AddressPoolUnknown")? == 1
            && events(&api, "t2", "AddressPoolExhausted")? == 1
            && events(&api, "named", "AddressOutsidePools")? == 1
            // One Event per contested port (TCP 80, UDP 53), on the loser only.
            && (a == 2) != (b == 2)
            && a + b == 2)
            .then_some(()))
    })?;
    let clashed = clashes()?;
    ensure!(patched(&api, "t2").is_none() && patched(&api, "lost").is_none());
    // Later syncs (another Service arriving) repeat nothing.
    api.put_yaml(&service("late", &[]))?;
    wait_patched(&api, "late")?;
    ensure!(
        events(&api, "lost", "AddressPoolUnknown")? == 1,
        "repeated Event"
    );
    ensure!(
        events(&api, "t2", "AddressPoolExhausted")? == 1,
        "repeated Event"
    );
    ensure!(
        events(&api, "named", "AddressOutsidePools")? == 1,
        "repeated Event"
    );
    ensure!(clashes()? == clashed, "repeated conflict Events");
    ensure!(patched(&api, "named").is_none() && patched(&api, "clash-a").is_none());
    ensure!(patches_of(&api, "web") == 1, "demo/web PATCHed again");

    // Restart with a pool the allocator would now prefer for demo/web: the address is
    // recovered from status, not reshuffled.
    lab.agent()?.stop()?;
    api.put_yaml(&pool(
        "first",
        "10.0.100.64/28",
        "  serviceAllocation: {priority: 0, namespaces: [demo]}\n",
    ))?;
    lab.agent()?.start_again()?;
    lab.agent()?.wait_healthy(SOON)?;
    api.put_yaml(&service("after", &[]))?;
    let (_, after) = wait_patched(&api, "after")?;
    ensure!(
        in_range(after, [10, 0, 100, 64], 16),
        "{after} is not from pool first"
    );
    ensure!(patches_of(&api, "web") == 1, "demo/web reshuffled");
    poll("demo/web still served on its address", SOON, STEP, || {
        Ok((reached(&lab, vip)? == pods).then_some(()))
    })?;
    Ok(())
}

#[test]
fn two_agents_one_lease_only_the_holder_writes_and_a_killed_one_hands_over() -> Result<()> {
    let mut lab = Lab::multi_node(&[NodeSpec::with_pods(1), NodeSpec::with_pods(1)])?;
    let api = FakeApiServer::spawn_in(&lab.client.ns, SocketAddr::from((CLIENT_ADDR, 0)))?;
    api.put_yaml(&multi_doc(&[
        pool("lab", "10.0.100.16/28", ""),
        service("one", &[]),
    ]))?;
    let args = kube_args(&lab, &api)?;
    let bin = xlb_bin()?;
    for node in &mut lab.nodes {
        node.agent_args.extend(args.clone());
        let dir = node.manifests_dir.clone();
        node.start_agent(&bin, &dir)?;
    }
    for node in &mut lab.nodes {
        node.agent()?.wait_healthy(SOON)?;
    }
    let (from, one) = wait_patched(&api, "one")?;
    let leader = poll("a Lease holder", SOON, STEP, || holder(&api))?;
    let leader_ip = IpAddr::V4(lab.node_named(&leader)?.host.addr);
    ensure!(
        from == leader_ip,
        "demo/one PATCHed by {from}, the leader is {leader}"
    );
    let writers: BTreeSet<IpAddr> = api.status_patches().iter().map(|p| p.from).collect();
    ensure!(
        writers == BTreeSet::from([leader_ip]),
        "writers: {writers:?}"
    );
    ensure!(patches_of(&api, "one") == 1, "demo/one PATCHed twice");

    // The leader dies without giving the Lease up: the other takes over once it has
    // expired, and writes the next Service's status.
    lab.node_named_mut(&leader)?.agent()?.kill()?;
    let other = lab
        .nodes
        .iter()
        .find(|n| n.name != leader)
        .context("a second node")?;
    let (other_name, other_ip) = (other.name.clone(), IpAddr::V4(other.host.addr));
    api.put_yaml(&service("two", &[]))?;
    let (from, two) = wait_patched(&api, "two")?;
    ensure!(
        from == other_ip,
        "demo/two PATCHed by {from}, not {other_name}"
    );
    ensure!(
        holder(&api)?.as_deref() == Some(other_name.as_str()),
        "Lease holder"
    );
    ensure!(one != two, "both Services got {one}");
    ensure!(
        patches_of(&api, "one") == 1,
        "demo/one PATCHed again after the handover"
    );
    println!("leader {leader} gave {one}; after it was killed {other_name} gave {two}");
    Ok(())
}
