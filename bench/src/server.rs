//! The pod's TCP server for the connections/s measurement: a fixed pool of threads, each
//! accepting and serving one connection at a time (one line in, one line out, until the
//! client closes). The lab's own line server starts a thread per connection and keeps
//! every handle until it stops, which tens of thousands of short connections turn into
//! tens of thousands of unreaped thread stacks (the process runs out of mappings).
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// The pool server's port in the pod (the Services' TCP targetPort in the e2e part).
pub const POOL_PORT: u16 = 8081;
const WORKERS: usize = 4;
/// How often idle workers look at the stop flag.
const POLL_MS: libc::c_int = 100;

/// A running pool server; stopped and joined on drop.
pub struct PoolServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    workers: Vec<JoinHandle<()>>,
}

impl PoolServer {
    /// Binds `0.0.0.0:POOL_PORT` in `ns` and starts the workers.
    pub fn start(ns: &xlb_lab::Netns) -> Result<PoolServer> {
        let listener = ns
            .enter(|| Ok(TcpListener::bind((Ipv4Addr::UNSPECIFIED, POOL_PORT))?))
            .with_context(|| format!("binding the pool server in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let workers = (0..WORKERS)
            .map(|_| {
                let (l, stop, served) = (listener.clone(), stop.clone(), served.clone());
                std::thread::spawn(move || worker(&l, &stop, &served))
            })
            .collect();
        Ok(PoolServer {
            stop,
            served,
            workers,
        })
    }

    /// Connections served so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for PoolServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(listener: &TcpListener, stop: &AtomicBool, served: &AtomicU64) {
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, POLL_MS) } <= 0 {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(_) => continue,
        };
        if stream.set_nonblocking(false).is_err()
            || stream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .is_err()
        {
            continue;
        }
        let Ok(mut out) = stream.try_clone() else {
            continue;
        };
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        // Bounded: the client closes after its answer; an idle one times out in 1 s.
        while !stop.load(Ordering::SeqCst) {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if out.write_all(b"bench-pod\n").is_err() {
                        break;
                    }
                }
            }
        }
        served.fetch_add(1, Ordering::Relaxed);
    }
}
