//! The streaming expert store: an [`ExpertProvider`] that keeps pinned
//! experts resident, holds up to `capacity` other experts per MoE layer, and
//! reads the rest from the pack on demand.
//!
//! Every load goes through a per-layer `pending` entry, so an expert is read
//! at most once however many threads (or prefetch calls) ask for it: the
//! model's `prefetch(layer, active)` before its `get`s starts all of a
//! chunk's loads at once on the I/O threads, and a `get` that finds its load
//! not yet started does it itself rather than wait in a queue. Loaded
//! experts are handed out as `Arc`s: eviction drops only the cache's
//! reference, so a chunk with more active experts than slots still reads
//! each one once (the batch's own handles keep them alive until the layer is
//! done), at the cost of briefly exceeding the budget by that layer's extra
//! experts.

use super::buf::BufPool;
use super::io::BlobReader;
use super::policy::{EvictionPolicy, PolicyKind};
use super::prefetch::Predictor;
use super::stats::{CacheStats, StatsSnapshot};
use crate::error::RuntimeError;
use crate::experts::{decode_blob, ExpertMats, ExpertProvider, NextHint};
use crate::weights::{Blob, BlobOwner};
use mfx_formats::codec::Codec;
use mfx_formats::pack::Pack;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// How many experts each MoE layer may keep besides its pinned ones.
#[derive(Debug, Clone, PartialEq)]
pub enum Capacity {
    /// The same count for every layer (mlx-moe's `--capacity`).
    PerLayer(usize),
    /// One count per model layer (dense layers ignored).
    Layers(Vec<usize>),
    /// Everything: the all-resident reference behaviour, loaded lazily.
    Unlimited,
}

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub capacity: Capacity,
    pub policy: PolicyKind,
    /// Bypass the page cache (O_DIRECT / F_NOCACHE) where the filesystem allows.
    pub direct_io: bool,
    /// Check each blob's xxh3 after reading: catches a corrupt pack (bit rot,
    /// a bad download) and one rewritten in place, naming the expert.
    pub verify_checksums: bool,
    /// Background readers for `prefetch` (0: loads happen in `get` only).
    pub io_threads: usize,
    /// Load the pack's pinned experts at open and never evict them.
    pub pin: bool,
    /// Let the model skip non-resident secondary experts (`--skip-missing`).
    pub skip_missing: bool,
    /// Accept the model's next-layer predictions and read them ahead.
    pub prefetch_next: bool,
    /// Memory pressure may resize the cache ([`ExpertCache::set_capacities`]):
    /// a pack that fits whole is then loaded into evictable slots, not pinned.
    pub adaptive: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: Capacity::Unlimited,
            policy: PolicyKind::default(),
            direct_io: true,
            verify_checksums: true,
            io_threads: 2,
            pin: true,
            skip_missing: false,
            prefetch_next: true,
            adaptive: false,
        }
    }
}

type LoadResult = Result<Arc<ExpertMats>, String>;

/// One forward pass through one MoE layer: `(layer, experts, tokens per expert)`.
pub type RoutedPass = (usize, Vec<usize>, Vec<u32>);

/// One load in flight: whoever claims it reads; everyone else waits.
struct Pending {
    claimed: AtomicBool,
    done: Mutex<Option<LoadResult>>,
    cv: Condvar,
}

impl Pending {
    fn new() -> Arc<Self> {
        Arc::new(Pending {
            claimed: AtomicBool::new(false),
            done: Mutex::new(None),
            cv: Condvar::new(),
        })
    }
    fn is_done(&self) -> bool {
        lock(&self.done).is_some()
    }
    fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }
    fn fulfil(&self, r: LoadResult) {
        *lock(&self.done) = Some(r);
        self.cv.notify_all();
    }
    fn wait(&self) -> LoadResult {
        let mut g = lock(&self.done);
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

struct LayerSlots {
    capacity: usize,
    pinned: HashMap<usize, Arc<ExpertMats>>,
    resident: HashMap<usize, Arc<ExpertMats>>,
    pending: HashMap<usize, Arc<Pending>>,
    policy: Box<dyn EvictionPolicy>,
    /// Blob keys the latest forward pass routed to: a speculative (predicted)
    /// load never evicts one of these.
    active: Vec<usize>,
    /// Keys of the current pass not yet read ahead: the read-ahead of a pass
    /// is bounded by the layer's slots and topped up as `get` consumes loads.
    queue: VecDeque<usize>,
    /// The experts predicted for this layer's next pass, not yet scored.
    prediction: Option<Vec<usize>>,
}

struct Inner {
    pack: Arc<Pack>,
    reader: BlobReader,
    pool: Arc<BufPool>,
    layers: Vec<Mutex<LayerSlots>>,
    stats: CacheStats,
    verify: bool,
    /// `(len, inode)` of the pack at open: a changed file is an error at the
    /// next safe point instead of garbage or SIGBUS in the mapped dense weights.
    identity: (u64, u64),
    poisoned: Mutex<Option<String>>,
    first_moe_layer: usize,
    predictor: Option<Predictor>,
    skip_missing: bool,
    /// `(layer, routed experts)` of every forward pass while recording
    /// (`mfx bench --trace-routing`): the input of offline policy studies,
    /// since routing does not depend on what the cache holds.
    routing_log: Mutex<Option<Vec<RoutedPass>>>,
    /// Set while `routing_log` records, so that passes outside a recording
    /// do not take its lock.
    recording: AtomicBool,
}

type Job = Box<dyn FnOnce() + Send>;

/// The streaming expert cache.
pub struct ExpertCache {
    inner: Arc<Inner>,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Vec<JoinHandle<()>>,
    policy: PolicyKind,
    /// Prompt-cache slot bytes the budget granted (`BudgetPlan::slot_bytes`).
    slot_granted: std::sync::atomic::AtomicU64,
    /// What the slots may hold now: the grant, scaled down by the
    /// memory-pressure governor as it scales the expert slots; the
    /// generator's prompt cache reads it at each request.
    slot_limit: Arc<std::sync::atomic::AtomicU64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn file_identity(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok((m.len(), m.ino()))
}

impl ExpertCache {
    /// A cache over `pack`'s experts for a model of `n_layers` layers.
    pub fn open(pack: Arc<Pack>, n_layers: usize, cfg: &CacheConfig) -> Result<Self, RuntimeError> {
        let path = pack.path().to_path_buf();
        let reader =
            BlobReader::open(&path, cfg.direct_io).map_err(|e| RuntimeError::io(&path, e))?;
        let identity = file_identity(&path).map_err(|e| RuntimeError::io(&path, e))?;
        let per_layer = |l: usize| {
            pack.manifest()
                .experts
                .iter()
                .filter(|e| e.layer as usize == l)
                .count()
        };
        let first_moe_layer = (0..n_layers).find(|&l| per_layer(l) > 0).unwrap_or(0);
        let mut caps: Vec<usize> = (0..n_layers)
            .map(|l| match &cfg.capacity {
                Capacity::PerLayer(n) => *n,
                Capacity::Layers(v) => v.get(l).copied().unwrap_or(0),
                Capacity::Unlimited => usize::MAX,
            })
            .collect();
        if cfg.policy == PolicyKind::Depth {
            let pins = if cfg.pin {
                pinned_from_manifest(&pack)
            } else {
                Vec::new()
            };
            let max: Vec<usize> = (0..n_layers)
                .map(|l| per_layer(l).saturating_sub(pins.iter().filter(|p| p.0 == l).count()))
                .collect();
            caps = super::policy::depth_capacities(&caps, &max);
        }
        let layers = caps
            .into_iter()
            .map(|capacity| {
                Mutex::new(LayerSlots {
                    capacity,
                    pinned: HashMap::new(),
                    resident: HashMap::new(),
                    pending: HashMap::new(),
                    policy: cfg.policy.build(),
                    active: Vec::new(),
                    queue: VecDeque::new(),
                    prediction: None,
                })
            })
            .collect();
        // A few free buffers: an eviction hands its buffer to the next load,
        // so the free list only bridges loads running ahead of evictions.
        // Free buffers sit outside the budget, so this stays small (64 kept
        // up to 108 MiB of 1.7 MiB expert buffers idle).
        let pool = BufPool::new(super::budget::pooled_buffers(cfg.io_threads));
        let predictor = (cfg.prefetch_next && cfg.io_threads > 0)
            .then(|| Predictor::from_pack(&pack, n_layers));
        let inner = Arc::new(Inner {
            predictor,
            skip_missing: cfg.skip_missing,
            pack,
            reader,
            pool,
            layers,
            stats: CacheStats::default(),
            verify: cfg.verify_checksums,
            identity,
            poisoned: Mutex::new(None),
            first_moe_layer,
            routing_log: Mutex::new(None),
            recording: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..cfg.io_threads)
            .map(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new()
                    .name(format!("mfx-io-{i}"))
                    .spawn(move || loop {
                        let job = { lock(&rx).recv() };
                        match job {
                            Ok(j) => j(),
                            Err(_) => break,
                        }
                    })
                    .map_err(|e| RuntimeError::Other(format!("cannot start I/O thread: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cache = ExpertCache {
            inner,
            tx: Mutex::new((cfg.io_threads > 0).then_some(tx)),
            threads,
            policy: cfg.policy,
            slot_granted: std::sync::atomic::AtomicU64::new(0),
            slot_limit: Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
        };
        if cfg.pin {
            cache.load_pinned()?;
            cache.load_all_if_it_fits(cfg.adaptive)?;
        }
        Ok(cache)
    }

    /// The counters, plus the gauges of what the cache holds now.
    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.inner.stats.snapshot();
        s.resident_bytes = self.resident_bytes() as u64;
        s.slots = self
            .capacities()
            .iter()
            .map(|&c| if c == usize::MAX { 0 } else { c as u64 })
            .sum();
        s
    }

    /// Records the prompt-cache slot bytes the budget granted.
    pub fn set_slot_ram(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.slot_granted.store(bytes, Relaxed);
        self.slot_limit.store(bytes, Relaxed);
    }

    /// The prompt-cache slot bytes the budget granted.
    pub fn slot_ram(&self) -> u64 {
        self.slot_granted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The slots' current limit, shared with the generator's prompt cache.
    pub fn slot_ram_limit(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.slot_limit.clone()
    }

    /// Scales the slots' limit to `level` (0..=1) of the grant: the
    /// memory-pressure governor shrinks prompt-cache slots as it shrinks the
    /// expert slots (issue 20).
    pub fn scale_slot_ram(&self, level: f64) {
        let granted = self.slot_ram() as f64;
        let v = (granted * level.clamp(0.0, 1.0)) as u64;
        self.slot_limit
            .store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets each layer's slots (memory pressure: [`crate::pressure`]). A
    /// layer over its new capacity evicts by policy at once; an expert a
    /// forward pass is using stays alive through its `Arc` until the pass
    /// ends, so shrinking never pulls weights from under a computation.
    pub fn set_capacities(&self, caps: &[usize]) {
        for (slots, &cap) in self.inner.layers.iter().zip(caps) {
            let mut g = lock(slots);
            let s = &mut *g;
            s.capacity = cap;
            while s.resident.len() > s.capacity {
                let cands: Vec<usize> = s.resident.keys().copied().collect();
                let Some(v) = s.policy.victim(&cands) else {
                    break;
                };
                s.resident.remove(&v);
                s.policy.remove(v);
                self.inner.stats.add(&self.inner.stats.evictions, 1);
            }
        }
    }

    /// Starts (or restarts) recording each forward pass's routed experts per layer.
    pub fn record_routing(&self) {
        *lock(&self.inner.routing_log) = Some(Vec::new());
        self.inner.recording.store(true, Ordering::Release);
    }

    /// The passes recorded since [`Self::record_routing`], in order;
    /// recording continues from empty.
    pub fn take_routing(&self) -> Vec<RoutedPass> {
        lock(&self.inner.routing_log)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn policy(&self) -> PolicyKind {
        self.policy
    }

    /// Per model layer: experts cached besides pinned ones (`usize::MAX`: unlimited).
    pub fn capacities(&self) -> Vec<usize> {
        self.inner.layers.iter().map(|l| lock(l).capacity).collect()
    }

    /// Whether expert reads bypass the page cache right now.
    pub fn direct_io(&self) -> bool {
        self.inner.reader.is_direct()
    }

    /// Resident experts of `layer` (pinned ones excluded).
    pub fn resident(&self, layer: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .inner
            .layers
            .get(layer)
            .map(|l| lock(l).resident.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Pinned experts of `layer`.
    pub fn pinned(&self, layer: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .inner
            .layers
            .get(layer)
            .map(|l| lock(l).pinned.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Bytes held by pinned and cached experts.
    pub fn resident_bytes(&self) -> usize {
        self.inner
            .layers
            .iter()
            .map(|l| {
                let s = lock(l);
                s.pinned
                    .values()
                    .chain(s.resident.values())
                    .map(|m| m.nbytes())
                    .sum::<usize>()
            })
            .sum()
    }

    /// The resident expert, or `None` without loading it (`--skip-missing`).
    pub fn try_get(&self, layer: usize, expert: usize) -> Option<Arc<ExpertMats>> {
        let key = self.inner.key(layer, expert);
        let slots = self.inner.layers.get(layer)?;
        let mut s = lock(slots);
        if let Some(m) = s.pinned.get(&key) {
            return Some(Arc::clone(m));
        }
        let m = s.resident.get(&key).cloned()?;
        s.policy.touch(key);
        Some(m)
    }

    fn load_pinned(&self) -> Result<(), RuntimeError> {
        let pins = pinned_from_manifest(&self.inner.pack);
        for (l, e) in pins {
            if l >= self.inner.layers.len() || self.inner.pack.expert(l as u32, e as u32).is_none()
            {
                continue;
            }
            let key = self.inner.key(l, e);
            let m = self.inner.load(l, key).map_err(|msg| self.inner.err(msg))?;
            lock(&self.inner.layers[l]).pinned.insert(key, m);
        }
        Ok(())
    }

    /// When every layer's cache can hold all of its unpinned experts (the
    /// budget covers the whole pack), loads them now, as pinned: there is
    /// nothing to evict, and loading on first use would only turn the first
    /// few hundred tokens into a stream of synchronous misses (measured: 2.5%
    /// of decode uses missing and 5-11 ms of stall per token over the first
    /// 100 tokens of a resident 8-layer Qwen3-30B-A3B-shaped pack).
    /// `evictable`: into the cache's slots instead (memory pressure may
    /// then take them back).
    fn load_all_if_it_fits(&self, evictable: bool) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        let mut todo = Vec::new();
        for (l, slots) in inner.layers.iter().enumerate() {
            let s = lock(slots);
            let mut missing: Vec<usize> = inner
                .pack
                .manifest()
                .experts
                .iter()
                .filter(|e| e.layer as usize == l)
                .map(|e| inner.key(l, e.expert as usize))
                .filter(|k| !s.pinned.contains_key(k))
                .collect();
            // Merged experts share their target's blob.
            missing.sort_unstable();
            missing.dedup();
            if missing.len() > s.capacity {
                return Ok(());
            }
            todo.extend(missing.into_iter().map(|k| (l, k)));
        }
        for (l, key) in todo {
            let m = inner.load(l, key).map_err(|msg| inner.err(msg))?;
            let mut s = lock(&inner.layers[l]);
            if evictable {
                inner.insert(&mut s, key, &m, true);
            } else {
                s.pinned.insert(key, m);
            }
        }
        Ok(())
    }

    /// Starts reads for the head of the layer's queue while there is room
    /// (see [`Inner::start_loads`]). `get` takes what it serves off the
    /// queue itself, under the same lock that retires its pending load.
    fn read_ahead(&self, layer: usize) {
        let Some(slots) = self.inner.layers.get(layer) else {
            return;
        };
        if lock(&self.tx).is_none() {
            return;
        }
        let keys: Vec<usize> = {
            let mut g = lock(slots);
            let s = &mut *g;
            // Drop what needs no read: pinned, resident or loading.
            let (pinned, pending, resident) = (&s.pinned, &s.pending, &s.resident);
            s.queue.retain(|k| {
                !pinned.contains_key(k) && !pending.contains_key(k) && !resident.contains_key(k)
            });
            s.queue.iter().copied().collect()
        };
        let jobs = self
            .inner
            .start_loads(layer, &keys, false, |inner, layer, key, p| {
                Box::new(move || {
                    let _ = inner.complete(layer, key, &p, false);
                })
            });
        for job in jobs {
            let _ = self.send(job);
        }
    }

    fn send(&self, job: Job) -> bool {
        match lock(&self.tx).as_ref() {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        }
    }
}

impl Drop for ExpertCache {
    fn drop(&mut self) {
        lock(&self.tx).take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `(layer, expert)` pairs the pack's pin profile marks: prep's
/// [`mfx_formats::profile::Profile`], or the bare `{"pinned": [[l, e], ..]}`
/// of hand-made packs.
pub fn pinned_from_manifest(pack: &Pack) -> Vec<(usize, usize)> {
    let Some(v) = pack.manifest().pin_profile.as_ref() else {
        return Vec::new();
    };
    if let Ok(p) = serde_json::from_value::<mfx_formats::profile::Profile>(v.clone()) {
        return p
            .layers
            .iter()
            .flat_map(|l| {
                l.pinned
                    .iter()
                    .map(move |&e| (l.layer as usize, e as usize))
            })
            .collect();
    }
    v.get("pinned")
        .and_then(|p| p.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|pair| {
                    let p = pair.as_array()?;
                    Some((p.first()?.as_u64()? as usize, p.get(1)?.as_u64()? as usize))
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Inner {
    fn err(&self, msg: String) -> RuntimeError {
        RuntimeError::Pack {
            path: self.pack.path().to_path_buf(),
            msg,
        }
    }

    /// The expert whose blob `expert` uses (merged experts share one).
    fn key(&self, layer: usize, expert: usize) -> usize {
        self.pack
            .expert(layer as u32, expert as u32)
            .and_then(|e| e.merged_into)
            .map_or(expert, |m| m as usize)
    }

    /// Reads, checks and decodes one expert blob.
    fn load(&self, layer: usize, expert: usize) -> LoadResult {
        let entry = self
            .pack
            .expert(layer as u32, expert as u32)
            .ok_or_else(|| format!("expert L{layer} E{expert} is not in the pack"))?;
        let label = entry.label();
        let len = usize::try_from(entry.length).map_err(|_| format!("{label}: blob too large"))?;
        let stored = self
            .reader
            .read(&self.pool, entry.offset, len)
            .map_err(|e| format!("{label}: {e}"))?;
        self.stats.add(&self.stats.loads, 1);
        self.stats.add(&self.stats.bytes_read, entry.length);
        if self.verify {
            let got = xxhash_rust::xxh3::xxh3_64(stored.as_slice());
            if got != entry.checksum.0 {
                return Err(format!(
                    "{label}: checksum mismatch (manifest {:016x}, read {got:016x}): the pack is corrupt or changed on disk (`mfx verify` checks it whole)",
                    entry.checksum.0
                ));
            }
        }
        let raw = if entry.codec == Codec::None {
            stored
        } else {
            let raw_len = usize::try_from(entry.raw_length)
                .map_err(|_| format!("{label}: decoded blob too large"))?;
            let mut out = self.pool.take(raw_len);
            entry
                .decode_into(stored.as_slice(), out.as_mut_slice())
                .map_err(|e| format!("{label}: {e}"))?;
            out
        };
        let owner: Arc<dyn BlobOwner> = Arc::new(raw);
        let len = owner.bytes().len();
        let blob = Blob::owned(owner, 0, len).ok_or_else(|| format!("{label}: empty blob"))?;
        decode_blob(entry, &blob, None).map(Arc::new)
    }

    /// Makes `m` resident, evicting by policy. A `speculative` (predicted,
    /// not yet routed) load neither counts as a use nor evicts an expert the
    /// layer's latest pass used; with no other victim it is not kept.
    fn insert(&self, s: &mut LayerSlots, key: usize, m: &Arc<ExpertMats>, speculative: bool) {
        if !speculative {
            s.policy.touch(key);
        }
        if s.capacity == 0 || s.resident.contains_key(&key) {
            return;
        }
        while s.resident.len() >= s.capacity {
            let cands: Vec<usize> = s
                .resident
                .keys()
                .copied()
                .filter(|k| !speculative || !s.active.contains(k))
                .collect();
            if cands.is_empty() {
                return;
            }
            let Some(v) = s.policy.victim(&cands) else {
                break;
            };
            s.resident.remove(&v);
            s.policy.remove(v);
            self.stats.add(&self.stats.evictions, 1);
        }
        if speculative {
            s.policy.admit(key);
        }
        s.resident.insert(key, Arc::clone(m));
    }

    /// Runs (or waits for) the load behind `p`, then publishes it. The
    /// pending entry stays (holding the result) until a `get` consumes it:
    /// a prefetched expert evicted before its `get`, or one a zero-capacity
    /// layer never keeps, is then still read only once.
    fn complete(&self, layer: usize, key: usize, p: &Pending, speculative: bool) -> LoadResult {
        if p.claim() {
            let r = self.load(layer, key);
            let mut s = lock(&self.layers[layer]);
            if let Ok(m) = &r {
                self.insert(&mut s, key, m, speculative);
            }
            drop(s);
            p.fulfil(r.clone());
            r
        } else {
            p.wait()
        }
    }

    /// Safe point between forward passes: the pack must still be the file we opened.
    fn check_identity(&self) {
        let now = file_identity(self.pack.path());
        let bad = match now {
            Ok(id) if id == self.identity => None,
            Ok((len, ino)) => Some(format!(
                "the pack changed while running (size {} -> {len}, inode {} -> {ino}); restart to use the new file",
                self.identity.0, self.identity.1
            )),
            Err(e) => Some(format!("the pack is no longer readable: {e}")),
        };
        if let Some(msg) = bad {
            let mut p = lock(&self.poisoned);
            if p.is_none() {
                *p = Some(msg);
            }
        }
    }
}

impl ExpertProvider for ExpertCache {
    fn get(&self, layer: usize, expert: usize) -> Result<Arc<ExpertMats>, RuntimeError> {
        if let Some(msg) = lock(&self.inner.poisoned).clone() {
            return Err(self.inner.err(msg));
        }
        let inner = &self.inner;
        let key = inner.key(layer, expert);
        let slots = inner
            .layers
            .get(layer)
            .ok_or_else(|| inner.err(format!("expert L{layer} E{expert}: no such layer")))?;
        let mut s = lock(slots);
        if let Some(m) = s.pinned.get(&key) {
            inner.stats.add(&inner.stats.hits, 1);
            return Ok(Arc::clone(m));
        }
        if let Some(m) = s.resident.get(&key).cloned() {
            s.policy.touch(key);
            inner.stats.add(&inner.stats.hits, 1);
            let consumed = s.pending.get(&key).is_some_and(|p| p.is_done());
            if consumed {
                s.pending.remove(&key);
                s.queue.retain(|k| *k != key);
            }
            drop(s);
            if consumed {
                self.read_ahead(layer);
            }
            return Ok(m);
        }
        inner.stats.add(&inner.stats.misses, 1);
        let p = match s.pending.get(&key) {
            Some(p) => {
                inner.stats.add(&inner.stats.prefetched, 1);
                Arc::clone(p)
            }
            None => {
                let p = Pending::new();
                s.pending.insert(key, Arc::clone(&p));
                p
            }
        };
        drop(s);
        let t0 = Instant::now();
        let r = inner.complete(layer, key, &p, false);
        inner
            .stats
            .add(&inner.stats.stall_ns, t0.elapsed().as_nanos() as u64);
        {
            let mut s = lock(slots);
            if s.pending.get(&key).is_some_and(|q| Arc::ptr_eq(q, &p)) {
                s.pending.remove(&key);
            }
            // Served: off the read-ahead queue in the same critical section,
            // or another thread's `read_ahead` could see it neither pending
            // nor resident (capacity 0 keeps nothing) and read it again.
            s.queue.retain(|k| *k != key);
        }
        self.read_ahead(layer);
        r.map_err(|msg| inner.err(msg))
    }

    fn prefetch(&self, layer: usize, experts: &[usize], tokens: &[u32]) {
        if layer == self.inner.first_moe_layer {
            self.inner.check_identity();
        }
        if self.inner.recording.load(Ordering::Acquire) {
            if let Some(log) = lock(&self.inner.routing_log).as_mut() {
                log.push((layer, experts.to_vec(), tokens.to_vec()));
            }
        }
        let Some(slots) = self.inner.layers.get(layer) else {
            return;
        };
        let keys: Vec<usize> = experts.iter().map(|&e| self.inner.key(layer, e)).collect();
        {
            let mut s = lock(slots);
            if let Some(pred) = s.prediction.take() {
                let st = &self.inner.stats;
                let used = pred.iter().filter(|e| experts.contains(e)).count();
                st.add(&st.predicted, pred.len() as u64);
                st.add(&st.predicted_used, used as u64);
                st.add(&st.routed_predicted, experts.len() as u64);
            }
            // Finished loads from earlier passes (or from predictions) that
            // this pass does not use: the cache holds them if it kept them.
            s.pending.retain(|k, p| !p.is_done() || keys.contains(k));
            s.active = keys.clone();
            s.queue = keys.iter().copied().collect();
        }
        self.read_ahead(layer);
    }

    fn is_resident(&self, layer: usize, expert: usize) -> bool {
        let key = self.inner.key(layer, expert);
        self.inner.layers.get(layer).is_some_and(|l| {
            let s = lock(l);
            s.pinned.contains_key(&key)
                || s.resident.contains_key(&key)
                || s.pending.get(&key).is_some_and(|p| p.is_done())
        })
    }

    fn skip_missing(&self) -> bool {
        self.inner.skip_missing
    }

    fn record_skipped(&self, _layer: usize, n: usize) {
        self.inner.stats.add(&self.inner.stats.skipped, n as u64);
    }

    fn wants_next_hint(&self, layer: usize) -> bool {
        self.inner.predictor.is_some()
            && self
                .inner
                .layers
                .get(layer)
                .is_some_and(|l| lock(l).capacity != usize::MAX)
    }

    fn hint_next(&self, layer: usize, hint: &NextHint<'_>) {
        let Some(pred) = &self.inner.predictor else {
            return;
        };
        let Some(slots) = self.inner.layers.get(layer) else {
            return;
        };
        let set = pred.predict(layer, hint);
        let keys: Vec<usize> = set.iter().map(|&e| self.inner.key(layer, e)).collect();
        lock(slots).prediction = Some(set);
        let jobs = self
            .inner
            .start_loads(layer, &keys, true, |inner, layer, key, p| {
                Box::new(move || {
                    let _ = inner.complete(layer, key, &p, true);
                })
            });
        let st = &self.inner.stats;
        st.add(&st.hint_loads, jobs.len() as u64);
        for job in jobs {
            let _ = self.send(job);
        }
    }
}

impl Inner {
    /// Registers a pending load for each of `keys` not yet resident or
    /// loading and returns the jobs that run them. A `speculative` batch
    /// stops at the layer's free-or-evictable slots, so a prediction never
    /// queues more reads than it could keep.
    fn start_loads(
        self: &Arc<Self>,
        layer: usize,
        keys: &[usize],
        speculative: bool,
        job: impl Fn(Arc<Inner>, usize, usize, Arc<Pending>) -> Job,
    ) -> Vec<Job> {
        let Some(slots) = self.layers.get(layer) else {
            return Vec::new();
        };
        let mut s = lock(slots);
        let mut room = if speculative {
            let busy = s.resident.keys().filter(|k| s.active.contains(k)).count();
            s.capacity.saturating_sub(busy)
        } else {
            // Bounded too: a finished load stays in `pending` until its
            // `get`. With more of those than the layer has slots, inserting
            // later ones evicts earlier ones, which `pending` then holds
            // outside the budget (a 128-token prompt routing to all 512
            // experts of a layer held 1.5 GiB under an 845 MiB budget).
            // `read_ahead` tops the window up as loads are consumed.
            let in_flight = s.pending.len();
            s.capacity.max(1).saturating_sub(in_flight)
        };
        let mut jobs = Vec::new();
        for &key in keys {
            if s.pinned.contains_key(&key)
                || s.resident.contains_key(&key)
                || s.pending.contains_key(&key)
            {
                continue;
            }
            if room == 0 {
                break;
            }
            room -= 1;
            let p = Pending::new();
            s.pending.insert(key, Arc::clone(&p));
            jobs.push(job(Arc::clone(self), layer, key, p));
        }
        jobs
    }
}
