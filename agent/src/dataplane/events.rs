//! Datapath events: the lines the kernel programs log through aya-log (see
//! `ebpf/xlb-ebpf/src/events.rs`), drained from their ring buffer into `tracing` with
//! target `xlb::datapath`, and the level that switches them (`xlb_dp_log`), which
//! `--datapath-log` sets at start and `xlb datapath-log` changes under a running agent.
//!
//! The kernel does the filtering (level and rate limit), so every line that reaches
//! the ring buffer is emitted; `main` admits the `xlb::datapath` target at every level.
use std::path::Path;

use aya::{
    Ebpf,
    maps::{Array, MapData, ProgramArray},
    programs::Xdp,
};
use aya_log::EbpfLogger;
use tokio::io::{Interest, unix::AsyncFd};
use xlb_common::{
    datapath_log::{self, TARGET},
    names,
};

use super::{DataplaneError, map_err, program_err, take_map};

/// Parses a level name (`off`, `error`, `warn`, `info`, `debug`), for the command line.
pub fn parse_level(s: &str) -> Result<u64, String> {
    datapath_log::parse(s.trim()).ok_or_else(|| {
        let names: Vec<&str> = datapath_log::LEVELS.iter().map(|(n, _)| *n).collect();
        format!("{s:?} is not one of {}", names.join(", "))
    })
}

/// Loads `xlb_events` and puts it in the (pinned) `xlb_event_prog`, where the other
/// programs tail-call it. The handle must outlive loading them.
pub(super) fn load_program(ebpf: &mut Ebpf) -> Result<ProgramArray<MapData>, DataplaneError> {
    let mut progs: ProgramArray<MapData> = take_map(ebpf, names::EVENT_PROGS)?;
    let name = names::EVENTS_PROG;
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::Missing("events program"))?
        .try_into()
        .map_err(program_err(name))?;
    prog.load().map_err(program_err(name))?;
    let fd = prog.fd().map_err(program_err(name))?;
    progs.set(0, fd, 0).map_err(map_err(names::EVENT_PROGS))?;
    Ok(progs)
}

/// Drains the programs' log ring buffer while it lives (a tokio task, aborted on drop).
pub struct Reader(tokio::task::JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts draining `ebpf`'s aya-log ring buffer into `tracing`. `None` outside a tokio
/// runtime (tests that load the programs without an agent) or when the object has no
/// log buffer; the programs then log into a buffer nobody reads, which fills and
/// drops records (never packets).
pub(super) fn start_reader(ebpf: &mut Ebpf) -> Option<Reader> {
    let rt = tokio::runtime::Handle::try_current().ok()?;
    let logger = match EbpfLogger::init_with_logger(ebpf, Forward) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "datapath events cannot be read");
            return None;
        }
    };
    // AsyncFd registers with the runtime's reactor: enter it even from a plain thread.
    let _guard = rt.enter();
    // SAFETY: the ring buffer's fd is owned by `logger`, which the AsyncFd owns for
    // its whole life; `as_raw_fd` always returns that one fd.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "datapath events cannot be read");
            return None;
        }
    };
    Some(Reader(rt.spawn(async move {
        loop {
            let Ok(mut ready) = fd.readable_mut().await else {
                return;
            };
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    })))
}

/// Hands aya-log's records to `tracing` under [`TARGET`], at their own level.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: TARGET, "{msg}"),
            log::Level::Warn => tracing::warn!(target: TARGET, "{msg}"),
            log::Level::Info => tracing::info!(target: TARGET, "{msg}"),
            log::Level::Debug => tracing::debug!(target: TARGET, "{msg}"),
            log::Level::Trace => tracing::trace!(target: TARGET, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Opens the pinned level map under `pin_path`.
fn level_map(pin_path: &Path) -> Result<Array<MapData, u64>, DataplaneError> {
    let data = MapData::from_pin(pin_path.join(names::DATAPATH_LOG))
        .map_err(map_err(names::DATAPATH_LOG))?;
    Array::try_from(aya::maps::Map::Array(data)).map_err(map_err(names::DATAPATH_LOG))
}

/// The level the pinned datapath under `pin_path` logs at.
pub fn level(pin_path: &Path) -> Result<u64, DataplaneError> {
    level_map(pin_path)?
        .get(&0, 0)
        .map_err(map_err(names::DATAPATH_LOG))
}

/// Sets the level of the pinned datapath under `pin_path` (takes effect with the next
/// packet; no agent needed). Returns the previous level.
pub fn set_level(pin_path: &Path, level: u64) -> Result<u64, DataplaneError> {
    let mut map = level_map(pin_path)?;
    let was = map.get(&0, 0).map_err(map_err(names::DATAPATH_LOG))?;
    map.set(0, level, 0).map_err(map_err(names::DATAPATH_LOG))?;
    Ok(was)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_names_round_trip_and_unknown_ones_are_refused() {
        for (name, level) in datapath_log::LEVELS {
            assert_eq!(parse_level(name), Ok(level));
            assert_eq!(datapath_log::name(level), name);
        }
        assert_eq!(parse_level(" WARN "), Ok(datapath_log::WARN));
        assert_eq!(datapath_log::name(99), "debug");
        let err = parse_level("verbose").unwrap_err();
        assert!(err.contains("off, error, warn, info, debug"), "{err}");
    }
}
