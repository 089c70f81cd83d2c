//! Prompt-cache slots: the sequence state of several sessions kept at once
//! (issue 19), so that an agent's main conversation survives the side
//! requests (titles, summaries, sub-agents) it sends in between.
//!
//! The [`crate::generate::Generator`] holds one live state in its model;
//! when a prompt matches a slot better than the live state, the live state
//! is moved into a slot (no copy) and the slot's moved in. Slots are kept
//! within a byte budget, least recently used first out; an evicted slot is
//! written to the slot directory ([`spill`]) when there is one and read back
//! on a later prefix hit, also by a later process (the file carries the
//! model identity and a checksum; a file that fails either is refused with
//! its reason and the prompt is prefilled again).
//!
//! What a slot may give back follows the generator's grid rule: a slot holds
//! only positions computed as whole prefill chunks on the grid, and a prompt
//! reuses a grid-aligned prefix of it, so a prompt's logits stay
//! bit-identical whatever ran before. Recurrent state (qwen3_next,
//! qwen3_5_moe's DeltaNet layers) cannot be truncated: such a slot reaches
//! its earlier positions through [`Checkpoint`]s taken during prefill.

pub mod spill;

use crate::models::{Checkpoint, Model, SeqStates};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How many slots and bytes the prompt cache may hold.
#[derive(Debug, Clone)]
pub struct SlotOptions {
    /// Sessions kept besides the live one (0: no slots, as before issue 19).
    pub slots: usize,
    /// Bytes the slots (their KV and recurrent state, checkpoints and token
    /// ids) may hold in RAM; `--ram`'s budget reserves this.
    pub ram_bytes: u64,
    /// Where evicted slots are spilled (none: they are dropped).
    pub dir: Option<PathBuf>,
    /// Bytes the slot directory may hold; the least recently used files
    /// beyond it are deleted.
    pub disk_bytes: u64,
    /// For recurrent state: a checkpoint every this many grid chunks during
    /// prefill (the last whole chunk of every prompt always gets one).
    pub checkpoint_every: usize,
    /// Checkpoints kept per session, the latest (divergence is usually late:
    /// a re-rendered last message, stripped thinking).
    pub max_checkpoints: usize,
}

impl Default for SlotOptions {
    fn default() -> Self {
        Self {
            slots: 0,
            ram_bytes: 0,
            dir: None,
            disk_bytes: DEFAULT_DISK_BYTES,
            checkpoint_every: 4,
            max_checkpoints: 8,
        }
    }
}

/// Default cap on the slot directory's size.
pub const DEFAULT_DISK_BYTES: u64 = 16 << 30;

/// One session's state out of the model.
pub struct Slot {
    /// The ids whose state `state` holds (all of them reusable).
    pub tokens: Vec<u32>,
    /// How many of `tokens` are on the prefill grid.
    pub on_grid: usize,
    pub state: Box<dyn SeqStates>,
    /// Earlier positions of recurrent state, oldest first.
    pub checkpoints: Vec<Checkpoint>,
    last_use: u64,
}

impl Slot {
    pub fn new(
        tokens: Vec<u32>,
        on_grid: usize,
        state: Box<dyn SeqStates>,
        checkpoints: Vec<Checkpoint>,
    ) -> Self {
        Self {
            tokens,
            on_grid,
            state,
            checkpoints,
            last_use: 0,
        }
    }

    /// What this slot costs in RAM.
    pub fn bytes(&self) -> u64 {
        (self.state.bytes()
            + self
                .checkpoints
                .iter()
                .map(Checkpoint::bytes)
                .sum::<usize>()
            + self.tokens.len() * 4) as u64
    }
}

/// A spilled slot the directory holds.
#[derive(Debug, Clone)]
struct DiskSlot {
    path: PathBuf,
    tokens: Vec<u32>,
    on_grid: usize,
    /// Positions reachable without a forward pass: every grid-aligned one
    /// for truncatable state, else the end and the checkpoints.
    reachable: Reach,
    bytes: u64,
    last_use: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Reach {
    /// Any prefix (KV caches truncate).
    Any,
    /// Only these lengths (recurrent state: its end and its checkpoints).
    Only(Vec<usize>),
}

impl Reach {
    fn of(state: &dyn SeqStates, checkpoints: &[Checkpoint]) -> Self {
        if state.needs_checkpoints() {
            let mut v: Vec<usize> = checkpoints.iter().map(|c| c.len).collect();
            v.push(state.len());
            Reach::Only(v)
        } else {
            Reach::Any
        }
    }

    /// The longest reachable length at most `limit`.
    fn best(&self, limit: usize) -> usize {
        match self {
            Reach::Any => limit,
            Reach::Only(v) => v.iter().copied().filter(|&l| l <= limit).max().unwrap_or(0),
        }
    }
}

/// Where a prompt's best reuse lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Memory(usize),
    Disk(usize),
}

/// The counters `/metrics` and `--stats` show.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SlotStats {
    /// Prompts that reused a slot held in RAM.
    pub hits: u64,
    /// Prompts that reused a slot read back from disk.
    pub restores: u64,
    /// Prompts that reused nothing.
    pub misses: u64,
    /// Slots written to disk.
    pub spills: u64,
    /// Slots dropped (no directory, or it could not be written).
    pub drops: u64,
    /// Spill files refused (checksum, identity, shape) or unreadable.
    pub restore_errors: u64,
    /// The last refusal's message.
    pub last_error: Option<String>,
    /// Slots in RAM and their tokens and bytes.
    pub slots: u64,
    pub cached_tokens: u64,
    pub bytes: u64,
    /// Slot files in the directory and their bytes.
    pub disk_slots: u64,
    pub disk_bytes: u64,
    /// Prompt tokens served from any cached state (live, slot or disk).
    pub reused_tokens: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error(transparent)]
    Spill(#[from] spill::SpillError),
    #[error("prompt-cache file {path}: {source}; it is ignored and the prompt is prefilled again")]
    State {
        path: PathBuf,
        #[source]
        source: crate::models::StateError,
    },
}

/// The slots of one generator.
pub struct PromptCache {
    opts: SlotOptions,
    identity: u64,
    grid: usize,
    slots: Vec<Slot>,
    disk: Vec<DiskSlot>,
    clock: u64,
    stats: SlotStats,
    /// A lower RAM limit while the memory-pressure governor asks for one
    /// (`u64::MAX`: none); see [`PromptCache::pressure_limit`].
    pressure: Arc<AtomicU64>,
}

impl PromptCache {
    /// Slots for a model of `identity` prefilling on a grid of `grid`
    /// tokens; indexes the slot directory's files of this identity.
    pub fn new(opts: SlotOptions, identity: u64, grid: usize) -> Self {
        let mut c = Self {
            opts,
            identity,
            grid,
            slots: Vec::new(),
            disk: Vec::new(),
            clock: 0,
            stats: SlotStats::default(),
            pressure: Arc::new(AtomicU64::new(u64::MAX)),
        };
        c.index_dir();
        c
    }

    pub fn options(&self) -> &SlotOptions {
        &self.opts
    }

    /// Whether any session besides the live one is kept.
    pub fn enabled(&self) -> bool {
        self.opts.slots > 0 && (self.opts.ram_bytes > 0 || self.opts.dir.is_some())
    }

    /// A handle through which the memory-pressure governor lowers the
    /// slots' RAM (`u64::MAX` lifts it); applied at the next request.
    pub fn pressure_limit(&self) -> Arc<AtomicU64> {
        self.pressure.clone()
    }

    /// Takes its RAM limit from `limit` too (the expert cache's grant,
    /// which the memory-pressure governor scales).
    pub fn share_limit(&mut self, limit: Arc<AtomicU64>) {
        self.pressure = limit;
    }

    /// The grid changed: memory slots of the old grid are useless, and
    /// files of the old grid are no longer indexed.
    pub fn set_grid(&mut self, grid: usize) {
        if grid != self.grid {
            self.grid = grid;
            self.slots.clear();
            self.index_dir();
        }
    }

    fn index_dir(&mut self) {
        self.disk.clear();
        let Some(dir) = self.opts.dir.clone() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let prefix = spill::name_prefix(self.identity, self.grid);
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) || !name.ends_with(spill::EXT) {
                continue;
            }
            // Named as ours but not ours inside: refused, with the reason.
            let h = match spill::read_header(&path)
                .and_then(|h| spill::check_header(&path, &h, self.identity, self.grid).map(|()| h))
            {
                Ok(h) => h,
                Err(e) => {
                    self.refused(&e);
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            let bytes = e.metadata().map_or(0, |m| m.len());
            // Reach is known only once read; an unknown file is assumed
            // truncatable and checked on restore.
            self.disk.push(DiskSlot {
                path,
                tokens: h.tokens,
                on_grid: h.on_grid,
                reachable: Reach::Any,
                bytes,
                last_use: 0,
            });
        }
        self.update_stats();
    }

    /// How much of `prompt` (at most `limit` tokens) `tokens` with `reach`
    /// can give back: their common prefix, on the grid if `exact`, at a
    /// reachable length.
    fn usable(
        &self,
        tokens: &[u32],
        on_grid: usize,
        reach: &Reach,
        prompt: &[u32],
        limit: usize,
        exact: bool,
    ) -> usize {
        let common = tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let mut keep = common.min(limit);
        if exact {
            keep = keep.min(on_grid);
            keep -= keep % self.grid;
        }
        reach.best(keep)
    }

    /// The slot (in RAM or on disk) giving back the most of `prompt`, with
    /// that many tokens; `limit` caps it (the prompt's length minus one).
    pub fn best(&self, prompt: &[u32], limit: usize, exact: bool) -> Option<(Source, usize)> {
        let mem = self.slots.iter().enumerate().map(|(i, s)| {
            let reach = Reach::of(s.state.as_ref(), &s.checkpoints);
            (
                Source::Memory(i),
                self.usable(&s.tokens, s.on_grid, &reach, prompt, limit, exact),
            )
        });
        let disk = self.disk.iter().enumerate().map(|(i, d)| {
            (
                Source::Disk(i),
                self.usable(&d.tokens, d.on_grid, &d.reachable, prompt, limit, exact),
            )
        });
        // Ties go to RAM (listed first).
        mem.chain(disk)
            .filter(|&(_, n)| n > 0)
            .fold(None, |best: Option<(Source, usize)>, c| match best {
                Some(b) if b.1 >= c.1 => Some(b),
                _ => Some(c),
            })
    }

    /// Takes a slot out (to become the live state): a RAM slot is moved, a
    /// disk slot read, checked and rebuilt by `model`. A refused file is
    /// deleted and counted; the caller prefills instead.
    pub fn take(&mut self, src: Source, model: &dyn Model) -> Result<Slot, SlotError> {
        match src {
            Source::Memory(i) => {
                self.stats.hits += 1;
                let s = self.slots.swap_remove(i);
                self.update_stats();
                Ok(s)
            }
            Source::Disk(i) => {
                let d = self.disk.swap_remove(i);
                let r = self.read_disk(&d, model);
                match &r {
                    Ok(_) => {
                        self.stats.restores += 1;
                        // The file stays: the slot may be evicted again
                        // later (rewritten then), or reused after a restart.
                        self.clock += 1;
                        self.disk.push(DiskSlot {
                            last_use: self.clock,
                            ..d
                        });
                    }
                    Err(e) => {
                        let e = e.to_string();
                        self.refused(&e);
                        let _ = std::fs::remove_file(&d.path);
                    }
                }
                self.update_stats();
                r
            }
        }
    }

    /// Counts and logs a refused slot file.
    fn refused(&mut self, e: &dyn std::fmt::Display) {
        self.stats.restore_errors += 1;
        self.stats.last_error = Some(e.to_string());
        tracing::warn!("{e}");
    }

    fn read_disk(&self, d: &DiskSlot, model: &dyn Model) -> Result<Slot, SlotError> {
        let f = spill::read(&d.path, self.identity, self.grid)?;
        let state = model
            .load_state(&f.state)
            .map_err(|source| SlotError::State {
                path: d.path.clone(),
                source,
            })?;
        let bad = |msg: String| {
            SlotError::Spill(spill::SpillError::Invalid {
                path: d.path.clone(),
                msg,
            })
        };
        if state.len() != f.header.tokens.len() {
            return Err(bad(format!(
                "its state holds {} positions for {} token ids",
                state.len(),
                f.header.tokens.len()
            )));
        }
        // A checkpoint must fit this model's layers; tried on a copy of
        // nothing, rollback would find out too late.
        for c in &f.checkpoints {
            if c.layers.len() != model.info().n_layers {
                return Err(bad(format!(
                    "a checkpoint of {} layers for a model of {}",
                    c.layers.len(),
                    model.info().n_layers
                )));
            }
        }
        Ok(Slot::new(
            f.header.tokens,
            f.header.on_grid,
            state,
            f.checkpoints,
        ))
    }

    /// Counts a prompt that reused nothing / `n` tokens.
    pub fn note_reuse(&mut self, n: usize) {
        if n == 0 {
            self.stats.misses += 1;
        }
        self.stats.reused_tokens += n as u64;
    }

    /// Keeps a session. A RAM slot it makes redundant (a prefix it can give
    /// back itself) is dropped; then the least recently used slots beyond
    /// the count or the bytes are spilled (or dropped).
    pub fn insert(&mut self, mut slot: Slot) {
        if !self.enabled() || slot.tokens.is_empty() {
            return;
        }
        self.clock += 1;
        slot.last_use = self.clock;
        let reach = Reach::of(slot.state.as_ref(), &slot.checkpoints);
        self.slots.retain(|s| {
            let covered =
                slot.tokens.starts_with(&s.tokens) && reach.best(s.tokens.len()) == s.tokens.len();
            !covered
        });
        self.slots.push(slot);
        self.enforce();
    }

    /// The RAM the slots may use now.
    fn ram_limit(&self) -> u64 {
        self.opts
            .ram_bytes
            .min(self.pressure.load(Ordering::Relaxed))
    }

    /// Evicts least recently used slots until within count and bytes.
    pub fn enforce(&mut self) {
        let limit = self.ram_limit();
        loop {
            let total: u64 = self.slots.iter().map(Slot::bytes).sum();
            if self.slots.len() <= self.opts.slots && total <= limit {
                break;
            }
            let Some(i) = (0..self.slots.len()).min_by_key(|&i| self.slots[i].last_use) else {
                break;
            };
            let s = self.slots.swap_remove(i);
            self.evict(s);
        }
        self.update_stats();
    }

    fn evict(&mut self, s: Slot) {
        let Some(dir) = self.opts.dir.clone() else {
            self.stats.drops += 1;
            return;
        };
        let header = spill::Header {
            identity: self.identity,
            grid: self.grid,
            tokens: s.tokens.clone(),
            on_grid: s.on_grid,
        };
        let mut state = Vec::with_capacity(s.state.bytes() + 1024);
        s.state.save(&mut state);
        let bytes = spill::encode(&header, &s.checkpoints, &state);
        let path = dir.join(spill::file_name(self.identity, self.grid, &s.tokens));
        match spill::write_atomic(&path, &bytes) {
            Ok(()) => {
                self.stats.spills += 1;
                self.disk.retain(|d| d.path != path);
                self.clock += 1;
                self.disk.push(DiskSlot {
                    path,
                    reachable: Reach::of(s.state.as_ref(), &s.checkpoints),
                    tokens: s.tokens,
                    on_grid: s.on_grid,
                    bytes: bytes.len() as u64,
                    last_use: self.clock,
                });
                self.trim_disk();
            }
            Err(e) => {
                self.stats.drops += 1;
                tracing::warn!("prompt cache: could not spill a slot: {e}");
            }
        }
    }

    fn trim_disk(&mut self) {
        while self.disk.iter().map(|d| d.bytes).sum::<u64>() > self.opts.disk_bytes {
            let Some(i) = (0..self.disk.len()).min_by_key(|&i| self.disk[i].last_use) else {
                break;
            };
            let d = self.disk.swap_remove(i);
            let _ = std::fs::remove_file(&d.path);
        }
    }

    /// Spills every RAM slot (a server shutting down keeps its sessions).
    pub fn spill_all(&mut self) {
        for s in std::mem::take(&mut self.slots) {
            self.evict(s);
        }
        self.update_stats();
    }

    fn update_stats(&mut self) {
        self.stats.slots = self.slots.len() as u64;
        self.stats.cached_tokens = self.slots.iter().map(|s| s.tokens.len() as u64).sum();
        self.stats.bytes = self.slots.iter().map(Slot::bytes).sum();
        self.stats.disk_slots = self.disk.len() as u64;
        self.stats.disk_bytes = self.disk.iter().map(|d| d.bytes).sum();
    }

    pub fn stats(&self) -> SlotStats {
        self.stats.clone()
    }
}

#[cfg(test)]
mod tests;
