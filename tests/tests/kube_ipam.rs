//! IPAM on the Kubernetes API source (issue 18, tests 1, 2 and 4), against the fake
//! API server (`xlb_lab::apiserver`) in the client's namespace:
//!
//! - a Service without an address gets one from the pool that admits it; the leader
//!   PATCHes it into `status.loadBalancer.ingress` and the dataplane serves it with
//!   real packets; after a restart the address is recovered from status, not
//!   reshuffled, even though a new pool would now be preferred;
//! - an unknown pool, an exhausted pool, an address named outside every pool (refused)
//!   and two Services naming one address become Warning Events on the Service, once
//!   each;
//! - the annotation matrix (xlb's and both MetalLB spellings of loadBalancerIPs,
//!   address-pool and allow-shared-ip, and `spec.loadBalancerIP`), MetalLB's sharing
//!   rules, `loadBalancerClass`, namespaceSelectors over Namespace labels and
//!   dual-stack, each asserted on the status PATCHes and Events;
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
        // Named outside every pool: refused (pools exist), and said so.
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
            && events(&api, "named", "AddressRefused")? == 1
            // One Event for the contested address, on the younger (here: by name,
            // the fixture sets no creationTimestamp) only.
            && (a, b) == (0, 1))
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
        events(&api, "named", "AddressRefused")? == 1,
        "repeated Event"
    );
    ensure!(clashes()? == clashed, "repeated conflict Events");
    // Named addresses it holds are shown in status too; the refused one's is not.
    ensure!(
        patched(&api, "named").is_none(),
        "an address outside every pool went to status"
    );
    ensure!(patched(&api, "clash-a").map(|p| p.1) == Some(IpAddr::from([10, 0, 100, 40])));
    ensure!(patched(&api, "clash-b").is_none());
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

/// A LoadBalancer Service `ns/name` for the matrix: `ports` as (port, protocol),
/// Local policy selecting `app` if given (else Cluster), `annotations`, and extra
/// `spec` lines.
fn svc(
    ns: &str,
    name: &str,
    annotations: &[(&str, &str)],
    ports: &[(u16, &str)],
    local_app: Option<&str>,
    spec: &str,
) -> String {
    let annotations: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let annotations = if annotations.is_empty() {
        String::new()
    } else {
        format!("  annotations:\n{annotations}")
    };
    let ports: String = ports
        .iter()
        .map(|(p, proto)| format!("  - {{name: p{p}, port: {p}, protocol: {proto}}}\n"))
        .collect();
    let (policy, app) = match local_app {
        Some(app) => ("Local", app),
        None => ("Cluster", name),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n{annotations}\
         spec:\n  type: LoadBalancer\n  externalTrafficPolicy: {policy}\n  selector: {{app: {app}}}\n{spec}  ports:\n{ports}"
    )
}

fn namespace(name: &str, tier: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{tier: {tier}}}}}\n"
    )
}

/// Every address of the last status PATCH of `ns/name`.
fn patched_all(api: &FakeApiServer, ns: &str, name: &str) -> Option<Vec<IpAddr>> {
    api.status_patches()
        .iter()
        .rev()
        .find(|p| p.namespace == ns && p.name == name)
        .map(|p| {
            p.patch["status"]["loadBalancer"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str()?.parse().ok())
                .collect()
        })
}

/// Every Event about `demo/name`, whatever its reason.
fn all_events(api: &FakeApiServer, name: &str) -> Result<usize> {
    Ok(api
        .events()?
        .iter()
        .filter(|(_, e)| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .count())
}

#[test]
fn the_annotation_matrix_sharing_rules_classes_and_namespace_selectors_on_status_and_events()
-> Result<()> {
    let mut lab = Lab::one_node(1)?;
    let api = FakeApiServer::spawn_in(&lab.client.ns, SocketAddr::from((CLIENT_ADDR, 0)))?;
    let d = WEB_NAMESPACE;
    let tcp = |p: u16| vec![(p, "TCP")];
    let shared = "10.0.102.20";
    let mut docs = vec![
        namespace(d, "gold"),
        namespace("other", "tin"),
        pool("m", "10.0.101.0/28", "  autoAssign: false\n"),
        pool(
            "gold",
            "10.0.103.0/28",
            "  serviceAllocation: {priority: 0, namespaceSelectors: [{matchLabels: {tier: gold}}]}\n",
        ),
        pool(
            "rest",
            "10.0.102.0/24",
            "  serviceAllocation: {priority: 5}\n",
        ),
        pool(
            "dual",
            "10.0.104.0/28",
            "  addresses: [\"10.0.104.0/28\", \"fd00:104::/124\"]\n  autoAssign: false\n",
        )
        .replace("  addresses: [\"10.0.104.0/28\"]\n", ""),
        // address-pool, in the three spellings.
        svc(
            d,
            "a-pool-xlb",
            &[("xlb.dev/address-pool", "m")],
            &tcp(80),
            None,
            "",
        ),
        svc(
            d,
            "a-pool-io",
            &[("metallb.io/address-pool", "m")],
            &tcp(80),
            None,
            "",
        ),
        svc(
            d,
            "a-pool-tf",
            &[("metallb.universe.tf/address-pool", "m")],
            &tcp(80),
            None,
            "",
        ),
        // Named addresses: spec, the three loadBalancerIPs spellings, xlb's first.
        svc(
            d,
            "b-spec",
            &[],
            &tcp(80),
            None,
            "  loadBalancerIP: 10.0.102.5\n",
        ),
        svc(
            d,
            "b-ips-xlb",
            &[("xlb.dev/loadBalancerIPs", "10.0.102.6")],
            &tcp(80),
            None,
            "",
        ),
        svc(
            d,
            "b-ips-io",
            &[("metallb.io/loadBalancerIPs", "10.0.102.7")],
            &tcp(80),
            None,
            "",
        ),
        svc(
            d,
            "b-ips-tf",
            &[("metallb.universe.tf/loadBalancerIPs", "10.0.102.8")],
            &tcp(80),
            None,
            "",
        ),
        svc(
            d,
            "b-ips-both",
            &[
                ("xlb.dev/loadBalancerIPs", "10.0.102.9"),
                ("metallb.io/loadBalancerIPs", "10.0.102.10"),
            ],
            &tcp(80),
            None,
            "",
        ),
        // allow-shared-ip, in the three spellings, on allocated addresses.
        svc(
            d,
            "c-share-1",
            &[("xlb.dev/allow-shared-ip", "k")],
            &tcp(80),
            None,
            "",
        ),
        svc(
            d,
            "c-share-2",
            &[("metallb.io/allow-shared-ip", "k")],
            &tcp(443),
            None,
            "",
        ),
        svc(
            d,
            "c-share-3",
            &[("metallb.universe.tf/allow-shared-ip", "k")],
            &[(53, "UDP")],
            None,
            "",
        ),
        // The loadBalancerClass: another implementation's, and xlb's.
        svc(
            d,
            "e-other-class",
            &[],
            &tcp(80),
            None,
            "  loadBalancerClass: other.io/lb\n",
        ),
        svc(
            d,
            "e-xlb-class",
            &[],
            &tcp(80),
            None,
            "  loadBalancerClass: xlb.dev/xlb\n",
        ),
        // Not a gold namespace: the open pool.
        svc("other", "f-tin", &[], &tcp(80), None, ""),
        // Dual-stack, from one pool.
        svc(
            d,
            "g-dual",
            &[("xlb.dev/address-pool", "dual")],
            &tcp(80),
            None,
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n",
        ),
    ];
    // Named sharing, MetalLB's rules: d-1 holds the address; d-2 may join it; the
    // others may not (a common port, another key, another selector with Local,
    // another policy).
    let key = |k| {
        [
            ("xlb.dev/loadBalancerIPs", shared),
            ("xlb.dev/allow-shared-ip", k),
        ]
    };
    docs.extend([
        svc(d, "d-1", &key("s"), &tcp(80), Some("x"), ""),
        svc(d, "d-2", &key("s"), &tcp(81), Some("x"), ""),
        svc(d, "d-port", &key("s"), &tcp(80), Some("x"), ""),
        svc(d, "d-key", &key("t"), &tcp(82), Some("x"), ""),
        svc(d, "d-sel", &key("s"), &tcp(83), Some("y"), ""),
        svc(d, "d-policy", &key("s"), &tcp(84), None, ""),
    ]);
    api.put_yaml(&multi_doc(&docs))?;
    let args = kube_args(&lab, &api)?;
    lab.node_mut().agent_args.extend(args);
    lab.start_agent()?.wait_healthy(SOON)?;

    let got = |name: &str| -> Result<Vec<IpAddr>> {
        poll(&format!("status PATCH of demo/{name}"), SOON, STEP, || {
            Ok(patched_all(&api, d, name))
        })
    };
    let pools: Vec<Vec<IpAddr>> = ["a-pool-xlb", "a-pool-io", "a-pool-tf"]
        .iter()
        .map(|n| got(n))
        .collect::<Result<_>>()?;
    for (n, ips) in pools.iter().enumerate() {
        ensure!(
            ips.len() == 1 && in_range(ips[0], [10, 0, 101, 0], 16),
            "a-pool #{n}: {ips:?} not from pool m"
        );
    }
    ensure!(
        pools[0] != pools[1] && pools[1] != pools[2] && pools[0] != pools[2],
        "{pools:?}"
    );
    for (name, want) in [
        ("b-spec", [10, 0, 102, 5]),
        ("b-ips-xlb", [10, 0, 102, 6]),
        ("b-ips-io", [10, 0, 102, 7]),
        ("b-ips-tf", [10, 0, 102, 8]),
        ("b-ips-both", [10, 0, 102, 9]),
    ] {
        let ips = got(name)?;
        ensure!(ips == [IpAddr::from(want)], "{name}: {ips:?}");
    }
    let c1 = got("c-share-1")?;
    ensure!(
        c1.len() == 1 && in_range(c1[0], [10, 0, 103, 0], 16),
        "c-share-1: {c1:?} not from the gold pool"
    );
    for name in ["c-share-2", "c-share-3"] {
        ensure!(got(name)? == c1, "{name} does not share {c1:?}");
    }
    let e = got("e-xlb-class")?;
    ensure!(
        e.len() == 1 && in_range(e[0], [10, 0, 103, 0], 16),
        "e-xlb-class: {e:?}"
    );
    let f = poll("status PATCH of other/f-tin", SOON, STEP, || {
        Ok(patched_all(&api, "other", "f-tin"))
    })?;
    ensure!(
        f.len() == 1 && in_range(f[0], [10, 0, 102, 0], 256),
        "f-tin: {f:?}"
    );
    let g = got("g-dual")?;
    ensure!(
        g.len() == 2
            && in_range(g[0], [10, 0, 104, 0], 16)
            && g[1].to_string().starts_with("fd00:104::"),
        "g-dual: {g:?}"
    );
    let vip: IpAddr = shared.parse()?;
    for name in ["d-1", "d-2"] {
        ensure!(got(name)? == [vip], "{name} does not hold {vip}");
    }
    let refused = ["d-port", "d-key", "d-sel", "d-policy"];
    poll(
        "an AddressConflict Event on each refused Service",
        SOON,
        STEP,
        || {
            for name in refused {
                if events(&api, name, "AddressConflict")? != 1 {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    )?;
    // Another sync (one more Service) repeats nothing and changes nothing.
    api.put_yaml(&svc(d, "z-late", &[], &tcp(80), None, ""))?;
    got("z-late")?;
    for name in refused {
        ensure!(
            patched_all(&api, d, name).is_none(),
            "{name} was given {vip}"
        );
        ensure!(
            events(&api, name, "AddressConflict")? == 1,
            "{name}: repeated Event"
        );
    }
    for name in [
        "a-pool-xlb",
        "b-spec",
        "c-share-2",
        "d-1",
        "d-2",
        "e-xlb-class",
        "g-dual",
    ] {
        ensure!(all_events(&api, name)? == 0, "an Event about {name}");
        ensure!(patches_of(&api, name) == 1, "{name} PATCHed twice");
    }
    ensure!(
        patched_all(&api, d, "e-other-class").is_none() && all_events(&api, "e-other-class")? == 0,
        "another class's Service was touched"
    );

    // The holder goes: d-port may now share with d-2, and gets the address
    // without being re-read.
    api.delete("Service", d, "d-1")?;
    ensure!(got("d-port")? == [vip], "d-port after d-1 left");
    // Relabelled out of gold: nothing in status moves; a new Service there gets an
    // address from the open pool.
    api.put_yaml(&namespace(d, "tin"))?;
    api.put_yaml(&svc(d, "h-after", &[], &tcp(80), None, ""))?;
    let h = got("h-after")?;
    ensure!(
        h.len() == 1 && in_range(h[0], [10, 0, 102, 0], 256),
        "h-after: {h:?}"
    );
    ensure!(patches_of(&api, "c-share-1") == 1 && patches_of(&api, "e-xlb-class") == 1);
    println!(
        "matrix: pools {pools:?}, shared {c1:?}, dual {g:?}, named {vip} held by d-1, d-2 then d-port"
    );
    Ok(())
}
