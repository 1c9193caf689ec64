//! The IPAM leader election (`xlb::leader`) against the fake API server, inside a
//! network namespace made for the test:
//!
//! - a Lease write with a stale resourceVersion is refused with `409 Conflict` (what
//!   the election relies on);
//! - of two electors, exactly one leads, and never both at once while both run;
//! - when the leader stops renewing, the other takes over after the Lease duration,
//!   counting a transition.
//!
//! Needs root (network namespace).
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, api::PostParams};
use tokio::time::Instant;
use xlb::leader::{LEASE_NAME, LeaseConfig, start};
use xlb_lab::{apiserver::FakeApiServer, netns::Netns};

const DURATION: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(10);

#[test]
fn one_leader_at_a_time_and_a_silent_one_is_replaced() -> Result<()> {
    let ns = Netns::create(&format!("xlbkl-{}", std::process::id()))?;
    ns.enter(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(scenario())
    })
}

fn holder(api: &FakeApiServer) -> Result<Option<String>> {
    Ok(api
        .lease("xlb-system", LEASE_NAME)?
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity))
}

async fn scenario() -> Result<()> {
    let api = FakeApiServer::start().await?;
    let client = kube::Client::try_from(kube::Config::new(api.url().parse()?))?;
    let (a_leads, a) = start(
        client.clone(),
        LeaseConfig::new("xlb-system", "a", DURATION),
    );
    let (b_leads, b) = start(
        client.clone(),
        LeaseConfig::new("xlb-system", "b", DURATION),
    );

    // Exactly one leads; sampled over two durations, never both.
    let until = Instant::now() + DEADLINE;
    let first = loop {
        ensure!(Instant::now() < until, "nobody leads");
        if let Some(h) = holder(&api)?
            && (*a_leads.borrow() || *b_leads.borrow())
        {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let watch_until = Instant::now() + 2 * DURATION;
    while Instant::now() < watch_until {
        let (x, y) = (*a_leads.borrow(), *b_leads.borrow());
        ensure!(!(x && y), "both lead");
        ensure!(x || y, "nobody leads after {first} did");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        holder(&api)?.as_deref() == Some(first.as_str()),
        "the Lease moved"
    );

    // The API server refuses a write with a stale resourceVersion.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "xlb-system");
    let mut stale = leases.get(LEASE_NAME).await?;
    stale.metadata.resource_version = Some("1".into());
    match leases
        .replace(LEASE_NAME, &PostParams::default(), &stale)
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        other => anyhow::bail!("a stale Lease write gave {other:?}"),
    }

    // The leader goes silent (its process died): the other takes over.
    let (dead, other, other_leads) = if first == "a" {
        (a, "b", b_leads)
    } else {
        (b, "a", a_leads)
    };
    dead.abort();
    let stopped = Instant::now();
    let until = stopped + DEADLINE;
    while !(*other_leads.borrow() && holder(&api)?.as_deref() == Some(other)) {
        ensure!(Instant::now() < until, "{other} never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        stopped.elapsed() >= DURATION / 2,
        "taken over after {:?}, before the Lease could expire",
        stopped.elapsed()
    );
    let lease = api
        .lease("xlb-system", LEASE_NAME)?
        .and_then(|l| l.spec)
        .context("no Lease")?;
    ensure!(
        lease.lease_transitions == Some(2),
        "transitions {:?}",
        lease.lease_transitions
    );
    println!(
        "{first} led; {other} took over {:?} after it stopped",
        stopped.elapsed()
    );
    Ok(())
}
