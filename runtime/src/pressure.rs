//! Memory pressure: what the OS says about memory others need, and the
//! governor that shrinks the expert cache when they need it and grows it
//! back when they are done (`--ram auto`, or `--adapt` beside a fixed
//! `--ram`; issue 20: "never harms your apps").
//!
//! Signals, read every [`TICK`]:
//! - Linux, the process's memory cgroup (v2 `memory.max`/`memory.current`/
//!   `memory.pressure`, v1 `memory.limit_in_bytes`/`memory.usage_in_bytes`
//!   less inactive file pages, which the kernel drops before it OOM-kills);
//! - Linux, system-wide PSI (`/proc/pressure/memory`) and `MemAvailable`;
//! - macOS, the kernel's pressure level (`kern.memorystatus_vm_pressure_level`,
//!   the value behind its memory-pressure notifications).
//!
//! Why a poll and not notifications: PSI triggers and cgroup v1 eventfds
//! need a writable file per process, and cgroup v1 has no pressure file at
//! all; a 200 ms read of a few small files costs nothing next to decoding,
//! and a shrink only drops cache references (no I/O), so it is immediate.
//!
//! Shrinking never drops an expert in use: the cache hands out `Arc`s, so an
//! evicted expert's memory goes back when the last forward pass using it
//! ends. Outputs do not change: the cache only decides what is read again.

use crate::cache::ExpertCache;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the governor reads the signals.
pub const TICK: Duration = Duration::from_millis(200);

/// One reading of the memory signals; `None` where the OS does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signals {
    /// The memory cgroup's limit (bytes), if it has one below the machine's memory.
    pub cgroup_limit: Option<u64>,
    /// The cgroup's memory in use that the kernel cannot simply drop.
    pub cgroup_used: Option<u64>,
    /// PSI "some" avg10 (% of the last 10 s some task stalled on memory),
    /// the cgroup's own where it has one, else the system's.
    pub psi_some_avg10: Option<f64>,
    /// `MemAvailable` and `MemTotal` (bytes).
    pub mem_available: Option<u64>,
    pub mem_total: Option<u64>,
    /// macOS pressure level: 1 normal, 2 warning, 4 critical.
    pub darwin_level: Option<u32>,
}

/// What the signals say about the expert cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Others need memory: give some back now.
    Shrink,
    /// Plenty free: the cache may grow back towards its budget.
    Grow,
    /// Neither: stay.
    Hold,
}

/// Above this share of the cgroup limit in use, shrink; below `GROW_BELOW`, grow.
const SHRINK_ABOVE: f64 = 0.90;
const GROW_BELOW: f64 = 0.75;

impl Signals {
    /// Reads every signal this OS offers.
    pub fn read() -> Signals {
        let mut s = Signals::default();
        #[cfg(target_os = "linux")]
        linux::read(&mut s);
        #[cfg(target_os = "macos")]
        {
            s.darwin_level = darwin::pressure_level();
        }
        s
    }

    /// The decision for one reading. Any one signal of pressure shrinks;
    /// growing needs every signal present to be calm, so the cache does not
    /// oscillate against one source while another still reports pressure.
    pub fn verdict(&self) -> Verdict {
        let cg = match (self.cgroup_limit, self.cgroup_used) {
            (Some(l), Some(u)) if l > 0 => Some(u as f64 / l as f64),
            _ => None,
        };
        let avail = match (self.mem_available, self.mem_total) {
            (Some(a), Some(t)) if t > 0 => Some(a as f64 / t as f64),
            _ => None,
        };
        let shrink = cg.is_some_and(|f| f > SHRINK_ABOVE)
            || avail.is_some_and(|f| f < 0.05)
            || self.psi_some_avg10.is_some_and(|p| p > 10.0)
            || self.darwin_level.is_some_and(|l| l >= 2);
        if shrink {
            return Verdict::Shrink;
        }
        let calm = cg.is_none_or(|f| f < GROW_BELOW)
            && avail.is_none_or(|f| f > 0.15)
            && self.psi_some_avg10.is_none_or(|p| p < 1.0)
            && self.darwin_level.is_none_or(|l| l <= 1);
        if calm {
            Verdict::Grow
        } else {
            Verdict::Hold
        }
    }
}

/// The memory cgroup limit of this process, if below the machine's memory:
/// the ceiling of a detected budget inside a container or a cgroup.
pub fn cgroup_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        linux::cgroup().and_then(|c| c.limit())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Shrinks and regrows one expert cache's slots by [`Signals::verdict`].
///
/// The cache's slots per layer run between `floor` (what a forward pass
/// needs: the budget's minimum) and the planned capacities. Shrinking
/// halves the slots above the floor each tick while pressure lasts, so a
/// cache gives back most of its memory within a second; growing waits for
/// `CALM_TICKS` calm readings in a row, then adds an eighth of the range a
/// tick, so an allocation burst that comes and goes does not make the cache
/// read everything back at once.
pub struct Governor {
    full: Vec<usize>,
    floor: Vec<usize>,
    /// Share of the range above the floor the cache may use now, in [0, 1].
    level: f64,
    calm: u32,
}

const CALM_TICKS: u32 = 10;

impl Governor {
    /// `full`: the planned slots per layer (`usize::MAX` = unlimited layers
    /// are left alone); `floor`: the fewest slots per layer.
    pub fn new(full: Vec<usize>, floor: Vec<usize>) -> Governor {
        let floor = floor.iter().zip(&full).map(|(&f, &c)| f.min(c)).collect();
        Governor {
            full,
            floor,
            level: 1.0,
            calm: 0,
        }
    }

    /// The slots per layer at the current level.
    pub fn capacities(&self) -> Vec<usize> {
        self.full
            .iter()
            .zip(&self.floor)
            .map(|(&c, &f)| {
                if c == usize::MAX {
                    return c;
                }
                f + ((c - f) as f64 * self.level).round() as usize
            })
            .collect()
    }

    /// Takes one verdict; returns the new capacities when they change.
    pub fn step(&mut self, v: Verdict) -> Option<Vec<usize>> {
        let before = self.capacities();
        match v {
            Verdict::Shrink => {
                self.calm = 0;
                // Below 1/64 of the range a halving changes nothing; go to the floor.
                self.level = if self.level < 1.0 / 64.0 {
                    0.0
                } else {
                    self.level / 2.0
                };
            }
            Verdict::Grow => {
                self.calm += 1;
                if self.calm >= CALM_TICKS && self.level < 1.0 {
                    self.level = (self.level + 0.125).min(1.0);
                }
            }
            Verdict::Hold => self.calm = 0,
        }
        let after = self.capacities();
        (after != before).then_some(after)
    }

    /// Runs the governor for `cache` on a background thread until the
    /// cache is dropped.
    pub fn spawn(mut self, cache: &Arc<ExpertCache>) -> std::io::Result<()> {
        let weak: Weak<ExpertCache> = Arc::downgrade(cache);
        std::thread::Builder::new()
            .name("mfx-pressure".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                let Some(cache) = weak.upgrade() else {
                    return;
                };
                let s = Signals::read();
                let v = s.verdict();
                if let Some(caps) = self.step(v) {
                    let before = cache.resident_bytes();
                    cache.set_capacities(&caps);
                    // Prompt-cache slots shrink with the expert slots; the
                    // generator spills (or drops) what no longer fits at
                    // its next request.
                    cache.scale_slot_ram(self.level);
                    if v == Verdict::Shrink {
                        crate::memory::trim_heap();
                    }
                    tracing::info!(
                        verdict = ?v,
                        slots = caps.iter().filter(|&&c| c != usize::MAX).sum::<usize>(),
                        cache_bytes_before = before,
                        cache_bytes_after = cache.resident_bytes(),
                        cgroup_used = s.cgroup_used,
                        cgroup_limit = s.cgroup_limit,
                        psi_some_avg10 = s.psi_some_avg10,
                        "memory pressure: expert cache resized"
                    );
                }
            })
            .map(|_| ())
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::Signals;
    use std::path::{Path, PathBuf};

    /// This process's memory cgroup directory.
    pub(super) enum Cgroup {
        V1(PathBuf),
        V2(PathBuf),
    }

    fn read_u64(p: &Path) -> Option<u64> {
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    }

    /// `some avg10=X` of a PSI file.
    pub(super) fn psi_some_avg10(text: &str) -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with("some "))?;
        line.split_whitespace()
            .find_map(|f| f.strip_prefix("avg10="))?
            .parse()
            .ok()
    }

    /// A `key value` line of `memory.stat`.
    pub(super) fn stat_value(text: &str, key: &str) -> Option<u64> {
        text.lines().find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next()? == key).then(|| it.next()?.parse().ok())?
        })
    }

    pub(super) fn cgroup() -> Option<Cgroup> {
        let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
            let rel = path.trim_start_matches('/');
            if ctrl.split(',').any(|c| c == "memory") {
                let dir = Path::new("/sys/fs/cgroup/memory").join(rel);
                if dir.join("memory.limit_in_bytes").exists() {
                    return Some(Cgroup::V1(dir));
                }
            }
            if ctrl.is_empty() {
                let dir = Path::new("/sys/fs/cgroup").join(rel);
                if dir.join("memory.max").exists() {
                    return Some(Cgroup::V2(dir));
                }
            }
        }
        None
    }

    fn mem_total() -> Option<u64> {
        meminfo("MemTotal:")
    }

    fn meminfo(key: &str) -> Option<u64> {
        let s = std::fs::read_to_string("/proc/meminfo").ok()?;
        let kb: u64 = s
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    impl Cgroup {
        /// The limit, if it is below the machine's memory (an unlimited v1
        /// cgroup reports a huge number, v2 "max").
        pub(super) fn limit(&self) -> Option<u64> {
            let l = match self {
                Cgroup::V1(d) => read_u64(&d.join("memory.limit_in_bytes"))?,
                Cgroup::V2(d) => read_u64(&d.join("memory.max"))?,
            };
            (l < mem_total().unwrap_or(u64::MAX)).then_some(l)
        }

        /// Usage less inactive file pages: what the kernel cannot reclaim
        /// without swapping or killing (the "working set" container
        /// runtimes watch).
        fn used(&self) -> Option<u64> {
            let (usage, stat, key) = match self {
                Cgroup::V1(d) => (
                    read_u64(&d.join("memory.usage_in_bytes"))?,
                    std::fs::read_to_string(d.join("memory.stat")).ok(),
                    "total_inactive_file",
                ),
                Cgroup::V2(d) => (
                    read_u64(&d.join("memory.current"))?,
                    std::fs::read_to_string(d.join("memory.stat")).ok(),
                    "inactive_file",
                ),
            };
            let inactive = stat.and_then(|s| stat_value(&s, key)).unwrap_or(0);
            Some(usage.saturating_sub(inactive))
        }

        fn psi(&self) -> Option<f64> {
            match self {
                Cgroup::V1(_) => None,
                Cgroup::V2(d) => {
                    psi_some_avg10(&std::fs::read_to_string(d.join("memory.pressure")).ok()?)
                }
            }
        }
    }

    pub(super) fn read(s: &mut Signals) {
        if let Some(cg) = cgroup() {
            if let Some(limit) = cg.limit() {
                s.cgroup_limit = Some(limit);
                s.cgroup_used = cg.used();
            }
            s.psi_some_avg10 = cg.psi();
        }
        if s.psi_some_avg10.is_none() {
            s.psi_some_avg10 = std::fs::read_to_string("/proc/pressure/memory")
                .ok()
                .and_then(|t| psi_some_avg10(&t));
        }
        s.mem_available = meminfo("MemAvailable:");
        s.mem_total = mem_total();
    }
}

#[cfg(target_os = "macos")]
mod darwin {
    /// `kern.memorystatus_vm_pressure_level`: 1 normal, 2 warning, 4 critical.
    pub(super) fn pressure_level() -> Option<u32> {
        let mut level: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>();
        let name = c"kern.memorystatus_vm_pressure_level";
        // SAFETY: name is NUL-terminated; oldp/oldlenp point at a c_int and
        // its size; no new value is written.
        let rc = unsafe {
            libc::sysctlbyname(
                name.as_ptr(),
                (&mut level as *mut libc::c_int).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        (rc == 0).then_some(level as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(limit: u64, used: u64) -> Signals {
        Signals {
            cgroup_limit: Some(limit),
            cgroup_used: Some(used),
            ..Signals::default()
        }
    }

    #[test]
    fn verdicts_follow_each_signal() {
        assert_eq!(sig(100, 95).verdict(), Verdict::Shrink);
        assert_eq!(sig(100, 80).verdict(), Verdict::Hold);
        assert_eq!(sig(100, 50).verdict(), Verdict::Grow);
        assert_eq!(Signals::default().verdict(), Verdict::Grow);
        let psi = Signals {
            psi_some_avg10: Some(25.0),
            ..sig(100, 10)
        };
        assert_eq!(psi.verdict(), Verdict::Shrink);
        let low = Signals {
            mem_available: Some(3),
            mem_total: Some(100),
            ..Signals::default()
        };
        assert_eq!(low.verdict(), Verdict::Shrink);
        let mac = Signals {
            darwin_level: Some(2),
            ..Signals::default()
        };
        assert_eq!(mac.verdict(), Verdict::Shrink);
        // Calm cgroup but the system's PSI still stalls a little: hold.
        let mixed = Signals {
            psi_some_avg10: Some(5.0),
            ..sig(100, 10)
        };
        assert_eq!(mixed.verdict(), Verdict::Hold);
    }

    #[test]
    fn governor_halves_to_the_floor_and_grows_back_after_calm() {
        let mut g = Governor::new(vec![64, 0, 32, usize::MAX], vec![8, 0, 8, 8]);
        assert_eq!(g.capacities(), vec![64, 0, 32, usize::MAX]);
        assert_eq!(g.step(Verdict::Shrink), Some(vec![36, 0, 20, usize::MAX]));
        for _ in 0..8 {
            g.step(Verdict::Shrink);
        }
        assert_eq!(
            g.capacities(),
            vec![8, 0, 8, usize::MAX],
            "reaches the floor"
        );
        // Calm must last CALM_TICKS readings before anything grows.
        for _ in 0..CALM_TICKS - 1 {
            assert_eq!(g.step(Verdict::Grow), None);
        }
        assert_eq!(g.step(Verdict::Grow), Some(vec![15, 0, 11, usize::MAX]));
        // A hold resets the calm count.
        assert_eq!(g.step(Verdict::Hold), None);
        assert_eq!(g.step(Verdict::Grow), None);
        for _ in 0..CALM_TICKS + 8 {
            g.step(Verdict::Grow);
        }
        assert_eq!(
            g.capacities(),
            vec![64, 0, 32, usize::MAX],
            "back to the plan"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn parses_psi_and_memory_stat() {
        let t = "some avg10=12.50 avg60=3.00 avg300=0.10 total=97489\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=27397\n";
        assert_eq!(linux::psi_some_avg10(t), Some(12.5));
        let st = "cache 100\ntotal_inactive_file 4096\ninactive_file 8\n";
        assert_eq!(linux::stat_value(st, "total_inactive_file"), Some(4096));
        assert_eq!(linux::stat_value(st, "inactive_file"), Some(8));
        assert_eq!(linux::stat_value(st, "missing"), None);
    }
}
