//! An agent on the Kubernetes API source (issues 18 and 30), against the fake API
//! server (`xlb_lab::apiserver`) running in the client's namespace, reached over the
//! lab's network as a real node reaches its API server. Real packets through the VIP:
//!
//! - a Service and its EndpointSlice created through the API are served;
//! - an EndpointSlice change through the API reaches the dataplane;
//! - the API server gone for 30 s changes nothing in the dataplane (every flow in
//!   that time is served), and the agent says so (`xlb_source_up`, `/healthz`);
//! - back, a change made meanwhile arrives;
//! - a BGPPeer, BGPAnnouncement and BFDProfile from the API peer with BIRD (TCP MD5
//!   key from a Secret, BFD up) and announce the VIP, which the client then reaches
//!   through the learned route; a new key in the Secret re-keys the session;
//! - a StaticService from the API serves its VIP, follows its health checks and
//!   goes when deleted;
//! - kinds the API refuses (403 as from an older ClusterRole, 404 as without the CRD)
//!   are reported once each, and the rest syncs and serves.
//!
//! Needs root, bird2 and the built binary (`XLB_BIN`, else `target/release/xlb`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use xlb_lab::agent::{strip_ansi, xlb_bin};
use xlb_lab::apiserver::FakeApiServer;
use xlb_lab::bgp_lab::{bfd_profile_yaml, bgp_yaml, wait_next_hops};
use xlb_lab::lab::{CLIENT_ADDR, Lab, NodeSpec, SOON};
use xlb_lab::manifests::{EndpointSpec, WEB_VIP, multi_doc, web_tcp_vip, web_yaml};
use xlb_lab::poll;
use xlb_lab::router::{Bird, bird_config};
use xlb_lab::servers::{HealthEndpoint, Servers};

const FLOWS: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long the API server stays away.
const OUTAGE: Duration = Duration::from_secs(30);

/// The pods (by name) that `FLOWS` new connections to the VIP reached.
fn reached(lab: &Lab) -> Result<BTreeSet<String>> {
    let replies = lab.client.tcp_flows(web_tcp_vip(), FLOWS, TIMEOUT)?;
    for r in &replies {
        ensure!(r.from == web_tcp_vip(), "reply from {}", r.from);
        ensure!(r.seen_peer.ip() == CLIENT_ADDR, "pod saw {}", r.seen_peer);
    }
    Ok(replies.into_iter().map(|r| r.server).collect())
}

/// Polls until the agent's `xlb_source_up{source="kubernetes"}` is `value`.
fn wait_source_up(lab: &mut Lab, value: f64) -> Result<()> {
    poll(
        &format!("xlb_source_up {value}"),
        SOON,
        Duration::from_millis(100),
        || {
            let up = lab
                .agent()?
                .metric("xlb_source_up", &[("source", "kubernetes")])?;
            Ok((up == value).then_some(()))
        },
    )
}

#[test]
fn an_agent_on_the_api_source_serves_and_outlives_an_api_outage() -> Result<()> {
    let mut lab = Lab::one_node(2)?;
    let api = FakeApiServer::spawn_in(&lab.client.ns, SocketAddr::from((CLIENT_ADDR, 0)))?;
    let node = lab.node().name.clone();
    let pods: Vec<(String, String)> = lab
        .node()
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.ip.to_string()))
        .collect();
    let eps = |which: &[usize]| -> Vec<EndpointSpec> {
        which
            .iter()
            .map(|&i| EndpointSpec::new(&pods[i].1, true, &node))
            .collect()
    };
    api.put_yaml(&web_yaml(&eps(&[0, 1])))?;
    let kubeconfig = lab.scratch().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    lab.node_mut()
        .agent_args
        .extend(["--kubeconfig".to_string(), kubeconfig.display().to_string()]);
    lab.start_agent()?.wait_healthy(SOON)?;
    let all: BTreeSet<String> = pods.iter().map(|p| p.0.clone()).collect();
    poll(
        "both pods served from the API",
        SOON,
        Duration::from_millis(100),
        || Ok((reached(&lab)? == all).then_some(())),
    )?;

    // A change through the API reaches the dataplane.
    api.put_yaml(&web_yaml(&eps(&[0])))?;
    let first = BTreeSet::from([pods[0].0.clone()]);
    poll(
        "only the first pod",
        SOON,
        Duration::from_millis(100),
        || Ok((reached(&lab)? == first).then_some(())),
    )?;

    // The API server goes away for OUTAGE: every flow keeps being served as before.
    api.set_down(true);
    wait_source_up(&mut lab, 0.0)?;
    // A watch that ended first reads "not listed yet" until its relist fails too:
    // polled until the agent says the API server is unreachable, 200 throughout.
    poll(
        "healthz to say the API server is unreachable",
        SOON,
        Duration::from_millis(100),
        || {
            let (code, body) = lab.agent()?.http_get("/healthz")?;
            ensure!(
                code == 200,
                "healthz {code} while only the API server is gone: {body}"
            );
            Ok(body.contains("API server unreachable").then_some(()))
        },
    )?;
    let until = Instant::now() + OUTAGE;
    let mut rounds = 0;
    while Instant::now() < until {
        let r = reached(&lab)?;
        ensure!(r == first, "during the outage flows reached {r:?}");
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("{rounds} rounds of {FLOWS} flows served during the {OUTAGE:?} outage");

    // Meanwhile the second pod came back; the API server returns and so does it.
    api.put_yaml(&web_yaml(&eps(&[0, 1])))?;
    api.set_down(false);
    let back = Instant::now();
    poll(
        "both pods again after the outage",
        SOON,
        Duration::from_millis(100),
        || Ok((reached(&lab)? == all).then_some(())),
    )?;
    println!(
        "the change made during the outage served {:?} after the API server returned",
        back.elapsed()
    );
    wait_source_up(&mut lab, 1.0)?;
    Ok(())
}

/// Points the first node's agent at `api` (a kubeconfig in the lab's scratch dir).
fn use_api(lab: &mut Lab, api: &FakeApiServer) -> Result<()> {
    let kubeconfig = lab.scratch().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig())?;
    lab.node_mut()
        .agent_args
        .extend(["--kubeconfig".to_string(), kubeconfig.display().to_string()]);
    Ok(())
}

/// The ready endpoints of every pod of the first node.
fn all_pods(lab: &Lab) -> Vec<EndpointSpec> {
    let node = lab.node();
    node.pods
        .iter()
        .map(|p| EndpointSpec::new(p.ip, true, &node.name))
        .collect()
}

/// The Secret `xlb-system/router-key` holding `key` under `password` (base64 in
/// `data`, as the API server sends it; type as MetalLB asks).
fn router_key(key: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("router-key".into()),
            namespace: Some("xlb-system".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/basic-auth".into()),
        data: Some(BTreeMap::from([(
            "password".to_string(),
            ByteString(key.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

#[test]
fn bgp_objects_and_a_password_secret_from_the_api_peer_with_bird() -> Result<()> {
    let mut lab = Lab::one_node(2)?;
    let api = FakeApiServer::spawn_in(&lab.client.ns, SocketAddr::from((CLIENT_ADDR, 0)))?;
    // The client is the router: it reaches the VIP only by the route BGP gives it.
    lab.client.ns.ip(&["route", "del", "default"])?;
    let node = lab.node().name.clone();
    let node_addr = lab.node().host.addr;
    let proto = node.replace('-', "_");
    let conf = |key: &str| {
        bird_config(CLIENT_ADDR, &[(node.clone(), node_addr)], true, |_| {
            format!("  hold time 9;\n  bfd on;\n  password \"{key}\";")
        })
    };
    let bird = Bird::start(&lab.client.ns, &lab.scratch().join("bird"), &conf("s3cret"))?;
    let diag = || {
        format!(
            "{}\n{}",
            bird.birdc(&["show", "protocols", "all"])
                .unwrap_or_default(),
            bird.log_tail(20)
        )
    };

    api.put_yaml(&web_yaml(&all_pods(&lab)))?;
    api.put_yaml(&multi_doc(&[
        bgp_yaml("  bfdProfile: fast\n  passwordSecret: { name: router-key }\n"),
        bfd_profile_yaml(),
    ]))?;
    api.put(&router_key("s3cret"))?;
    use_api(&mut lab, &api)?;
    lab.start_agent()?.wait_healthy(SOON)?;

    // Peered with the Secret's key, BFD up, the VIP announced and reachable.
    wait_next_hops(&lab, WEB_VIP, &[node_addr], SOON, diag)?;
    poll(
        "BIRD's BFD session Up",
        SOON,
        Duration::from_millis(50),
        || {
            let out = bird.birdc(&["show", "bfd", "sessions"])?;
            Ok(out
                .lines()
                .any(|l| l.split_whitespace().nth(2) == Some("Up"))
                .then_some(()))
        },
    )
    .with_context(|| bird.birdc(&["show", "bfd", "sessions"]).unwrap_or_default())?;
    let pods: BTreeSet<String> = lab.node().pods.iter().map(|p| p.name.clone()).collect();
    poll(
        "both pods through the BGP route",
        SOON,
        Duration::from_millis(100),
        || Ok((reached(&lab)? == pods).then_some(())),
    )?;
    // The agent publishes session state on its own schedule: poll.
    let agent = lab.agent()?;
    poll(
        "the agent's peer view",
        SOON,
        Duration::from_millis(50),
        || {
            let v = agent.inspect_view("peers")?;
            let p = &v["peers"][0];
            Ok((p["state"] == "Established" && p["bfd"]["state"] == "Up").then_some(()))
        },
    )?;

    // A new key in the Secret: the agent re-keys, so the router (old key) refuses it.
    api.put(&router_key("n3w"))?;
    poll(
        "the session down under the new key",
        SOON,
        Duration::from_millis(50),
        || Ok((bird.bgp_state(&proto)? != "Established").then_some(())),
    )?;
    poll(
        "xlb_bgp_session_up 0",
        SOON,
        Duration::from_millis(100),
        || {
            let up = lab
                .agent()?
                .metric("xlb_bgp_session_up", &[("peer", "xlb-system/router")])?;
            Ok((up == 0.0).then_some(()))
        },
    )?;
    // The router takes the new key too: up again, and only with it.
    let rekeyed = Instant::now();
    bird.reconfigure(&conf("n3w"))?;
    poll(
        "the session back with the new key",
        SOON,
        Duration::from_millis(50),
        || Ok((bird.bgp_state(&proto)? == "Established").then_some(())),
    )
    .with_context(diag)?;
    wait_next_hops(&lab, WEB_VIP, &[node_addr], SOON, diag)?;
    println!(
        "Secret rotation: session Established {:?} after the router took the new key",
        rekeyed.elapsed()
    );
    poll("both pods again", SOON, Duration::from_millis(100), || {
        Ok((reached(&lab)? == pods).then_some(()))
    })?;
    Ok(())
}

/// The StaticService VIP (in the lab's VIP range, which the client routes via
/// node-a) and its port.
const STATIC_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 100, 7);
const STATIC_PORT: u16 = 6443;
const STATIC_HEALTH_PORT: u16 = 8081;

/// A StaticService over `backends`, with fast HTTP health checks.
fn static_service(backends: &[Ipv4Addr]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{b}:{STATIC_PORT}\""))
        .collect();
    format!(
        "apiVersion: xlb.dev/v1alpha1
kind: StaticService
metadata: {{ name: kube-apiserver, namespace: kube-system }}
spec:
  addresses: [{STATIC_VIP}]
  forwarding: SNAT
  ports:
  - name: https
    port: {STATIC_PORT}
    backends: [{}]
  healthCheck:
    type: HTTP
    path: /readyz
    port: {STATIC_HEALTH_PORT}
    interval: 100ms
    timeout: 100ms
    rise: 2
    fall: 2
",
        list.join(", ")
    )
}

/// Which backends (by label) 20 new connections to the StaticService reached.
fn static_reached(lab: &Lab) -> Result<BTreeSet<String>> {
    let vip = SocketAddr::from((STATIC_VIP, STATIC_PORT));
    let replies = lab.client.tcp_flows(vip, 20, TIMEOUT)?;
    for r in &replies {
        ensure!(r.from == vip, "reply from {} instead of the VIP", r.from);
    }
    Ok(replies.into_iter().map(|r| r.server).collect())
}

#[test]
fn a_static_service_from_the_api_serves_its_vip() -> Result<()> {
    // Two machines serve, each on its own address: node-a (whose agent runs) and
    // node-b (no agent: a plain backend reached by SNAT).
    let mut lab = Lab::multi_node(&[NodeSpec::with_pods(0), NodeSpec::with_pods(0)])?;
    let api = FakeApiServer::spawn_in(&lab.client.ns, SocketAddr::from((CLIENT_ADDR, 0)))?;
    let mut backends = BTreeMap::new();
    for n in &lab.nodes {
        let servers = Servers::start(&n.host.ns, &n.name, n.host.addr, 6444, STATIC_PORT)?;
        let health = HealthEndpoint::start(&n.host.ns, n.host.addr, STATIC_HEALTH_PORT)?;
        backends.insert(n.name.clone(), (servers, health));
    }
    let addrs: Vec<Ipv4Addr> = lab.nodes.iter().map(|n| n.host.addr).collect();
    // The Nodes (their InternalIPs) tell node-a which backend is its own (DNAT) and
    // which another machine's (SNAT).
    api.put_yaml(&lab.nodes_yaml())?;
    api.put_yaml(&static_service(&addrs))?;
    use_api(&mut lab, &api)?;
    let bin = xlb_bin()?;
    let node = lab.node_named_mut("node-a")?;
    let dir = node.manifests_dir.clone();
    node.start_agent(&bin, &dir)?.wait_healthy(SOON)?;

    let both: BTreeSet<String> = backends.keys().cloned().collect();
    poll(
        "both backends behind the VIP",
        SOON,
        Duration::from_millis(100),
        || Ok((static_reached(&lab)? == both).then_some(())),
    )?;
    // node-b's health endpoint fails: the checks (run for the API's StaticService
    // too) take it out.
    backends["node-b"].1.set_healthy(false);
    let a = BTreeSet::from(["node-a".to_string()]);
    poll(
        "only node-a while node-b is unhealthy",
        SOON,
        Duration::from_millis(100),
        || Ok((static_reached(&lab)? == a).then_some(())),
    )?;
    backends["node-b"].1.set_healthy(true);
    poll("both again", SOON, Duration::from_millis(100), || {
        Ok((static_reached(&lab)? == both).then_some(()))
    })?;
    // Deleted through the API: the VIP is served no more.
    api.delete("StaticService", "kube-system", "kube-apiserver")?;
    poll("the VIP gone", SOON, Duration::from_millis(100), || {
        let vip = SocketAddr::from((STATIC_VIP, STATIC_PORT));
        Ok(lab
            .client
            .tcp_flows(vip, 1, Duration::from_millis(300))
            .is_err()
            .then_some(()))
    })?;
    Ok(())
}

#[test]
fn kinds_the_api_refuses_are_reported_once_and_the_rest_syncs() -> Result<()> {
    let mut lab = Lab::one_node(2)?;
    let api = FakeApiServer::spawn_in(&lab.client.ns, SocketAddr::from((CLIENT_ADDR, 0)))?;
    // An older ClusterRole without the kinds issue 30 added, and no Role for Secrets;
    // StaticService's CRD not installed.
    let forbidden = [
        ("BGPPeer", "list bgppeers.xlb.dev cluster-wide"),
        (
            "BGPAnnouncement",
            "list bgpannouncements.xlb.dev cluster-wide",
        ),
        ("BFDProfile", "list bfdprofiles.xlb.dev cluster-wide"),
        ("Secret", "list secrets in namespace xlb-system"),
    ];
    for (kind, _) in forbidden {
        api.refuse(kind, Some(403))?;
    }
    api.refuse("StaticService", Some(404))?;
    api.put_yaml(&web_yaml(&all_pods(&lab)))?;
    use_api(&mut lab, &api)?;
    // Healthy means synced: every kind listed or refused.
    lab.start_agent()?.wait_healthy(SOON)?;
    let pods: BTreeSet<String> = lab.node().pods.iter().map(|p| p.name.clone()).collect();
    poll("both pods served", SOON, Duration::from_millis(100), || {
        Ok((reached(&lab)? == pods).then_some(()))
    })?;
    wait_source_up(&mut lab, 1.0)?;

    // The agent keeps asking (a permission may be granted later): wait for three
    // refusals of each, then each kind must have been reported exactly once.
    for path in [
        "/apis/xlb.dev/v1alpha1/bgppeers",
        "/apis/xlb.dev/v1alpha1/bgpannouncements",
        "/apis/xlb.dev/v1alpha1/bfdprofiles",
        "/api/v1/namespaces/xlb-system/secrets",
        "/apis/xlb.dev/v1alpha1/staticservices",
    ] {
        poll(
            &format!("three requests for {path}"),
            SOON,
            Duration::from_millis(100),
            || {
                let n = api
                    .requests()
                    .iter()
                    .filter(|r| {
                        r.strip_prefix("GET ")
                            .and_then(|r| r.strip_prefix(path))
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with('?'))
                    })
                    .count();
                Ok((n >= 3).then_some(()))
            },
        )?;
    }
    let log = strip_ansi(&lab.agent()?.log());
    let lines = |pred: &dyn Fn(&str) -> bool| log.lines().filter(|l| pred(l)).count();
    for (kind, permission) in forbidden {
        let n = lines(&|l: &str| {
            l.contains("WARN")
                && l.contains("forbidden by RBAC")
                && l.contains(&format!("kind=\"{kind}\""))
                && l.contains(permission)
        });
        ensure!(
            n == 1,
            "{kind} reported {n} times (want once, naming {permission:?}):\n{log}"
        );
    }
    let n = lines(&|l: &str| {
        l.contains("WARN") && l.contains("not served") && l.contains("kind=\"StaticService\"")
    });
    ensure!(n == 1, "StaticService's 404 reported {n} times:\n{log}");

    // /healthz says what is refused, and stays 200.
    let (code, body) = lab.agent()?.http_get("/healthz")?;
    ensure!(
        code == 200
            && body.contains("BGPPeer (list forbidden)")
            && body.contains("StaticService (not served)"),
        "healthz {code}: {body}"
    );

    // Granted later: the kind is listed without a restart.
    let mark = lab.agent()?.log_mark();
    api.refuse("BGPPeer", None)?;
    lab.agent()?
        .wait_for_log_line("BGPPeer listed now", mark, SOON, |l| {
            l.contains("listed now") && l.contains("kind=\"BGPPeer\"")
        })?;
    poll(
        "healthz no longer names BGPPeer",
        SOON,
        Duration::from_millis(100),
        || {
            let (_, body) = lab.agent()?.http_get("/healthz")?;
            Ok((!body.contains("BGPPeer")).then_some(()))
        },
    )?;
    Ok(())
}
