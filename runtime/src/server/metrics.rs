//! Counters for `/metrics`, rendered in the Prometheus text format.
//!
//! A handful of atomics and one small map; the format is simple enough that a
//! client library would add more than it saves.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::backend::{Completion, Finish, StatsSnapshot};

#[derive(Default)]
pub struct Metrics {
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    /// Microseconds spent generating, first token excluded (decode time).
    decode_micros: AtomicU64,
    /// Microseconds from request start to first token, summed.
    ttft_micros: AtomicU64,
    completions: AtomicU64,
    cancelled: AtomicU64,
    busy: AtomicBool,
    /// tok/s of the most recent completion's decode phase, as f64 bits.
    last_tok_per_s: AtomicU64,
    /// (endpoint, status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Relaxed);
    }

    pub fn add_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_completion(&self, c: &Completion) {
        if c.finish == Finish::Cancelled {
            self.add_cancelled();
        }
        self.completions.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(c.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_prompt_tokens
            .fetch_add(c.cached_prompt_tokens as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(c.completion_tokens as u64, Ordering::Relaxed);
        self.ttft_micros
            .fetch_add(c.time_to_first_token.as_micros() as u64, Ordering::Relaxed);
        let decode = c.total_time.saturating_sub(c.time_to_first_token);
        self.decode_micros
            .fetch_add(decode.as_micros() as u64, Ordering::Relaxed);
        if c.completion_tokens > 1 && !decode.is_zero() {
            let rate = (c.completion_tokens - 1) as f64 / decode.as_secs_f64();
            self.last_tok_per_s.store(rate.to_bits(), Ordering::Relaxed);
        }
    }

    pub fn record_request(&self, endpoint: &str, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry((endpoint.to_owned(), status)).or_default() += 1;
        }
    }

    /// The Prometheus exposition text. The expert-cache families carry
    /// samples only when the backend has a cache (`cache` is `Some`);
    /// `mfx_expert_cache_enabled` says which.
    pub fn render(&self, cache: Option<StatsSnapshot>, queue_depth: usize) -> String {
        let mut s = String::new();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = write!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            );
        };
        counter(
            "mfx_prompt_tokens_total",
            "Prompt tokens processed or reused.",
            load(&self.prompt_tokens),
        );
        counter(
            "mfx_prompt_tokens_reused_total",
            "Prompt tokens whose KV state was reused from the previous request.",
            load(&self.cached_prompt_tokens),
        );
        counter(
            "mfx_generated_tokens_total",
            "Tokens generated.",
            load(&self.generated_tokens),
        );
        counter(
            "mfx_completions_total",
            "Generations run to an end.",
            load(&self.completions),
        );
        counter(
            "mfx_cancelled_total",
            "Generations cancelled by a client disconnect.",
            load(&self.cancelled),
        );
        let decode_s = load(&self.decode_micros) as f64 / 1e6;
        let gen = load(&self.generated_tokens);
        let completions = load(&self.completions);
        let decode_tokens = gen.saturating_sub(completions);
        let mut gauge = |name: &str, help: &str, v: f64| {
            let _ = write!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n");
        };
        gauge(
            "mfx_decode_tokens_per_second",
            "Decode rate averaged over all completions since start.",
            if decode_s > 0.0 {
                decode_tokens as f64 / decode_s
            } else {
                0.0
            },
        );
        gauge(
            "mfx_last_decode_tokens_per_second",
            "Decode rate of the most recent completion.",
            f64::from_bits(load(&self.last_tok_per_s)),
        );
        gauge(
            "mfx_time_to_first_token_seconds_avg",
            "Mean time from generation start to first token.",
            if completions > 0 {
                load(&self.ttft_micros) as f64 / 1e6 / completions as f64
            } else {
                0.0
            },
        );
        gauge(
            "mfx_queue_depth",
            "Requests waiting for the generator.",
            queue_depth as f64,
        );
        gauge(
            "mfx_generating",
            "1 while a generation runs.",
            u8::from(self.busy.load(Ordering::Relaxed)) as f64,
        );
        gauge(
            "mfx_expert_cache_enabled",
            "1 when experts stream through a budgeted cache (the mfx_expert_cache_* series), 0 when all are resident.",
            u8::from(cache.is_some()) as f64,
        );
        render_cache(&mut s, cache.as_ref());
        let _ = write!(s, "# HELP mfx_requests_total HTTP requests by endpoint and status.\n# TYPE mfx_requests_total counter\n");
        if let Ok(map) = self.requests.lock() {
            for ((endpoint, status), n) in map.iter() {
                let _ = writeln!(
                    s,
                    "mfx_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
        }
        s
    }
}

/// A Prometheus family: name, type, help text and how to read its sample.
type MetricFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&StatsSnapshot) -> f64,
);

/// The expert cache's counters, as `mfx run --stats` reports them. The
/// families are always announced, so scrapers and dashboards see the same
/// names whatever is served; without a cache they hold no sample.
fn render_cache(s: &mut String, c: Option<&StatsSnapshot>) {
    let families: [MetricFamily; 9] = [
        (
            "mfx_expert_cache_hits_total",
            "counter",
            "Expert lookups served from memory (pinned or cached).",
            |c| c.hits as f64,
        ),
        (
            "mfx_expert_cache_misses_total",
            "counter",
            "Expert lookups that had to read the pack.",
            |c| c.misses as f64,
        ),
        (
            "mfx_expert_cache_hit_rate",
            "gauge",
            "hits / (hits + misses) since start (1 before the first lookup).",
            |c| c.hit_rate,
        ),
        (
            "mfx_expert_cache_read_bytes_total",
            "counter",
            "Bytes read from the pack for expert loads.",
            |c| c.bytes_read as f64,
        ),
        (
            "mfx_expert_cache_io_stall_seconds_total",
            "counter",
            "Time generation waited for expert loads.",
            |c| c.stall_ms / 1e3,
        ),
        (
            "mfx_expert_cache_loads_total",
            "counter",
            "Expert blobs loaded (demand and prefetch).",
            |c| c.loads as f64,
        ),
        (
            "mfx_expert_cache_evictions_total",
            "counter",
            "Experts evicted to make room (or given back under memory pressure).",
            |c| c.evictions as f64,
        ),
        (
            "mfx_expert_cache_resident_bytes",
            "gauge",
            "Bytes of pinned and cached experts held now.",
            |c| c.resident_bytes as f64,
        ),
        (
            "mfx_expert_cache_slots",
            "gauge",
            "Expert slots of the cache now (memory pressure shrinks them under --ram auto).",
            |c| c.slots as f64,
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = write!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        if let Some(c) = c {
            let _ = writeln!(s, "{name} {}", value(c));
        }
    }
}

/// The prompt cache's counters (issue 19): slot hits, restores from disk,
/// misses, spills, what the slots hold. Announced always, like the expert
/// cache's; samples only when the backend keeps slots.
pub fn render_slots(s: &mut String, c: Option<&crate::prompt_cache::SlotStats>) {
    type SlotFamily = (
        &'static str,
        &'static str,
        &'static str,
        fn(&crate::prompt_cache::SlotStats) -> u64,
    );
    let families: [SlotFamily; 10] = [
        (
            "mfx_prompt_slot_hits_total",
            "counter",
            "Prompts that reused a prompt-cache slot held in RAM.",
            |c| c.hits,
        ),
        (
            "mfx_prompt_slot_restores_total",
            "counter",
            "Prompts that reused a slot read back from the slot directory.",
            |c| c.restores,
        ),
        (
            "mfx_prompt_slot_misses_total",
            "counter",
            "Prompts that reused no cached state at all.",
            |c| c.misses,
        ),
        (
            "mfx_prompt_slot_spills_total",
            "counter",
            "Slots written to the slot directory on eviction.",
            |c| c.spills,
        ),
        (
            "mfx_prompt_slot_drops_total",
            "counter",
            "Slots evicted without a directory to spill to (or failing to write).",
            |c| c.drops,
        ),
        (
            "mfx_prompt_slot_restore_errors_total",
            "counter",
            "Slot files refused (checksum, model identity, shape).",
            |c| c.restore_errors,
        ),
        (
            "mfx_prompt_slots",
            "gauge",
            "Sessions held in prompt-cache slots in RAM (besides the live one).",
            |c| c.slots,
        ),
        (
            "mfx_prompt_slot_cached_tokens",
            "gauge",
            "Tokens whose state the RAM slots hold.",
            |c| c.cached_tokens,
        ),
        (
            "mfx_prompt_slot_bytes",
            "gauge",
            "Bytes the RAM slots hold.",
            |c| c.bytes,
        ),
        (
            "mfx_prompt_slot_disk_bytes",
            "gauge",
            "Bytes of slot files in the slot directory.",
            |c| c.disk_bytes,
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = write!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        if let Some(c) = c {
            let _ = writeln!(s, "{name} {}", value(c));
        }
    }
}
