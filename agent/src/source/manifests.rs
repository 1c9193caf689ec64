//! The manifest-directory source: every `*.yaml`, `*.yml` and `*.json` file of one
//! directory, each holding any number of standard Kubernetes objects, parsed with the
//! k8s-openapi types and turned into the [`crate::model`].
//!
//! Understood: `v1 Service` (`type: LoadBalancer` and `NodePort`; ClusterIP and
//! ExternalName are ignored), `discovery.k8s.io/v1 EndpointSlice`, `v1 Node` and
//! `xlb.dev/v1alpha1 L2Announcement` and `StaticService` (see [`super::convert`]); a
//! `v1 List` is read as its items. Other kinds are ignored.
//!
//! Bad input never takes down what works:
//! - a file that does not parse at all keeps the objects of its last good parse;
//! - an object that is invalid in an essential way (does not deserialise, invalid VIP,
//!   external IP, source range, affinity or node address, missing service-name
//!   label, ...) keeps its last good version from the same file, keyed by
//!   kind/namespace/name, or is skipped if it never had one;
//! - a non-essential part (one SCTP port, one bad endpoint address, one bad
//!   `nodePort`) is skipped alone;
//! - something valid that xlb does not support yet (IPv6 VIP, IPv6/FQDN slice) is
//!   reported and skipped, not replaced by an older version.
//!
//! Each problem is a [`ConfigError`] naming file, object and field.
//!
//! Input is bounded and read once: a file over [`MAX_FILE_BYTES`] or
//! [`MAX_DOCUMENTS`] is refused as a whole (its last good objects stay), and a file
//! whose size, modification time and inode are unchanged is not parsed again.
//! A file that becomes empty is not believed at once: shells and `kubectl get -o yaml
//! > f` truncate a file before writing it, so its objects stay until it has been
//! empty for [`EMPTY_GRACE`].
use std::{
    collections::BTreeMap,
    fs,
    io::{self, Read},
    ops::RangeInclusive,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode, ModifyKind},
};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

pub use super::Loaded;
use super::{
    Changed, SourceError,
    assemble::{Document, Index},
    convert::{Object, parse_object},
};
use crate::model::{ConfigError, ErrorKind, Probe};

/// Largest manifest file read (bytes). Ten thousand Services with their
/// EndpointSlices fit in about 10 MiB of YAML.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Most documents (or `List` items) read from one file.
pub const MAX_DOCUMENTS: usize = 100_000;
/// Most threads parsing files at once.
const PARSE_THREADS: usize = 8;
/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORTS: RangeInclusive<u16> = 30000..=32767;
/// How long a file that emptied must stay empty before its objects are removed.
pub const EMPTY_GRACE: Duration = Duration::from_secs(2);

/// Reads a manifest directory and remembers the last good objects of every file.
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    /// Node ports and health check node ports must lie in this range.
    node_ports: RangeInclusive<u16>,
    /// [`EMPTY_GRACE`], shorter in tests.
    empty_grace: Duration,
    /// Last good state per file, by path; files iterate in name order.
    files: BTreeMap<PathBuf, FileState>,
    /// Whether the last load found anything different from the one before.
    changed: bool,
    /// The files' objects joined into the model, kept up to date object by object.
    index: Index,
}

impl Document for FileState {
    fn objects(&self) -> &[Object] {
        &self.objects
    }
}

/// What one file gave at its last parse.
#[derive(Debug, Default)]
struct FileState {
    /// (size, mtime ns, inode, ctime ns) when parsed: unchanged means not re-read.
    stamp: Option<(u64, i128, u64, i128)>,
    /// The last good objects.
    objects: Vec<Object>,
    /// The errors that parse found, repeated on every load while the file is unchanged.
    errors: Vec<ConfigError>,
    /// Since when the file has been empty while it still had objects.
    empty_since: Option<Instant>,
}

impl ManifestSource {
    /// A source for `dir`; nothing is read until [`load`](Self::load).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            node_ports: DEFAULT_NODE_PORTS,
            empty_grace: EMPTY_GRACE,
            files: BTreeMap::new(),
            changed: true,
            index: Index::new(),
        }
    }

    /// The same source with another node port range (kube-apiserver's
    /// `--service-node-port-range`).
    pub fn with_node_ports(mut self, range: RangeInclusive<u16>) -> Self {
        self.node_ports = range;
        self
    }

    /// The same source believing an emptied file after `grace` instead of
    /// [`EMPTY_GRACE`].
    pub fn with_empty_grace(mut self, grace: Duration) -> Self {
        self.empty_grace = grace;
        self
    }

    /// Reads every `*.yaml` / `*.yml` / `*.json` file in the directory (not recursive;
    /// hidden files and editor temp files are skipped) that changed since the last
    /// load, and returns the model and the errors of the current input.
    pub fn load(&mut self) -> Loaded {
        self.load_inner(false).unwrap_or_default()
    }

    /// [`load`](Self::load), or `None` when nothing changed since the last load (no
    /// file read, dropped or suspect, listing worked): then the result would equal
    /// the last one, and the model is not even assembled.
    pub fn load_if_changed(&mut self) -> Option<Loaded> {
        self.load_inner(true)
    }

    fn load_inner(&mut self, only_if_changed: bool) -> Option<Loaded> {
        let mut errors = Vec::new();
        let mut parsed = 0;
        let mut recheck = None;
        // (file, its objects before) for every file whose objects may have changed.
        let mut touched: Vec<(PathBuf, Vec<Object>)> = Vec::new();
        match manifest_files(&self.dir) {
            Ok(paths) => {
                let before = self.files.len();
                let mut work: Vec<(PathBuf, FileState)> = paths
                    .into_iter()
                    .map(|path| {
                        let state = self.files.remove(&path).unwrap_or_default();
                        (path, state)
                    })
                    .collect();
                // Files not listed any more are dropped with their objects.
                let mut dropped = 0;
                for (path, state) in std::mem::take(&mut self.files) {
                    touched.push((path, state.objects));
                    dropped += 1;
                }
                let outcomes = self.refresh_all(&mut work);
                let mut files = BTreeMap::new();
                for ((path, mut state), outcome) in work.into_iter().zip(outcomes) {
                    match outcome {
                        Refresh::Gone => {
                            touched.push((path, state.objects));
                            dropped += 1;
                            continue;
                        }
                        Refresh::Kept => {}
                        Refresh::Parsed(old) => {
                            parsed += 1;
                            if let Some(old) = old {
                                // Copied on this thread, compactly: the parse left the
                                // kept objects scattered between its freed garbage on
                                // the parsing thread's heap pages, which then could not
                                // be returned.
                                state.objects = state.objects.clone();
                                touched.push((path.clone(), old));
                            }
                        }
                        Refresh::Suspect(wait) => recheck = Some(wait),
                    }
                    errors.extend(state.errors.iter().cloned());
                    files.insert(path, state);
                }
                let added = files.len() + dropped - before;
                self.changed = parsed > 0 || dropped > 0 || added > 0;
                self.files = files;
            }
            Err(e) => {
                self.changed = true;
                let origin = self.dir.display().to_string();
                errors.push(file_error(&origin, ErrorKind::Io, e.to_string()));
            }
        }
        let mut changed = self.index.update(&self.files, touched);
        let rechecked = std::mem::take(&mut self.index.rechecked);
        if let Changed::Services(services) = &mut changed {
            services.extend(rechecked.iter().cloned());
        }
        if only_if_changed && !self.changed && recheck.is_none() && rechecked.is_empty() {
            return None;
        }
        errors.extend(self.index.errors().cloned());
        Some(Loaded {
            snapshot: Arc::clone(&self.index.snapshot),
            changed,
            errors,
            parsed,
            recheck,
        })
    }

    /// Takes the health checker's verdicts (every probe's current one): StaticService
    /// backends whose verdict changed get it as their endpoints' `ready`, and the
    /// next load reports their Services as changed, as the kubelet's readiness probes
    /// reach Services through EndpointSlices. The checker sits beside the source,
    /// as the kubelet sits beside the API server; nothing downstream knows.
    pub fn set_health(&mut self, verdicts: BTreeMap<Probe, bool>) {
        self.index.set_health(&self.files, verdicts);
    }

    /// [`refresh`](Self::refresh) for every file, on up to one thread per CPU (at
    /// most [`PARSE_THREADS`]): parsing YAML is the bulk of a cold start (about
    /// 10 MB/s per core), and files are independent until [`assemble`].
    fn refresh_all(&self, work: &mut [(PathBuf, FileState)]) -> Vec<Refresh> {
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(PARSE_THREADS)
            .min(work.len());
        if threads <= 1 {
            return work
                .iter_mut()
                .map(|(path, state)| self.refresh(path, state))
                .collect();
        }
        let mut outcomes: Vec<Option<Refresh>> = work.iter().map(|_| None).collect();
        // A shared queue, so that one large file does not hold up a whole share.
        let queue = std::sync::Mutex::new(work.iter_mut().zip(outcomes.iter_mut()));
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    loop {
                        let next = match queue.lock() {
                            Ok(mut q) => q.next(),
                            Err(_) => None,
                        };
                        let Some(((path, state), out)) = next else {
                            break;
                        };
                        *out = Some(self.refresh(path, state));
                    }
                });
            }
        });
        // Every slot is filled: the scope re-raises a worker's panic.
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Refresh::Gone))
            .collect()
    }

    /// Brings one file's state up to date.
    fn refresh(&self, path: &Path, state: &mut FileState) -> Refresh {
        let origin = path.display().to_string();
        let meta = match fs::metadata(path) {
            // Removed between listing and reading: gone like any deleted file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Refresh::Gone,
            Err(e) => {
                state.errors = vec![file_error(&origin, ErrorKind::Io, e.to_string())];
                return Refresh::Parsed(None);
            }
            Ok(m) => m,
        };
        let stamp = (
            meta.len(),
            i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            meta.ino(),
            i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        );
        if meta.len() == 0 && !state.objects.is_empty() {
            let since = *state.empty_since.get_or_insert_with(Instant::now);
            let waited = since.elapsed();
            if waited < self.empty_grace {
                return Refresh::Suspect(self.empty_grace - waited);
            }
        } else {
            state.empty_since = None;
        }
        if state.stamp == Some(stamp) {
            return Refresh::Kept;
        }
        state.stamp = Some(stamp);
        let mut errors = Vec::new();
        if meta.len() > MAX_FILE_BYTES {
            let message = format!(
                "file is {} bytes, over the {MAX_FILE_BYTES}-byte limit; not read, its last good objects kept",
                meta.len()
            );
            state.errors = vec![file_error(&origin, ErrorKind::TooLarge, message)];
            return Refresh::Parsed(None);
        }
        let mut text = String::new();
        // Bounded even if the file grows between stat and read.
        let read =
            fs::File::open(path).and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text));
        match read {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Refresh::Gone,
            Err(e) => errors.push(file_error(&origin, ErrorKind::Io, e.to_string())),
            Ok(n) if n as u64 > MAX_FILE_BYTES => {
                let message = format!(
                    "file grew over the {MAX_FILE_BYTES}-byte limit while read; its last good objects kept"
                );
                errors.push(file_error(&origin, ErrorKind::TooLarge, message));
            }
            Ok(_) => match parse_file(
                path,
                &text,
                Some(&state.objects),
                &self.node_ports,
                &mut errors,
            ) {
                Ok(objects) => {
                    state.errors = errors;
                    return Refresh::Parsed(Some(std::mem::replace(&mut state.objects, objects)));
                }
                Err(e) => errors.push(e),
            },
        }
        state.errors = errors;
        Refresh::Parsed(None)
    }
}

/// What [`ManifestSource::refresh`] did with a file.
enum Refresh {
    /// It no longer exists.
    Gone,
    /// Unchanged: nothing read.
    Kept,
    /// Read (and parsed, or refused with an error); with the objects it had before
    /// when the parse replaced them.
    Parsed(Option<Vec<Object>>),
    /// Emptied recently: its objects kept; look again after the given time.
    Suspect(Duration),
}

/// Watches the directory; sends `()` on every relevant change (create, modify, remove
/// or rename of any file in it). The returned watcher must be kept alive.
///
/// Events are not filtered by file name: a ConfigMap volume updates its files by
/// renaming a hidden `..data` symlink. Bursts coalesce into one pending `()`.
pub fn watch(dir: &Path) -> Result<(RecommendedWatcher, mpsc::Receiver<()>), SourceError> {
    let (tx, rx) = mpsc::channel(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            // A write is acted on when the writer closes the file, not at each
            // modification: `cmd > file` truncates first and writes later, and the
            // moment in between is not a configuration. Reads and opens change nothing.
            Ok(e) => match e.kind {
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                EventKind::Access(_) => false,
                EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_)) => false,
                _ => true,
            },
            // An error (e.g. inotify queue overflow) may hide changes: reload.
            Err(_) => true,
        };
        if relevant {
            // Full means a reload is already pending; closed means nobody listens.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok((watcher, rx))
}

/// The manifest files of `dir`, sorted by path.
fn manifest_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // Editors' swap and lock files are hidden (`.x.yaml.swp`, `.#x.yaml`) or carry
        // a suffix (`x.yaml~`, `#x.yaml#`), so the extension test catches the rest.
        let manifest = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        // `metadata` follows symlinks, as in ConfigMap volumes.
        if !name.starts_with('.') && manifest && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Deepest nesting of collections a YAML file may have: serde_yaml_ng refuses more
/// than 128 anyway, but only after its parser (libyaml's) has read the whole
/// document, which takes time quadratic in the depth of flow collections (`[`, `{`:
/// a 200 KB `[[[…]]]` took 28 s). Block nesting costs it linear time.
pub const MAX_YAML_DEPTH: usize = 128;

/// Refuses YAML whose flow collections nest deeper than [`MAX_YAML_DEPTH`], before
/// the real parse. A text with no more openers (`[`, `{`) than that cannot, and is
/// passed at the cost of one byte scan; any other text gets one linear pass over its
/// parser events (serde-saphyr's budget check, already in the tree through
/// kube-client: about as costly as the parse itself, so only where it can matter). A
/// text that pass cannot scan is left to the real parser to report. Aliases stay
/// bounded by serde-saphyr's defaults (50,000; at most 10 per anchor past 100), which
/// no Kubernetes manifest comes near.
pub fn check_yaml_depth(text: &str) -> Result<(), String> {
    use serde_saphyr::budget::{Budget, EnforcingPolicy, check_yaml_budget};
    // serde-saphyr's own scanner, re-exported: its error kinds are that crate's.
    use serde_saphyr::granit_parser::ErrorKind as ScanErrorKind;
    let openers = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
    if openers <= MAX_YAML_DEPTH {
        return Ok(());
    }
    let mut budget = Budget::default();
    budget.max_depth = MAX_YAML_DEPTH;
    budget.max_documents = usize::MAX;
    budget.max_nodes = usize::MAX;
    budget.max_events = usize::MAX;
    budget.max_total_scalar_bytes = usize::MAX;
    match check_yaml_budget(text, budget, EnforcingPolicy::AllContent) {
        Ok(report) => match report.breached {
            None => Ok(()),
            Some(b) => Err(format!(
                "refused before parsing: {b:?} (collections may nest {MAX_YAML_DEPTH} deep)"
            )),
        },
        // The scanner's own bound on flow nesting (255) trips before the parser has
        // emitted 128 levels when simple-key lookahead holds events back.
        Err(e) if matches!(e.kind(), ScanErrorKind::RecursionLimitExceeded) => Err(format!(
            "refused before parsing: nested deeper than {MAX_YAML_DEPTH} ({e})"
        )),
        Err(_) => Ok(()),
    }
}

/// Parses one file. `Err` means the file as a whole is unreadable (syntax error); errors
/// of single objects go to `errors`, and such objects fall back to their version in
/// `last` (this file's previous good parse).
fn parse_file(
    path: &Path,
    text: &str,
    last: Option<&[Object]>,
    node_ports: &RangeInclusive<u16>,
    errors: &mut Vec<ConfigError>,
) -> Result<Vec<Object>, ConfigError> {
    let origin = path.display().to_string();
    // One more than the limit is read, to tell "at the limit" from "over it".
    let documents = if path.extension().is_some_and(|e| e == "json") {
        serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .take(MAX_DOCUMENTS + 1)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(&origin, ErrorKind::Parse, format!("invalid JSON: {e}")))?
    } else {
        check_yaml_depth(text)
            .map_err(|e| file_error(&origin, ErrorKind::TooLarge, format!("invalid YAML: {e}")))?;
        serde_yaml_ng::Deserializer::from_str(text)
            .take(MAX_DOCUMENTS + 1)
            .map(Value::deserialize)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error(&origin, ErrorKind::Parse, format!("invalid YAML: {e}")))?
    };
    let items: usize = documents
        .iter()
        .map(|d| match d.get("items") {
            Some(Value::Array(a)) if is_list(d) => a.len(),
            _ => 1,
        })
        .sum();
    if items > MAX_DOCUMENTS {
        return Err(file_error(
            &origin,
            ErrorKind::TooLarge,
            format!(
                "more than {MAX_DOCUMENTS} documents or list items; not used, its last good objects kept"
            ),
        ));
    }

    let mut objects = Vec::new();
    for (i, mut doc) in documents.into_iter().enumerate() {
        let position = format!("document {}", i + 1);
        if is_list(&doc) {
            let Some(Value::Array(items)) = doc.get_mut("items").map(Value::take) else {
                continue;
            };
            for (j, item) in items.into_iter().enumerate() {
                let position = format!("{position}, items[{j}]");
                objects.extend(parse_object(
                    &origin, &position, item, last, node_ports, errors,
                ));
            }
        } else {
            objects.extend(parse_object(
                &origin, &position, doc, last, node_ports, errors,
            ));
        }
    }
    Ok(objects)
}

/// `kind: List`, what `kubectl get -o yaml` prints for several objects.
fn is_list(doc: &Value) -> bool {
    doc.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && doc.get("kind").and_then(Value::as_str) == Some("List")
}

fn file_error(origin: &str, kind: ErrorKind, message: String) -> ConfigError {
    ConfigError {
        origin: origin.to_string(),
        object: String::new(),
        field: String::new(),
        message,
        kind,
    }
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::{collections::BTreeSet, net::IpAddr, time::Duration};

    use super::*;
    use crate::model::{
        self, Endpoint, Protocol, ServiceRef, ServiceType, Snapshot, TrafficPolicy,
    };

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn web(ns: &str, name: &str) -> ServiceRef {
        ServiceRef::new(ns, name)
    }

    /// A LoadBalancer Service `default/<name>` with one TCP port 80 named http.
    fn lb_service(name: &str, vip: &str) -> String {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{ name: {name} }}
spec:
  type: LoadBalancer
  ports: [{{ name: http, port: 80 }}]
status: {{ loadBalancer: {{ ingress: [{{ ip: \"{vip}\" }}] }} }}
"
        )
    }

    /// An EndpointSlice `default/<name>` of Service `service` with one ready endpoint
    /// per address on port `http` (8080).
    fn slice_of(name: &str, service: &str, addrs: &[String]) -> String {
        let endpoints: Vec<String> = addrs
            .iter()
            .map(|a| {
                format!(
                    "{{ addresses: [\"{a}\"], conditions: {{ ready: true }}, nodeName: node-a }}"
                )
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: {name}, labels: {{ kubernetes.io/service-name: {service} }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080, protocol: TCP }}]
endpoints: [{}]
",
            endpoints.join(", ")
        )
    }

    #[test]
    fn the_model_kept_up_to_date_equals_the_model_read_from_scratch() {
        // Random edits of three files holding four Services, six slices (whose
        // Service label moves) and a Node, with objects duplicated across files and
        // ports that do not match: after every load, the model updated in place must
        // be the one a fresh source reads, and every Service that differs must be
        // named as changed.
        let dir = tempfile::tempdir().unwrap();
        // An emptied file is believed at once, as a fresh source would.
        let mut source = ManifestSource::new(dir.path()).with_empty_grace(Duration::ZERO);
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut before = Snapshot::default();
        for round in 0..300 {
            let file = format!("f{}.yaml", next(3));
            let mut docs = Vec::new();
            for _ in 0..next(5) {
                docs.push(match next(4) {
                    0 | 1 => {
                        let addrs: Vec<String> = (0..next(3))
                            .map(|i| format!("10.1.{}.{i}", next(4)))
                            .collect();
                        slice_of(&format!("e{}", next(6)), &format!("s{}", next(4)), &addrs)
                    }
                    2 => lb_service(&format!("s{}", next(4)), &format!("10.0.0.{}", next(3) + 1)),
                    _ => format!(
                        "apiVersion: v1
kind: Node
metadata: {{ name: node-a }}
status: {{ addresses: [{{ type: InternalIP, address: 10.9.0.{} }}] }}
",
                        next(2) + 1
                    ),
                });
            }
            if next(8) == 0 {
                let _ = fs::remove_file(dir.path().join(&file));
            } else {
                let path = write(dir.path(), &file, &docs.join("---\n"));
                // A distinct mtime per round: two writes of the same size within one
                // tick of the kernel's coarse file clock would look unchanged.
                let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_000 + round);
                fs::File::options()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_modified(mtime)
                    .unwrap();
            }
            let loaded = source.load();
            let fresh = ManifestSource::new(dir.path()).load();
            assert_eq!(*loaded.snapshot, *fresh.snapshot, "round {round}");
            let (mut got, mut want) = (loaded.errors.clone(), fresh.errors.clone());
            got.sort();
            want.sort();
            assert_eq!(got, want, "round {round}");
            if let Changed::Services(named) = &loaded.changed {
                assert_eq!(loaded.snapshot.nodes, before.nodes, "round {round}");
                let refs: BTreeSet<&ServiceRef> = loaded
                    .snapshot
                    .services
                    .keys()
                    .chain(before.services.keys())
                    .collect();
                for r in refs {
                    if loaded.snapshot.services.get(r) != before.services.get(r) {
                        assert!(named.contains(r), "round {round}: {r} changed unnamed");
                    }
                }
            }
            before = (*loaded.snapshot).clone();
        }
    }

    fn only_kinds(errors: &[ConfigError]) -> Vec<&'static str> {
        errors.iter().map(ConfigError::kind).collect()
    }

    const REALISTIC: &str = r#"
# Two documents plus an empty one and an ignored kind.
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: LoadBalancer
  ports:
    - { name: http, protocol: TCP, port: 80, targetPort: 8080 }
    - { name: dns, protocol: UDP, port: 53, targetPort: 5353 }
status:
  loadBalancer:
    ingress: [{ ip: 192.0.2.10 }]
---
---
apiVersion: v1
kind: ConfigMap
metadata: { name: unrelated, namespace: shop }
data: { a: b }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-x7k2p
  namespace: shop
  labels: { kubernetes.io/service-name: web }
addressType: IPv4
ports:
  - { name: http, protocol: TCP, port: 8080 }
  - { name: dns, protocol: UDP, port: 5353 }
endpoints:
  - addresses: [10.1.0.5]
    conditions: { ready: true, serving: true, terminating: false }
    nodeName: node-a
  - addresses: [10.1.0.6]
    conditions: { ready: false }
    nodeName: node-a
  - addresses: [10.2.0.7]
    nodeName: node-b
"#;

    #[test]
    fn realistic_multi_document_file_becomes_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "shop.yaml", REALISTIC);
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(loaded.errors, vec![]);
        let svc = &loaded.snapshot.services[&web("shop", "web")];
        assert_eq!(svc.vips, vec!["192.0.2.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(svc.traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(svc.origin, path.display().to_string());
        let ep = |addr: &str, port, ready, node: &str| Endpoint {
            addr: addr.parse().unwrap(),
            port,
            ready,
            serving: ready,
            terminating: false,
            node_name: Some(node.into()),
        };
        let port = |index, name: &str, port, protocol, target| model::ServicePort {
            index,
            name: name.into(),
            port,
            node_port: None,
            protocol,
            endpoints: vec![
                ep("10.1.0.5", target, true, "node-a"),
                ep("10.1.0.6", target, false, "node-a"),
                ep("10.2.0.7", target, true, "node-b"),
            ],
        };
        assert_eq!(
            svc.ports,
            vec![
                port(0, "http", 80, Protocol::Tcp, 8080),
                port(1, "dns", 53, Protocol::Udp, 5353)
            ]
        );
    }

    #[test]
    fn lab_example_parses_into_the_demo_service() {
        let lab = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/lab.yaml");
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "lab.yaml", &fs::read_to_string(lab).unwrap());
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(loaded.errors, vec![]);
        let endpoints = |port| {
            ["10.0.1.11", "10.0.1.12", "10.0.1.13"]
                .iter()
                .map(|a| Endpoint {
                    addr: a.parse().unwrap(),
                    port,
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: Some("node-a".into()),
                })
                .collect()
        };
        let expected = Snapshot {
            services: BTreeMap::from([(
                web("demo", "web"),
                model::Service {
                    service_type: ServiceType::LoadBalancer,
                    vips: vec!["10.0.100.1".parse().unwrap()],
                    external_ips: vec![],
                    traffic_policy: TrafficPolicy::Local,
                    source_ranges: vec![],
                    affinity_timeout: None,
                    health_check_node_port: None,
                    static_service: None,
                    // The lab example's address is in status: a recovered allocation.
                    address_request: Some(model::AddressRequest {
                        named: vec!["10.0.100.1".parse().unwrap()],
                        status: vec!["10.0.100.1".parse().unwrap()],
                        families: vec![model::IpFamily::V4],
                        from_status: true,
                        named_field: "status.loadBalancer.ingress".into(),
                        ..model::AddressRequest::default()
                    }),
                    created: None,
                    labels: BTreeMap::new(),
                    sharing_key: None,
                    selector: BTreeMap::from([("app".into(), "web".into())]),
                    ports: vec![
                        model::ServicePort {
                            index: 0,
                            name: "http".into(),
                            port: 80,
                            node_port: None,
                            protocol: Protocol::Tcp,
                            endpoints: endpoints(8080),
                        },
                        model::ServicePort {
                            index: 1,
                            name: "dns".into(),
                            port: 53,
                            node_port: None,
                            protocol: Protocol::Udp,
                            endpoints: endpoints(5353),
                        },
                    ],
                    origin: path.display().to_string(),
                },
            )]),
            nodes: BTreeMap::new(),
            l2_announcements: BTreeMap::new(),
            address_pools: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            bgp: Default::default(),
        };
        // Services only: the lab file may describe its nodes too.
        assert_eq!(loaded.snapshot.services, expected.services);
    }

    #[test]
    fn sctp_port_is_rejected_by_field_and_the_others_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "svc.yaml",
            "apiVersion: v1
kind: Service
metadata: { name: web }
spec:
  type: LoadBalancer
  loadBalancerIP: 192.0.2.1
  ports:
    - { name: a, port: 80 }
    - { name: b, port: 53, protocol: UDP }
    - { name: c, port: 9, protocol: SCTP }
",
        );
        let loaded = ManifestSource::new(dir.path()).load();
        let [e] = &loaded.errors[..] else {
            panic!("{:?}", loaded.errors)
        };
        assert_eq!(e.kind(), "unsupported_protocol");
        assert_eq!(e.object, "Service default/web");
        assert_eq!(e.field, "spec.ports[2].protocol");
        assert!(e.message.contains("SCTP is not supported"));
        let svc = &loaded.snapshot.services[&web("default", "web")];
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect();
        assert_eq!(ports, [("a", 80, Protocol::Tcp), ("b", 53, Protocol::Udp)]);
        assert_eq!(svc.vips, vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn bad_yaml_file_is_reported_and_the_good_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "good.yaml", &lb_service("good", "192.0.2.1"));
        let bad = write(
            dir.path(),
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: [unclosed\n",
        );
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(only_kinds(&loaded.errors), ["parse"]);
        assert_eq!(loaded.errors[0].origin, bad.display().to_string());
        assert!(
            loaded.errors[0]
                .to_string()
                .starts_with(&format!("{}: invalid YAML", bad.display()))
        );
        assert!(
            loaded
                .snapshot
                .services
                .contains_key(&web("default", "good"))
        );
    }

    #[test]
    fn file_that_becomes_unparseable_keeps_its_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        write(dir.path(), "a.yaml", &lb_service("web", "192.0.2.1"));
        let good = source.load().snapshot;
        assert_eq!(good.services.len(), 1);

        write(
            dir.path(),
            "a.yaml",
            "kind: Service\n  bad: indentation\n: :\n",
        );
        let loaded = source.load();
        assert_eq!(only_kinds(&loaded.errors), ["parse"]);
        assert_eq!(loaded.snapshot, good);
        // Still kept on the next load, e.g. one triggered by another file.
        assert_eq!(source.load().snapshot, good);

        // Fixed: the new content replaces it.
        write(dir.path(), "a.yaml", &lb_service("web", "192.0.2.2"));
        let loaded = source.load();
        assert!(loaded.errors.is_empty());
        assert_eq!(
            loaded.snapshot.services[&web("default", "web")].vips,
            vec!["192.0.2.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn object_whose_vip_becomes_invalid_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        let two = |vip: &str| {
            format!(
                "{}---\n{}",
                lb_service("web", vip),
                lb_service("other", "192.0.2.9")
            )
        };
        write(dir.path(), "a.yaml", &two("192.0.2.1"));
        let good = source.load().snapshot;

        write(
            dir.path(),
            "a.yaml",
            &format!("{}---\n{}", two("192.0.2.300"), lb_service("new", "bogus")),
        );
        let loaded = source.load();
        assert_eq!(only_kinds(&loaded.errors), ["invalid_ip", "invalid_ip"]);
        let e = &loaded.errors[0];
        assert_eq!(e.object, "Service default/web");
        assert_eq!(e.field, "status.loadBalancer.ingress[0].ip");
        // web keeps its old VIP, other is untouched, new (never good) is skipped.
        assert_eq!(loaded.snapshot, good);
    }

    #[test]
    fn deserialisation_error_names_the_field_path() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "svc.yaml",
            "apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  type: LoadBalancer
  ports: [{ name: a, port: 80 }, { name: b, port: eighty }]
",
        );
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(only_kinds(&loaded.errors), ["parse"]);
        assert_eq!(loaded.errors[0].object, "Service shop/web");
        assert_eq!(loaded.errors[0].field, "spec.ports[1].port");
        assert!(loaded.snapshot.services.is_empty());
    }

    #[test]
    fn slice_port_with_unknown_name_is_reported_on_the_slice() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "svc.yaml", &lb_service("web", "192.0.2.1"));
        write(
            dir.path(),
            "slice.yaml",
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-1, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [{ name: http, port: 8080 }, { name: htp, port: 8081 }]
endpoints: [{ addresses: [10.1.0.5] }]
",
        );
        let loaded = ManifestSource::new(dir.path()).load();
        let [e] = &loaded.errors[..] else {
            panic!("{:?}", loaded.errors)
        };
        assert_eq!(e.kind(), "unknown_port_name");
        assert_eq!(e.object, "EndpointSlice default/web-1");
        assert_eq!(e.field, "ports[1].name");
        assert!(e.origin.ends_with("slice.yaml"));
        let port = &loaded.snapshot.services[&web("default", "web")].ports[0];
        assert_eq!(port.endpoints.len(), 1);
        assert_eq!(port.endpoints[0].port, 8080);
    }

    #[test]
    fn invalid_endpoint_address_skips_only_that_address() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "all.yaml",
            &format!(
                "{}---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: web-1, labels: {{ kubernetes.io/service-name: web }} }}
addressType: IPv4
ports: [{{ name: http, port: 8080 }}]
endpoints:
  - addresses: [10.1.0.5]
  - addresses: [10.1.0.6, 10.1.0.600]
    conditions: {{ ready: false, serving: true, terminating: true }}
",
                lb_service("web", "192.0.2.1")
            ),
        );
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(only_kinds(&loaded.errors), ["invalid_ip"]);
        assert_eq!(loaded.errors[0].field, "endpoints[1].addresses[1]");
        let eps = &loaded.snapshot.services[&web("default", "web")].ports[0].endpoints;
        let got: Vec<_> = eps
            .iter()
            .map(|e| (e.addr.to_string(), e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            got,
            [
                ("10.1.0.5".to_string(), true, true, false),
                ("10.1.0.6".to_string(), false, true, true)
            ]
        );
    }

    #[test]
    fn unsupported_families_and_missing_identity_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "odd.yaml",
            r#"apiVersion: v1
kind: Service
metadata: { name: dual }
spec: { type: LoadBalancer, ports: [{ port: 80 }] }
status: { loadBalancer: { ingress: [{ ip: "2001:db8::1" }, { ip: 192.0.2.1 }] } }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: dual-v6, labels: { kubernetes.io/service-name: dual } }
addressType: IPv6
endpoints: [{ addresses: ["2001:db8::5"] }]
---
metadata: { name: no-kind }
---
apiVersion: v1
kind: Service
metadata: { namespace: x }
---
apiVersion: v1
kind: Service
metadata: { name: pending }
spec: { type: LoadBalancer, ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: cluster-ip }
spec: { ports: [{ port: 80, protocol: SCTP }] }
---
apiVersion: v1
kind: Node
metadata: { name: node-a }
"#,
        );
        let loaded = ManifestSource::new(dir.path()).load();
        let got: Vec<_> = loaded
            .errors
            .iter()
            .map(|e| (e.kind(), e.object.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "unsupported_ip_family",
                    "Service default/dual",
                    "status.loadBalancer.ingress[0].ip"
                ),
                (
                    "unsupported_address_type",
                    "EndpointSlice default/dual-v6",
                    "addressType"
                ),
                ("missing_field", "document 3", "apiVersion"),
                ("missing_field", "Service in document 4", "metadata.name"),
            ]
        );
        let dual = &loaded.snapshot.services[&web("default", "dual")];
        assert_eq!(dual.vips, ips(&["2001:db8::1", "192.0.2.1"]));
        assert_eq!(dual.ports[0].name, "");
        assert!(dual.ports[0].endpoints.is_empty());
        assert!(
            loaded.snapshot.services[&web("default", "pending")]
                .vips
                .is_empty()
        );
        assert!(
            !loaded
                .snapshot
                .services
                .contains_key(&web("default", "cluster-ip"))
        );
    }

    #[test]
    fn json_files_and_lists_are_read_and_other_files_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"NAME"},
            "spec":{"type":"LoadBalancer","externalTrafficPolicy":"Local","ports":[{"port":80}]},
            "status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.1"}]}}}"#;
        write(dir.path(), "one.json", &svc.replace("NAME", "json"));
        let list = format!(
            r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
            svc.replace("NAME", "listed")
        );
        write(dir.path(), "list.json", &list);
        for skipped in [
            ".hidden.yaml",
            ".web.yaml.swp",
            "web.yaml~",
            "#web.yaml#",
            "notes.txt",
        ] {
            write(dir.path(), skipped, "not: [valid");
        }
        fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(loaded.errors, vec![]);
        let names: Vec<_> = loaded
            .snapshot
            .services
            .keys()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["json", "listed"]);
        assert_eq!(
            loaded.snapshot.services[&web("default", "json")].traffic_policy,
            TrafficPolicy::Local
        );
    }

    #[test]
    fn same_object_in_two_files_first_file_wins() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &lb_service("web", "192.0.2.1"));
        let b = write(dir.path(), "b.yaml", &lb_service("web", "192.0.2.2"));
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(only_kinds(&loaded.errors), ["duplicate_object"]);
        assert_eq!(loaded.errors[0].origin, b.display().to_string());
        assert!(loaded.errors[0].message.contains("a.yaml"));
        assert_eq!(
            loaded.snapshot.services[&web("default", "web")].vips,
            vec!["192.0.2.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn deleting_a_file_removes_its_services() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        let a = write(dir.path(), "a.yaml", &lb_service("a", "192.0.2.1"));
        write(dir.path(), "b.yaml", &lb_service("b", "192.0.2.2"));
        assert_eq!(source.load().snapshot.services.len(), 2);
        fs::remove_file(a).unwrap();
        let loaded = source.load();
        let names: Vec<_> = loaded
            .snapshot
            .services
            .keys()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["b"]);
        assert!(loaded.errors.is_empty());
    }

    #[test]
    fn missing_directory_is_an_error_and_keeps_what_was_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("m");
        fs::create_dir(&sub).unwrap();
        let mut source = ManifestSource::new(&sub);
        write(&sub, "a.yaml", &lb_service("a", "192.0.2.1"));
        let good = source.load().snapshot;
        fs::remove_dir_all(&sub).unwrap();
        let loaded = source.load();
        assert_eq!(only_kinds(&loaded.errors), ["io"]);
        assert_eq!(loaded.snapshot, good);
    }

    #[test]
    fn a_file_that_empties_keeps_its_objects_until_it_stays_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.yaml", &lb_service("a", "192.0.2.1"));
        let mut source = ManifestSource::new(dir.path());
        let good = source.load().snapshot;
        assert_eq!(good.services.len(), 1);
        // `cmd > a.yaml` has truncated it and not written yet.
        fs::write(&path, "").unwrap();
        let loaded = source.load();
        assert_eq!(
            loaded.snapshot, good,
            "objects kept while the file is just emptied"
        );
        assert!(loaded.recheck.is_some(), "asks to look again");
        // Written again: nothing happened.
        fs::write(&path, lb_service("a", "192.0.2.1")).unwrap();
        assert_eq!(source.load().snapshot, good);
        // Emptied for good: believed once the grace has passed.
        let mut source = ManifestSource::new(dir.path()).with_empty_grace(Duration::ZERO);
        source.load();
        fs::write(&path, "").unwrap();
        let loaded = source.load();
        assert!(loaded.snapshot.services.is_empty());
        assert!(loaded.recheck.is_none());
    }

    #[test]
    fn an_unchanged_file_is_not_parsed_again_and_keeps_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &lb_service("a", "192.0.2.1"));
        let bad = write(dir.path(), "b.yaml", "kind: [unclosed\n");
        let mut source = ManifestSource::new(dir.path());
        let first = source.load();
        assert_eq!(first.parsed, 2);
        let again = source.load();
        assert_eq!(again.parsed, 0, "nothing changed, nothing parsed");
        assert_eq!(
            again.errors, first.errors,
            "the broken file is still reported"
        );
        assert_eq!(again.snapshot, first.snapshot);
        fs::write(&bad, lb_service("b", "192.0.2.2")).unwrap();
        let fixed = source.load();
        assert_eq!(fixed.parsed, 1);
        assert!(fixed.errors.is_empty());
        assert_eq!(fixed.snapshot.services.len(), 2);
    }

    #[test]
    fn an_oversized_file_is_refused_and_its_objects_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "a.yaml", &lb_service("a", "192.0.2.1"));
        let mut source = ManifestSource::new(dir.path());
        let good = source.load().snapshot;
        // A sparse file far over the limit: nothing of it is read.
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4 << 30)
            .unwrap();
        let loaded = source.load();
        assert_eq!(only_kinds(&loaded.errors), ["too_large"]);
        assert!(
            loaded.errors[0].to_string().contains("a.yaml"),
            "{}",
            loaded.errors[0]
        );
        assert_eq!(loaded.snapshot, good);
    }

    #[test]
    fn a_file_with_too_many_documents_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = lb_service("a", "192.0.2.1");
        for _ in 0..MAX_DOCUMENTS {
            text.push_str("---\n{}\n");
        }
        write(dir.path(), "a.yaml", &text);
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(only_kinds(&loaded.errors), ["too_large"]);
        assert!(loaded.snapshot.services.is_empty());
    }

    #[test]
    fn names_the_api_server_would_refuse_are_refused_escaped() {
        let text = r#"apiVersion: v1
kind: Service
metadata: { name: web, namespace: "shop\n2026-11-23T00:00:00Z  INFO forged" }
spec: { type: LoadBalancer, loadBalancerIP: 192.0.2.1, ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: "Web_1", namespace: shop }
spec: { type: LoadBalancer, loadBalancerIP: 192.0.2.2, ports: [{ port: 80 }] }
"#;
        let loaded = load_one(text);
        assert!(loaded.snapshot.services.is_empty());
        assert_eq!(
            where_(&loaded)
                .iter()
                .map(|(k, _, f)| (*k, *f))
                .collect::<Vec<_>>(),
            [
                ("invalid_value", "metadata.namespace"),
                ("invalid_value", "metadata.name")
            ]
        );
        for e in &loaded.errors {
            assert!(!e.to_string().contains('\n'), "unescaped: {e}");
        }
        assert!(
            loaded.errors[0].to_string().contains("\\n"),
            "{}",
            loaded.errors[0]
        );
    }

    #[test]
    fn node_ports_outside_the_node_port_range_are_refused() {
        let text = "apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  type: LoadBalancer
  loadBalancerIP: 192.0.2.1
  externalTrafficPolicy: Local
  healthCheckNodePort: 1
  ports: [{ name: http, port: 80, nodePort: 22 }, { name: dns, port: 53, nodePort: 30053 }]
";
        let loaded = load_one(text);
        assert_eq!(
            where_(&loaded)
                .iter()
                .map(|(k, _, f)| (*k, *f))
                .collect::<Vec<_>>(),
            [
                ("invalid_value", "spec.healthCheckNodePort"),
                ("invalid_value", "spec.ports[0].nodePort")
            ]
        );
        let svc = &loaded.snapshot.services[&web("shop", "web")];
        assert_eq!(svc.health_check_node_port, None);
        assert_eq!(svc.ports[0].node_port, None);
        assert_eq!(svc.ports[1].node_port, Some(30053));
        // A cluster with another range.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "svc.yaml", text);
        let loaded = ManifestSource::new(dir.path())
            .with_node_ports(1..=32767)
            .load();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    }

    const THREE_NODES: &str = include_str!("testdata/three-nodes.yaml");

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn nets(v: &[&str]) -> Vec<ipnet::IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn load_one(text: &str) -> Loaded {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "svc.yaml", text);
        ManifestSource::new(dir.path()).load()
    }

    /// (kind, object, field) of every error.
    fn where_(loaded: &Loaded) -> Vec<(&'static str, &str, &str)> {
        loaded
            .errors
            .iter()
            .map(|e| (e.kind(), e.object.as_str(), e.field.as_str()))
            .collect()
    }

    #[test]
    fn three_node_lab_reads_nodes_and_every_frontend() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "lab.yaml", THREE_NODES);
        let loaded = ManifestSource::new(dir.path()).load();
        assert_eq!(loaded.errors, vec![]);
        let snap = &loaded.snapshot;

        let node = |name: &str, addrs: &[&str], external: &[&str]| model::Node {
            name: name.into(),
            internal_ips: ips(addrs),
            external_ips: ips(external),
            labels: BTreeMap::from([("kubernetes.io/hostname".into(), name.into())]),
            origin: path.display().to_string(),
        };
        assert_eq!(
            snap.nodes,
            BTreeMap::from([
                ("node-a".to_string(), node("node-a", &["10.0.0.11"], &[])),
                ("node-b".to_string(), node("node-b", &["10.0.0.12"], &[])),
                // InternalIPs, both families, manifest order; ExternalIPs apart.
                (
                    "node-c".to_string(),
                    node("node-c", &["fd00::13", "10.0.0.13"], &["203.0.113.13"])
                ),
            ])
        );
        assert_eq!(snap.nodes["node-c"].ipv4(), Some(ips(&["10.0.0.13"])[0]));

        let svc = &snap.services[&web("shop", "web")];
        assert_eq!(svc.service_type, ServiceType::LoadBalancer);
        assert_eq!(svc.vips, ips(&["10.0.100.1"]));
        assert_eq!(svc.external_ips, ips(&["198.51.100.7"]));
        assert_eq!(svc.traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(svc.source_ranges, nets(&["192.0.2.0/24", "203.0.113.9/32"]));
        assert_eq!(svc.affinity_timeout, Some(600));
        assert_eq!(svc.health_check_node_port, None);
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|p| (p.index, p.port, p.node_port, p.protocol, p.endpoints.len()))
            .collect();
        assert_eq!(
            ports,
            [
                (0, 80, Some(30080), Protocol::Tcp, 4),
                (1, 53, Some(30053), Protocol::Udp, 4)
            ]
        );
        let nodes: Vec<_> = svc.ports[0]
            .endpoints
            .iter()
            .map(|e| e.node_name.as_deref().unwrap())
            .collect();
        assert_eq!(nodes, ["node-a", "node-b", "node-b", "node-c"]);

        let admin = &snap.services[&web("shop", "admin")];
        assert_eq!(admin.service_type, ServiceType::NodePort);
        assert!(admin.vips.is_empty() && admin.source_ranges.is_empty());
        assert_eq!(admin.ports[0].node_port, Some(30443));
        assert_eq!(admin.affinity_timeout, None);

        let api = &snap.services[&web("shop", "api")];
        assert_eq!(api.vips, ips(&["10.0.100.2"]), "from metallb.io annotation");
        assert_eq!(api.traffic_policy, TrafficPolicy::Local);
        assert_eq!(api.health_check_node_port, Some(32000));

        assert!(!snap.services.contains_key(&web("shop", "internal")));
    }

    #[test]
    fn vip_sources_in_order_spec_annotations_then_status() {
        let svc = |name: &str, annotations: &str, spec_ip: &str, status: &str| {
            format!(
                "apiVersion: v1
kind: Service
metadata: {{ name: {name}, annotations: {{ {annotations} }} }}
spec: {{ type: LoadBalancer, {spec_ip} ports: [{{ port: 80 }}] }}
status: {{ loadBalancer: {{ ingress: [{status}] }} }}
---
"
            )
        };
        let both = "metallb.io/loadBalancerIPs: '192.0.2.3, 192.0.2.4', \
                    metallb.universe.tf/loadBalancerIPs: 192.0.2.5";
        let text = [
            svc(
                "status",
                both,
                "loadBalancerIP: 192.0.2.2,",
                "{ ip: 192.0.2.1 }",
            ),
            svc("spec", both, "loadBalancerIP: 192.0.2.2,", ""),
            svc("current", both, "", ""),
            svc(
                "legacy",
                "metallb.universe.tf/loadBalancerIPs: 192.0.2.5",
                "",
                "",
            ),
            svc(
                "dual",
                "metallb.io/loadBalancerIPs: '192.0.2.6,2001:db8::6'",
                "",
                "",
            ),
            svc("bad", "metallb.io/loadBalancerIPs: 192.0.2.300", "", ""),
        ]
        .concat();
        let loaded = load_one(&text);
        let field = "metadata.annotations[metallb.io/loadBalancerIPs]";
        assert_eq!(
            where_(&loaded),
            [
                ("unsupported_ip_family", "Service default/dual", field),
                ("invalid_ip", "Service default/bad", field),
            ]
        );
        let vips = |name: &str| loaded.snapshot.services[&web("default", name)].vips.clone();
        // The request wins over status (which shows an earlier one).
        assert_eq!(vips("status"), ips(&["192.0.2.2"]));
        assert_eq!(vips("spec"), ips(&["192.0.2.2"]));
        assert_eq!(vips("current"), ips(&["192.0.2.3", "192.0.2.4"]));
        assert_eq!(vips("legacy"), ips(&["192.0.2.5"]));
        // IPv6 is kept in the model (held, in status) and reported as not served.
        assert_eq!(vips("dual"), ips(&["192.0.2.6", "2001:db8::6"]));
        assert!(
            !loaded
                .snapshot
                .services
                .contains_key(&web("default", "bad"))
        );
    }

    #[test]
    fn invalid_external_ip_names_its_index_and_keeps_the_last_good_service() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        let svc = |external: &str| {
            format!(
                "apiVersion: v1
kind: Service
metadata: {{ name: web }}
spec:
  type: NodePort
  externalIPs: [{external}]
  ports: [{{ port: 80, nodePort: 30080 }}]
"
            )
        };
        write(dir.path(), "a.yaml", &svc("198.51.100.7, 198.51.100.8"));
        let good = source.load();
        assert_eq!(good.errors, vec![]);
        assert_eq!(
            good.snapshot.services[&web("default", "web")].external_ips,
            ips(&["198.51.100.7", "198.51.100.8"])
        );

        write(
            dir.path(),
            "a.yaml",
            &svc("198.51.100.7, 198.51.100.800, \"2001:db8::7\""),
        );
        let loaded = source.load();
        assert_eq!(
            where_(&loaded),
            [
                ("invalid_ip", "Service default/web", "spec.externalIPs[1]"),
                (
                    "unsupported_ip_family",
                    "Service default/web",
                    "spec.externalIPs[2]"
                ),
            ]
        );
        assert_eq!(loaded.snapshot, good.snapshot);
    }

    #[test]
    fn invalid_source_range_never_opens_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        let svc = |name: &str, ranges: &str| {
            format!(
                "apiVersion: v1
kind: Service
metadata: {{ name: {name} }}
spec:
  type: LoadBalancer
  loadBalancerIP: 192.0.2.1
  loadBalancerSourceRanges: [{ranges}]
  ports: [{{ port: 80 }}]
---
"
            )
        };
        // Host bits are cleared and duplicates merged, as Go's net.ParseCIDR reads them.
        write(
            dir.path(),
            "a.yaml",
            &svc("web", "10.1.2.3/8, 10.0.0.0/8, \" 192.0.2.0/24 \""),
        );
        let good = source.load();
        assert_eq!(good.errors, vec![]);
        assert_eq!(
            good.snapshot.services[&web("default", "web")].source_ranges,
            nets(&["10.0.0.0/8", "192.0.2.0/24"])
        );

        // Every range invalid: dropping them would leave "allow all". The last good
        // version (with its ranges) stays; a Service never good is not served at all.
        write(
            dir.path(),
            "a.yaml",
            &[svc("web", "10.0.0.0/33"), svc("new", "192.0.2.7")].concat(),
        );
        let loaded = source.load();
        assert_eq!(
            where_(&loaded),
            [
                (
                    "invalid_value",
                    "Service default/web",
                    "spec.loadBalancerSourceRanges[0]"
                ),
                (
                    "invalid_value",
                    "Service default/new",
                    "spec.loadBalancerSourceRanges[0]"
                ),
            ]
        );
        assert!(loaded.errors[0].message.contains("\"10.0.0.0/33\""));
        assert_eq!(loaded.snapshot, good.snapshot);
    }

    #[test]
    fn source_ranges_annotation_is_used_when_the_field_is_empty() {
        let loaded = load_one(
            "apiVersion: v1
kind: Service
metadata:
  name: web
  annotations:
    service.beta.kubernetes.io/load-balancer-source-ranges: 192.0.2.0/24,198.51.100.0/25
spec: { type: LoadBalancer, loadBalancerIP: 192.0.2.1, ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Service
metadata:
  name: bad
  annotations: { service.beta.kubernetes.io/load-balancer-source-ranges: 'nope' }
spec: { type: LoadBalancer, loadBalancerIP: 192.0.2.2, ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Service
metadata:
  name: field-wins
  annotations: { service.beta.kubernetes.io/load-balancer-source-ranges: 'nope' }
spec:
  type: LoadBalancer
  loadBalancerIP: 192.0.2.3
  loadBalancerSourceRanges: [203.0.113.0/24]
  ports: [{ port: 80 }]
",
        );
        assert_eq!(
            where_(&loaded),
            [(
                "invalid_value",
                "Service default/bad",
                "metadata.annotations[service.beta.kubernetes.io/load-balancer-source-ranges]"
            )]
        );
        let ranges = |name: &str| {
            loaded.snapshot.services[&web("default", name)]
                .source_ranges
                .clone()
        };
        assert_eq!(ranges("web"), nets(&["192.0.2.0/24", "198.51.100.0/25"]));
        assert_eq!(ranges("field-wins"), nets(&["203.0.113.0/24"]));
        assert!(
            !loaded
                .snapshot
                .services
                .contains_key(&web("default", "bad"))
        );
    }

    #[test]
    fn session_affinity_defaults_and_bounds() {
        let svc = |name: &str, affinity: &str| {
            format!(
                "apiVersion: v1
kind: Service
metadata: {{ name: {name} }}
spec: {{ type: NodePort, ports: [{{ port: 80 }}], {affinity} }}
---
"
            )
        };
        let loaded = load_one(
            &[
                svc("none", "sessionAffinity: None"),
                svc("default", "sessionAffinity: ClientIP"),
                svc(
                    "max",
                    "sessionAffinity: ClientIP, sessionAffinityConfig: { clientIP: { timeoutSeconds: 86400 } }",
                ),
                svc(
                    "zero",
                    "sessionAffinity: ClientIP, sessionAffinityConfig: { clientIP: { timeoutSeconds: 0 } }",
                ),
                svc(
                    "long",
                    "sessionAffinity: ClientIP, sessionAffinityConfig: { clientIP: { timeoutSeconds: 86401 } }",
                ),
                svc("odd", "sessionAffinity: Cookie"),
            ]
            .concat(),
        );
        let field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
        assert_eq!(
            where_(&loaded),
            [
                ("invalid_value", "Service default/zero", field),
                ("invalid_value", "Service default/long", field),
                (
                    "invalid_value",
                    "Service default/odd",
                    "spec.sessionAffinity"
                ),
            ]
        );
        let timeout = |name: &str| loaded.snapshot.services[&web("default", name)].affinity_timeout;
        assert_eq!(timeout("none"), None);
        assert_eq!(timeout("default"), Some(10_800));
        assert_eq!(timeout("max"), Some(86_400));
        assert_eq!(loaded.snapshot.services.len(), 3);
    }

    #[test]
    fn bad_node_ports_lose_only_themselves() {
        let loaded = load_one(
            "apiVersion: v1
kind: Service
metadata: { name: web }
spec:
  type: LoadBalancer
  loadBalancerIP: 192.0.2.1
  ports:
    - { name: a, port: 80, nodePort: 70000 }
    - { name: b, port: 81, nodePort: 30081 }
    - { name: c, port: 82, nodePort: 30081 }
    - { name: d, port: 81, protocol: UDP, nodePort: 30081 }
    - { name: e, port: 84, nodePort: 0 }
",
        );
        assert_eq!(
            where_(&loaded),
            [
                (
                    "invalid_value",
                    "Service default/web",
                    "spec.ports[0].nodePort"
                ),
                (
                    "invalid_value",
                    "Service default/web",
                    "spec.ports[2].nodePort"
                ),
            ]
        );
        let got: Vec<_> = loaded.snapshot.services[&web("default", "web")]
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.node_port))
            .collect();
        assert_eq!(
            got,
            [
                ("a", None),
                ("b", Some(30081)),
                ("c", None),
                // Same number, other protocol: allowed, as in Kubernetes.
                ("d", Some(30081)),
                // 0 asks the API server to allocate one; nothing does here.
                ("e", None),
            ]
        );
    }

    #[test]
    fn health_check_node_port_only_for_local_load_balancers() {
        let svc = |name: &str, ty: &str, policy: &str, hc: i64| {
            format!(
                "apiVersion: v1
kind: Service
metadata: {{ name: {name} }}
spec:
  type: {ty}
  externalTrafficPolicy: {policy}
  healthCheckNodePort: {hc}
  ports: [{{ port: 80 }}]
---
"
            )
        };
        let loaded = load_one(
            &[
                svc("local", "LoadBalancer", "Local", 32000),
                svc("cluster", "LoadBalancer", "Cluster", 32001),
                svc("nodeport", "NodePort", "Local", 32002),
                svc("huge", "LoadBalancer", "Local", 65536),
            ]
            .concat(),
        );
        let field = "spec.healthCheckNodePort";
        assert_eq!(
            where_(&loaded),
            [
                ("invalid_value", "Service default/cluster", field),
                ("invalid_value", "Service default/nodeport", field),
                ("invalid_value", "Service default/huge", field),
            ]
        );
        let hc =
            |name: &str| loaded.snapshot.services[&web("default", name)].health_check_node_port;
        assert_eq!(hc("local"), Some(32000));
        assert_eq!(hc("cluster"), None);
        assert_eq!(hc("nodeport"), None);
        assert_eq!(hc("huge"), None, "the Service is kept, without the field");
    }

    #[test]
    fn node_with_invalid_address_keeps_its_last_good_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        let node = |addr: &str| {
            format!(
                "apiVersion: v1
kind: Node
metadata: {{ name: node-a, namespace: ignored }}
status:
  addresses:
    - {{ type: Hostname, address: not-an-ip }}
    - {{ type: InternalIP, address: {addr} }}
"
            )
        };
        write(dir.path(), "nodes.yaml", &node("10.0.0.11"));
        let good = source.load();
        assert_eq!(good.errors, vec![]);
        assert_eq!(
            good.snapshot.nodes["node-a"].internal_ips,
            ips(&["10.0.0.11"])
        );

        write(dir.path(), "nodes.yaml", &node("10.0.0.311"));
        let loaded = source.load();
        assert_eq!(
            where_(&loaded),
            [("invalid_ip", "Node node-a", "status.addresses[1].address")]
        );
        assert_eq!(loaded.snapshot, good.snapshot);

        // Cluster-scoped: the same name in a second file is a duplicate, whatever
        // namespace it claims.
        write(dir.path(), "nodes.yaml", &node("10.0.0.11"));
        write(dir.path(), "other.yaml", &node("10.0.0.99"));
        let loaded = source.load();
        assert_eq!(where_(&loaded), [("duplicate_object", "Node node-a", "")]);
        assert_eq!(
            loaded.snapshot.nodes["node-a"].internal_ips,
            ips(&["10.0.0.11"])
        );

        // Deleted with its file.
        fs::remove_file(dir.path().join("nodes.yaml")).unwrap();
        fs::remove_file(dir.path().join("other.yaml")).unwrap();
        assert!(source.load().snapshot.nodes.is_empty());
    }

    #[tokio::test]
    async fn watcher_fires_on_a_file_write() {
        let dir = tempfile::tempdir().unwrap();
        let (_watcher, mut changes) = watch(dir.path()).unwrap();
        write(dir.path(), "web.yaml", &lb_service("web", "192.0.2.1"));
        tokio::time::timeout(Duration::from_secs(10), changes.recv())
            .await
            .expect("no change notification within 10s")
            .expect("watcher channel closed");
    }

    const APISERVER: &str = "apiVersion: xlb.dev/v1alpha1
kind: StaticService
metadata: { name: kube-apiserver, namespace: kube-system, labels: { tier: control-plane } }
spec:
  addresses: [10.0.0.100]
  ports:
  - name: https
    port: 6443
    backends: [\"10.0.0.11:6443\", \"10.0.0.12:6443\", \"10.0.0.12:6443\"]
  - { name: dns, port: 53, protocol: UDP, backends: [\"10.0.0.11:5353\"] }
  healthCheck: { type: HTTPS, path: /readyz, interval: 500ms, fall: 4 }
";

    #[test]
    fn static_service_becomes_a_cluster_load_balancer_with_its_backends() {
        let loaded = load_one(APISERVER);
        assert_eq!(loaded.errors, []);
        let svc = &loaded.snapshot.services[&web("kube-system", "kube-apiserver")];
        assert_eq!(svc.service_type, ServiceType::LoadBalancer);
        assert_eq!(svc.traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(svc.vips, ips(&["10.0.0.100"]));
        assert_eq!(svc.labels["tier"], "control-plane");
        let ports: Vec<(u16, Protocol, Vec<String>)> = svc
            .ports
            .iter()
            .map(|p| {
                let eps = p.endpoints.iter().map(|e| format!("{}:{}", e.addr, e.port));
                (p.port, p.protocol, eps.collect())
            })
            .collect();
        // The repeated backend is listed once; every backend starts ready.
        assert_eq!(
            ports,
            [
                (
                    6443,
                    Protocol::Tcp,
                    vec!["10.0.0.11:6443".into(), "10.0.0.12:6443".into()]
                ),
                (53, Protocol::Udp, vec!["10.0.0.11:5353".into()]),
            ]
        );
        let all = svc.ports.iter().flat_map(|p| &p.endpoints);
        assert!(
            all.clone()
                .all(|e| e.ready && e.serving && e.node_name.is_none())
        );
        let st = svc.static_service.as_ref().unwrap();
        assert_eq!(st.forwarding, model::Forwarding::Snat);
        let check = st.health_check.as_ref().unwrap();
        assert_eq!(
            check.kind,
            model::CheckKind::Https {
                path: "/readyz".into()
            }
        );
        // Unset fields take HAProxy's defaults; set ones are kept.
        assert_eq!(
            (
                check.port,
                check.interval,
                check.timeout,
                check.rise,
                check.fall
            ),
            (
                None,
                Duration::from_millis(500),
                Duration::from_millis(500),
                2,
                4
            )
        );
    }

    #[test]
    fn bad_static_service_fields_are_named_and_the_last_good_version_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = ManifestSource::new(dir.path());
        write(dir.path(), "api.yaml", APISERVER);
        source.load();
        let sref = web("kube-system", "kube-apiserver");

        // A bad backend or port loses only itself.
        let text = APISERVER
            .replace(
                "\"10.0.0.12:6443\", \"10.0.0.12:6443\"",
                "\"10.0.0.12\", \"10.0.0.13:6443\"",
            )
            .replace("port: 53, protocol: UDP", "port: 53, protocol: SCTP");
        write(dir.path(), "api.yaml", &text);
        let loaded = source.load();
        assert_eq!(
            where_(&loaded),
            [
                (
                    "invalid_value",
                    "StaticService kube-system/kube-apiserver",
                    "spec.ports[0].backends[1]"
                ),
                (
                    "unsupported_protocol",
                    "StaticService kube-system/kube-apiserver",
                    "spec.ports[1].protocol"
                ),
            ]
        );
        let good = loaded.snapshot.clone();
        let svc = &good.services[&sref];
        assert_eq!(svc.ports.len(), 1);
        let eps: Vec<String> = svc.ports[0]
            .endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(eps, ["10.0.0.11", "10.0.0.13"]);

        // What changes the meaning of the whole object keeps its last good version
        // (the one just loaded).
        for (from, to, kind, field) in [
            (
                "10.0.0.100",
                "10.0.0.300",
                "invalid_ip",
                "spec.addresses[0]",
            ),
            (
                "type: HTTPS",
                "type: ICMP",
                "invalid_value",
                "spec.healthCheck.type",
            ),
            (
                "interval: 500ms",
                "interval: 5ms",
                "invalid_value",
                "spec.healthCheck.interval",
            ),
            (
                "interval: 500ms",
                "interval: half a second",
                "invalid_value",
                "spec.healthCheck.interval",
            ),
            (
                "interval: 500ms",
                "timeout: 3s",
                "invalid_value",
                "spec.healthCheck.timeout",
            ),
            (
                "fall: 4",
                "fall: 0",
                "invalid_value",
                "spec.healthCheck.fall",
            ),
            (
                "path: /readyz",
                "path: readyz",
                "invalid_value",
                "spec.healthCheck.path",
            ),
            (
                "  healthCheck",
                "  forwarding: NAT\n  healthCheck",
                "invalid_value",
                "spec.forwarding",
            ),
        ] {
            // Written twice to keep the file's size from matching the good version's.
            write(dir.path(), "api.yaml", "");
            write(dir.path(), "api.yaml", &text.replace(from, to));
            let loaded = source.load();
            // The new error first (the object is refused before its ports are
            // read), then the two partial ones of the version being kept.
            let found = where_(&loaded);
            assert_eq!(found.len(), 3, "{from} -> {to}: {found:?}");
            assert_eq!(
                found[0],
                (kind, "StaticService kube-system/kube-apiserver", field),
                "{from} -> {to}"
            );
            assert_eq!(
                loaded.snapshot.services[&sref], good.services[&sref],
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn a_service_and_a_static_service_of_one_name_keep_the_service() {
        let text = format!(
            "{}---\n{}",
            lb_service("kube-apiserver", "192.0.2.1").replace(
                "name: kube-apiserver",
                "name: kube-apiserver, namespace: kube-system"
            ),
            APISERVER
        );
        let loaded = load_one(&text);
        assert_eq!(
            where_(&loaded),
            [(
                "duplicate_object",
                "StaticService kube-system/kube-apiserver",
                "metadata.name"
            )]
        );
        let svc = &loaded.snapshot.services[&web("kube-system", "kube-apiserver")];
        assert!(svc.static_service.is_none());
        assert_eq!(svc.vips, ips(&["192.0.2.1"]));
    }

    #[test]
    fn health_verdicts_become_endpoint_readiness_of_the_static_service_alone() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "api.yaml", APISERVER);
        write(dir.path(), "web.yaml", &lb_service("web", "192.0.2.1"));
        let mut source = ManifestSource::new(dir.path());
        let first = source.load();
        let sref = web("kube-system", "kube-apiserver");
        let check = first.snapshot.services[&sref]
            .static_service
            .as_ref()
            .and_then(|s| s.health_check.clone())
            .unwrap();
        let probe = |a: &str| check.probe(a.parse().unwrap());
        assert!(source.load_if_changed().is_none());

        // One backend fails: only its endpoint, only this Service.
        source.set_health(BTreeMap::from([
            (probe("10.0.0.11:6443"), true),
            (probe("10.0.0.12:6443"), false),
        ]));
        let loaded = source
            .load_if_changed()
            .expect("a verdict changed the model");
        assert_eq!(
            loaded.changed,
            Changed::Services(BTreeSet::from([sref.clone()]))
        );
        let ready = |l: &Loaded| -> Vec<(String, bool)> {
            l.snapshot.services[&sref].ports[0]
                .endpoints
                .iter()
                .map(|e| (e.addr.to_string(), e.ready))
                .collect()
        };
        assert_eq!(
            ready(&loaded),
            [("10.0.0.11".into(), true), ("10.0.0.12".into(), false)]
        );
        // The same verdicts again change nothing.
        source.set_health(BTreeMap::from([(probe("10.0.0.12:6443"), false)]));
        assert!(source.load_if_changed().is_none());
        // A rewrite of the file keeps the verdict; a probe no longer reported counts
        // as healthy again.
        write(
            dir.path(),
            "api.yaml",
            &APISERVER.replace("fall: 4", "fall: 5"),
        );
        let loaded = source.load_if_changed().unwrap();
        assert_eq!(
            ready(&loaded)[1],
            ("10.0.0.12".into(), true),
            "new check, no verdict yet"
        );
        source.set_health(BTreeMap::new());
        assert!(source.load_if_changed().is_none());
    }

    #[test]
    fn the_static_examples_in_deploy_parse_cleanly() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/static");
        let loaded = ManifestSource::new(dir).load();
        assert_eq!(loaded.errors, []);
        let statics: Vec<String> = loaded
            .snapshot
            .services
            .iter()
            .filter(|(_, s)| s.static_service.is_some())
            .map(|(r, _)| r.to_string())
            .collect();
        assert_eq!(
            statics,
            ["ingress-nginx/ingress", "kube-system/kube-apiserver"]
        );
        assert_eq!(loaded.snapshot.nodes.len(), 3);
        assert_eq!(loaded.snapshot.l2_announcements.len(), 2);
    }

    #[test]
    fn pools_reaching_into_special_purpose_addresses_are_refused() {
        let pool = |name: &str, addrs: &str| {
            format!(
                "apiVersion: xlb.dev/v1alpha1\nkind: AddressPool\nmetadata: {{ name: {name}, namespace: xlb-system }}\nspec: {{ addresses: [{addrs}] }}\n"
            )
        };
        let refused = [
            ("all4", "0.0.0.0/0", "\"this network\""),
            ("all6", "\"::/0\"", "unspecified and loopback"),
            ("lo", "127.0.0.0/8", "loopback"),
            ("ll", "169.254.0.0/16", "link-local"),
            ("mc", "224.0.0.0/24", "multicast"),
            ("bc", "255.255.255.255/32", "broadcast"),
            ("mc6", "\"ff02::/16\"", "multicast"),
            ("ll6", "\"fe80::1-fe80::9\"", "link-local"),
            ("span", "223.255.255.250-224.0.0.5", "multicast"),
        ];
        let mut docs: Vec<String> = refused.iter().map(|(n, a, _)| pool(n, a)).collect();
        docs.push(pool("ok", "10.0.0.0/8, 192.0.2.0/24, \"2001:db8::/64\""));
        let loaded = load_one(&docs.join("---\n"));
        let pools: Vec<&str> = loaded
            .snapshot
            .address_pools
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(pools, ["ok"], "{:#?}", loaded.errors);
        for (name, _, what) in refused {
            let e = loaded
                .errors
                .iter()
                .find(|e| e.object.contains(&format!("/{name}")))
                .unwrap_or_else(|| panic!("no error for {name}: {:#?}", loaded.errors));
            assert_eq!(e.field, "spec.addresses[0]", "{e:?}");
            assert!(e.message.contains(what), "{name}: {}", e.message);
        }
    }

    #[test]
    fn address_pools_give_addresses_with_metallb_annotations_and_classes() {
        let pools = "apiVersion: xlb.dev/v1alpha1
kind: AddressPool
metadata: { name: public, namespace: xlb-system }
spec: { addresses: [192.0.2.10-192.0.2.11], serviceAllocation: { priority: 1 } }
---
apiVersion: xlb.dev/v1alpha1
kind: AddressPool
metadata: { name: lab, namespace: xlb-system }
spec: { addresses: [10.0.100.0/30], autoAssign: false }
";
        let svc = |name: &str, extra: &str| {
            format!(
                "apiVersion: v1
kind: Service
metadata: {{ name: {name}, namespace: shop{extra} }}
spec: {{ type: LoadBalancer, ports: [{{ name: http, port: 80 }}] }}
"
            )
        };
        let text = [
            pools.to_string(),
            svc("a", ", creationTimestamp: \"2024-01-01T00:00:00Z\""),
            svc(
                "b",
                ", annotations: { metallb.universe.tf/address-pool: lab }",
            ),
            svc("c", ", annotations: { metallb.io/address-pool: lab }"),
            svc("d", ", annotations: { xlb.dev/address-pool: nope }"),
            svc("e", "").replace(
                "type: LoadBalancer",
                "type: LoadBalancer, loadBalancerClass: other.io/lb",
            ),
            svc("f", "").replace(
                "type: LoadBalancer",
                "type: LoadBalancer, loadBalancerIP: 192.0.2.10",
            ),
        ]
        .join("---\n");
        let loaded = load_one(&text);
        let vip = |n: &str| {
            loaded
                .snapshot
                .services
                .get(&web("shop", n))
                .map(|s| s.vips.clone())
        };
        // f named 192.0.2.10 itself, so a (the only other asking the public pool)
        // gets .11; b and c get two addresses of the lab pool they name.
        assert_eq!(vip("f"), Some(ips(&["192.0.2.10"])));
        assert_eq!(vip("a"), Some(ips(&["192.0.2.11"])));
        let (b, c) = (vip("b").unwrap(), vip("c").unwrap());
        assert!(
            b[0].to_string().starts_with("10.0.100.") && c[0].to_string().starts_with("10.0.100.")
        );
        assert_ne!(b, c);
        assert_eq!(vip("d"), Some(vec![]), "unknown pool: pending");
        assert_eq!(vip("e"), None, "another class's Service is not ours");
        assert_eq!(
            where_(&loaded),
            [(
                "address_unavailable",
                "Service shop/d",
                "metadata.annotations[address-pool]"
            )]
        );
    }

    #[test]
    fn namespace_labels_select_pools_and_families_and_sharing_apply() {
        let text = "apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { tier: public } }
---
apiVersion: xlb.dev/v1alpha1
kind: AddressPool
metadata: { name: public, namespace: xlb-system }
spec:
  addresses: [192.0.2.0/29, 'fd00::10-fd00::17']
  serviceAllocation: { namespaceSelectors: [{ matchLabels: { tier: public } }] }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop, creationTimestamp: '2024-01-01T00:00:00Z' }
spec: { type: LoadBalancer, ipFamilyPolicy: PreferDualStack, ipFamilies: [IPv6], ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: other }
spec: { type: LoadBalancer, ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: first, namespace: shop, creationTimestamp: '2024-01-01T00:00:00Z',
            annotations: { metallb.io/allow-shared-ip: k, metallb.io/loadBalancerIPs: 192.0.2.7 } }
spec: { type: LoadBalancer, ports: [{ port: 53, protocol: UDP }] }
---
apiVersion: v1
kind: Service
metadata: { name: joins, namespace: shop, creationTimestamp: '2024-01-02T00:00:00Z',
            annotations: { xlb.dev/allow-shared-ip: k, xlb.dev/loadBalancerIPs: 192.0.2.7 } }
spec: { type: LoadBalancer, ports: [{ port: 53, protocol: TCP }] }
---
apiVersion: v1
kind: Service
metadata: { name: refused, namespace: shop, creationTimestamp: '2024-01-03T00:00:00Z' }
spec: { type: LoadBalancer, loadBalancerIP: 192.0.2.7, ports: [{ port: 80 }] }
";
        let loaded = load_one(text);
        let vips = |ns: &str, n: &str| loaded.snapshot.services[&web(ns, n)].vips.clone();
        let web_vips = vips("shop", "web");
        assert!(
            web_vips.len() == 2 && web_vips[0].is_ipv6() && web_vips[1].is_ipv4(),
            "{web_vips:?}"
        );
        assert!(vips("other", "web").is_empty(), "not a public namespace");
        assert_eq!(vips("shop", "first"), ips(&["192.0.2.7"]));
        assert_eq!(vips("shop", "joins"), ips(&["192.0.2.7"]));
        assert!(vips("shop", "refused").is_empty());
        let got = where_(&loaded);
        assert!(
            got.contains(&(
                "vip_conflict",
                "Service shop/refused",
                "metadata.annotations[allow-shared-ip]"
            )),
            "{got:?}"
        );
        assert!(got.contains(&("address_unavailable", "Service other/web", "")));
        // Relabelled: the pool no longer admits shop; without it, nothing moves in.
        let relabelled = text.replace(
            "tier: public } }\n---\napiVersion: xlb",
            "tier: private } }\n---\napiVersion: xlb",
        );
        assert_ne!(relabelled, text);
        let loaded = load_one(&relabelled);
        assert!(
            loaded.snapshot.services[&web("shop", "web")]
                .vips
                .is_empty()
        );
    }

    #[test]
    fn bad_selectors_name_their_list_and_index() {
        let text = "apiVersion: xlb.dev/v1alpha1
kind: AddressPool
metadata: { name: p, namespace: xlb-system }
spec:
  addresses: [192.0.2.0/29]
  serviceAllocation:
    namespaceSelectors: [{}, { matchExpressions: [{ key: a, operator: Near }] }]
    serviceSelectors: [{ matchExpressions: [{ key: a, operator: In }] }]
---
apiVersion: xlb.dev/v1alpha1
kind: L2Announcement
metadata: { name: l2, namespace: xlb-system }
spec: { nodeSelectors: [{ matchExpressions: [{ key: a, operator: Exists, values: [x] }] }] }
";
        let loaded = load_one(text);
        let fields: Vec<&str> = loaded.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.serviceAllocation.namespaceSelectors[1].matchExpressions[0].operator",
                "spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].values",
                "spec.nodeSelectors[0].matchExpressions[0].values",
            ]
        );
        assert!(loaded.snapshot.address_pools.is_empty());
    }

    #[test]
    fn bgp_objects_are_read_and_bad_fields_named() {
        let good = "apiVersion: xlb.dev/v1alpha1
kind: BGPPeer
metadata: { name: tor, namespace: xlb-system }
spec: { myASN: 4200000002, peerASN: 4200000001, peerAddress: 10.0.0.1, holdTime: 9s, bfdProfile: fast }
---
apiVersion: xlb.dev/v1alpha1
kind: BGPAnnouncement
metadata: { name: all, namespace: xlb-system }
spec: { communities: [\"64512:100\", \"large:1:2:3\"], localPref: 50, aggregationLength: 24 }
---
apiVersion: xlb.dev/v1alpha1
kind: BFDProfile
metadata: { name: fast, namespace: xlb-system }
spec: { receiveInterval: 100 }
";
        let loaded = load_one(good);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let bgp = &loaded.snapshot.bgp;
        let peer = &bgp.peers["xlb-system/tor"];
        assert_eq!(
            (peer.my_asn, peer.peer_asn, peer.peer_port),
            (4_200_000_002, 4_200_000_001, 179)
        );
        assert_eq!(peer.hold_time, std::time::Duration::from_secs(9));
        let ad = &bgp.announcements["xlb-system/all"];
        assert_eq!(ad.communities, [64512 << 16 | 100]);
        assert_eq!(ad.large_communities, [[1, 2, 3]]);
        assert_eq!((ad.local_pref, ad.aggregation_length), (Some(50), 24));
        let bfd = &bgp.bfd_profiles["fast"];
        assert_eq!(bfd.receive_interval, std::time::Duration::from_millis(100));
        assert_eq!(
            (bfd.transmit_interval.as_millis(), bfd.detect_multiplier),
            (300, 3)
        );

        let bad = "apiVersion: xlb.dev/v1alpha1
kind: BGPPeer
metadata: { name: tor, namespace: xlb-system }
spec: { myASN: 0, peerASN: 64512, peerAddress: 10.0.0.300, holdTime: 2s }
---
apiVersion: xlb.dev/v1alpha1
kind: BGPAnnouncement
metadata: { name: all, namespace: xlb-system }
spec: { communities: [\"65536:1\"], aggregationLength: 33 }
---
apiVersion: xlb.dev/v1alpha1
kind: BFDProfile
metadata: { name: fast, namespace: xlb-system }
spec: { detectMultiplier: 1 }
";
        let loaded = load_one(bad);
        let fields: Vec<(&str, &str)> = loaded
            .errors
            .iter()
            .map(|e| (e.object.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("BGPPeer xlb-system/tor", "spec.myASN"),
                ("BGPPeer xlb-system/tor", "spec.peerAddress"),
                ("BGPPeer xlb-system/tor", "spec.holdTime"),
                ("BGPAnnouncement xlb-system/all", "spec.communities[0]"),
                ("BGPAnnouncement xlb-system/all", "spec.aggregationLength"),
                ("BFDProfile xlb-system/fast", "spec.detectMultiplier"),
            ]
        );
        assert_eq!(loaded.snapshot.bgp, Default::default());
    }

    #[test]
    fn ttl_security_is_for_directly_connected_ebgp_only() {
        let dir = tempfile::tempdir().unwrap();
        let peer = |name: &str, extra: &str| {
            format!(
                "apiVersion: xlb.dev/v1alpha1\nkind: BGPPeer\nmetadata: {{ name: {name}, namespace: xlb-system }}\nspec: {{ myASN: 4200000002, peerASN: 4200000001, peerAddress: 10.0.0.1, ttlSecurity: true{extra} }}\n"
            )
        };
        let docs = [
            peer("direct", ""),
            peer("far", ", ebgpMultiHop: true"),
            peer("ibgp", ", peerASN: 4200000002").replace("peerASN: 4200000001, ", ""),
        ];
        write(dir.path(), "peers.yaml", &docs.join("---\n"));
        let loaded = ManifestSource::new(dir.path())
            .with_empty_grace(Duration::ZERO)
            .load();
        let peers = &loaded.snapshot.bgp.peers;
        assert!(peers["xlb-system/direct"].ttl_security);
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!(
            where_(&loaded),
            [
                (
                    "invalid_value",
                    "BGPPeer xlb-system/far",
                    "spec.ttlSecurity"
                ),
                (
                    "invalid_value",
                    "BGPPeer xlb-system/ibgp",
                    "spec.ttlSecurity"
                ),
            ]
        );
    }

    #[test]
    fn a_password_secret_gives_its_peer_the_key_and_follows_the_secret() {
        // The conversion both sources share: a Secret in the directory (stringData as
        // written, or base64 data as the API server sends it) keys the peer naming it.
        let dir = tempfile::tempdir().unwrap();
        let peer = "apiVersion: xlb.dev/v1alpha1
kind: BGPPeer
metadata: { name: tor, namespace: xlb-system }
spec: { myASN: 4200000002, peerASN: 4200000001, peerAddress: 10.0.0.1, passwordSecret: { name: tor-key } }
";
        write(dir.path(), "peer.yaml", peer);
        let secret = |data: &str| {
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{ name: tor-key, namespace: xlb-system }}\n{data}\n"
            )
        };
        let mut source = ManifestSource::new(dir.path()).with_empty_grace(Duration::ZERO);
        let password = |l: &Loaded| l.snapshot.bgp.peers["xlb-system/tor"].password.clone();

        // No Secret yet: no key, reported on the peer.
        let loaded = source.load();
        assert_eq!(password(&loaded), None);
        assert_eq!(
            where_(&loaded),
            [(
                "secret_unavailable",
                "BGPPeer xlb-system/tor",
                "spec.passwordSecret"
            )]
        );

        write(
            dir.path(),
            "secret.yaml",
            &secret("stringData: { password: s3cret }"),
        );
        let loaded = source.load_if_changed().unwrap();
        assert_eq!(loaded.errors, vec![]);
        assert_eq!(password(&loaded).as_deref(), Some("s3cret"));
        assert_eq!(loaded.changed, Changed::All, "a new key is a BGP change");

        // base64 "n3w": the key follows the Secret.
        write(
            dir.path(),
            "secret.yaml",
            &secret("data: { password: bjN3 }"),
        );
        let loaded = source.load_if_changed().unwrap();
        assert_eq!(password(&loaded).as_deref(), Some("n3w"));

        // A Secret without the key, then none at all: the peer loses its key.
        write(dir.path(), "secret.yaml", &secret("data: { other: bjN3 }"));
        let loaded = source.load_if_changed().unwrap();
        assert_eq!(password(&loaded), None);
        assert!(
            loaded.errors[0].message.contains("no password key"),
            "{:?}",
            loaded.errors
        );
        fs::remove_file(dir.path().join("secret.yaml")).unwrap();
        let loaded = source.load_if_changed().unwrap();
        assert_eq!(password(&loaded), None);
        assert_eq!(loaded.errors.len(), 1);

        // password and passwordSecret together are refused.
        let both = peer.replace("passwordSecret:", "password: x, passwordSecret:");
        let loaded = load_one(&both);
        assert_eq!(
            where_(&loaded),
            [(
                "invalid_value",
                "BGPPeer xlb-system/tor",
                "spec.passwordSecret"
            )]
        );
    }
}

#[cfg(test)]
// Panicking on a broken fixture is what a test should do.
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod depth_tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A Service whose `spec` is 100,000 nested lists (200 KB) is refused before
    /// parsing, naming the limit (before, that took 28 s, holding up every other
    /// change); 2,000 nested block sequences are refused by the parser itself (in
    /// linear time); the other files' objects load. 100 levels still parse.
    #[test]
    fn deeply_nested_yaml_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let head = "apiVersion: v1\nkind: Service\nmetadata: {name: deep, namespace: x}\nspec: ";
        let n = 100_000;
        let flow = format!("{head}{}{}\n", "[".repeat(n), "]".repeat(n));
        fs::write(dir.path().join("flow.yaml"), flow).unwrap();
        let block = format!("{head}\n{}x\n", "- ".repeat(2_000));
        fs::write(dir.path().join("block.yaml"), block).unwrap();
        let ok = format!("{head}{}{}\n", "[".repeat(100), "]".repeat(100));
        assert_eq!(check_yaml_depth(&ok), Ok(()));
        fs::write(
            dir.path().join("node.yaml"),
            "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n",
        )
        .unwrap();
        let loaded = ManifestSource::new(dir.path()).load();
        let refused: BTreeMap<String, String> = loaded
            .errors
            .iter()
            .map(|e| {
                (
                    e.origin.rsplit('/').next().unwrap().to_string(),
                    e.message.clone(),
                )
            })
            .collect();
        assert_eq!(
            refused.keys().collect::<Vec<_>>(),
            ["block.yaml", "flow.yaml"],
            "{:?}",
            loaded.errors
        );
        assert!(
            refused["flow.yaml"].contains("refused before parsing"),
            "{refused:?}"
        );
        assert!(
            refused["block.yaml"].contains("recursion limit"),
            "{refused:?}"
        );
        assert!(loaded.snapshot.nodes.contains_key("node-a"));
    }
}
