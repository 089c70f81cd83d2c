//! `mfx serve --ram auto` under memory pressure (issue 20): in a memory
//! cgroup, a second process allocates until the cgroup is nearly full; mfx
//! must give expert-cache memory back (the `/metrics` gauges fall), both
//! processes must survive, greedy output must not change, and the cache must
//! grow back once the other process has exited.
//!
//! The other process is this test binary again (`pressure_hog`, which does
//! nothing unless `MFX_TEST_HOG_CGROUP` is set), so the test needs nothing
//! but root and a memory cgroup; without them it is skipped loudly.

use crate::budget::cgroups_writable;
use crate::serve::http;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/models/tiny-qwen3-moe-coder"
);
/// The cgroup's limit: the served pack's process needs about 35 MiB, so the
/// hog can take most of it and push the cgroup over 90%.
const LIMIT: u64 = 150 << 20;

/// A memory cgroup (v1 or v2) removed on drop.
struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

impl Cgroup {
    fn create(name: &str, limit: u64) -> Cgroup {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let (dir, v2) = if v1.is_dir() {
            (v1.join(name), false)
        } else {
            (Path::new("/sys/fs/cgroup").join(name), true)
        };
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("create cgroup");
        let file = if v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        std::fs::write(dir.join(file), limit.to_string()).expect("set limit");
        Cgroup { dir, v2 }
    }

    fn file(&self, v1: &str, v2: &str) -> PathBuf {
        self.dir.join(if self.v2 { v2 } else { v1 })
    }

    fn usage(&self) -> u64 {
        let p = self.file("memory.usage_in_bytes", "memory.current");
        std::fs::read_to_string(p)
            .expect("cgroup usage")
            .trim()
            .parse()
            .expect("usage is a number")
    }

    fn oom_kills(&self) -> u64 {
        let p = self.file("memory.oom_control", "memory.events");
        let text = std::fs::read_to_string(p).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `cmd` started inside this cgroup (a shell joins it, then execs).
    fn spawn(&self, program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Child {
        let procs = self.dir.join("cgroup.procs");
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(&procs)
            .arg(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c.spawn().expect("spawn in cgroup")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The kernel refuses to remove a cgroup until its processes are gone.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `(resident_bytes, slots)` from `/metrics`.
fn cache_gauges(addr: &str) -> (u64, u64) {
    let (status, body) = http(addr, "GET", "/metrics", "");
    assert_eq!(status, 200, "{body}");
    let gauge = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}")) as u64
    };
    (
        gauge("mfx_expert_cache_resident_bytes"),
        gauge("mfx_expert_cache_slots"),
    )
}

fn greedy(addr: &str) -> String {
    let req = r#"{"prompt": "def fibonacci(n):", "max_tokens": 24, "temperature": 0}"#;
    let (status, body) = http(addr, "POST", "/v1/completions", req);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["choices"][0]["text"]
        .as_str()
        .expect("completion text")
        .to_owned()
}

/// Polls `cond` every 100 ms for up to `secs`.
fn wait_for(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn serve_ram_auto_gives_memory_back_under_pressure() {
    if !cgroups_writable("serve_ram_auto_gives_memory_back_under_pressure") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // 8-bit experts, all hot: the largest expert cache the tiny model gives.
    let pack = dir.path().join("p8.mfx");
    let o = crate::common::mfx(&[
        "prep",
        MODEL,
        "--ram",
        "200M",
        "--hot-bits",
        "8",
        "--cold-bits",
        "8",
        "--hot-fraction",
        "1",
        "-o",
        pack.to_str().unwrap(),
    ]);
    crate::common::ok(&o);

    let cg = Cgroup::create(&format!("mfx-pressure-{}", std::process::id()), LIMIT);
    let mut child = cg.spawn(
        Path::new(env!("CARGO_BIN_EXE_mfx")),
        &[
            "serve",
            pack.to_str().unwrap(),
            "--ram",
            "auto",
            "--port",
            "0",
        ],
        &[],
    );
    let stderr = child.stderr.take().expect("stderr");
    let server = Killed(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server printed its address before exiting")
            .expect("stderr line");
        if let Some(pos) = line.find("http://") {
            break line[pos + 7..].trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    // The first request fills the prompt cache; from the second on, the
    // same request takes the same path whatever the expert cache holds.
    greedy(&addr);
    let want = greedy(&addr);
    let (bytes0, slots0) = cache_gauges(&addr);
    assert!(
        bytes0 > 0 && slots0 > 0,
        "a cache to shrink: {bytes0} B, {slots0} slots"
    );

    let stop = dir.path().join("hog.stop");
    let hog = cg.spawn(
        &std::env::current_exe().expect("test binary"),
        &[
            "pressure::pressure_hog",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ],
        &[
            ("MFX_TEST_HOG_CGROUP", cg.dir.to_str().unwrap()),
            ("MFX_TEST_HOG_STOP", stop.to_str().unwrap()),
        ],
    );
    let mut hog = Killed(hog);
    let (mut bytes_min, mut slots_min) = (bytes0, slots0);
    let shrunk = wait_for(20, || {
        let (b, s) = cache_gauges(&addr);
        (bytes_min, slots_min) = (bytes_min.min(b), slots_min.min(s));
        b < bytes0 / 4 * 3 && s < slots0 / 4 * 3
    });
    assert!(
        shrunk,
        "the cache did not give memory back: {bytes0} -> {bytes_min} B, {slots0} -> {slots_min} slots; cgroup at {} of {LIMIT} B",
        cg.usage()
    );
    // Given back for real: the cgroup (the hog still holding its 93%) falls
    // below the 90% at which mfx shrinks.
    let relieved = wait_for(10, || cg.usage() < LIMIT / 100 * 90);
    let usage = cg.usage();
    assert!(relieved, "cgroup still at {usage} of {LIMIT} B");
    let during = greedy(&addr);

    std::fs::write(&stop, b"").expect("stop file");
    let status = hog.0.wait().expect("hog exit");
    assert!(status.success(), "the other process must survive: {status}");
    let grown = wait_for(20, || cache_gauges(&addr).1 == slots0);
    let (_, slots_back) = cache_gauges(&addr);
    assert!(grown, "slots did not grow back: {slots_back} of {slots0}");
    let after = greedy(&addr);
    // Text unlike the greedy prompt routes to experts the shrink evicted.
    let other = serde_json::json!({
        "prompt": "#include <stdio.h>\nint main(void) {\n    printf(\"%d\\n\", 42);\n}\n\nThe quick brown fox jumps over the lazy dog. fn main() { let v: Vec<u32> = Vec::new(); }",
        "max_tokens": 32, "temperature": 0,
    });
    let (status, body) = http(&addr, "POST", "/v1/completions", &other.to_string());
    assert_eq!(status, 200, "{body}");
    let (bytes_back, _) = cache_gauges(&addr);

    eprintln!(
        "pressure: cache {:.1} MiB / {slots0} slots -> {:.1} MiB / {slots_min} slots under pressure \
         (cgroup {:.1} of {:.1} MiB) -> {slots_back} slots, {:.1} MiB after two more requests",
        bytes0 as f64 / 1048576.0,
        bytes_min as f64 / 1048576.0,
        usage as f64 / 1048576.0,
        LIMIT as f64 / 1048576.0,
        bytes_back as f64 / 1048576.0,
    );
    assert_eq!(during, want, "greedy output changed under pressure");
    assert_eq!(after, want, "greedy output changed after regrowth");
    assert!(
        bytes_back > bytes_min,
        "the cache fills again: {bytes_back} B after, {bytes_min} B at the least"
    );
    let mut server = server;
    assert!(
        server.0.try_wait().expect("server status").is_none(),
        "mfx serve must survive"
    );
    assert_eq!(cg.oom_kills(), 0, "no OOM kill in the cgroup");
}

/// The memory hog for the test above: joins nothing itself (it is started
/// inside the cgroup), allocates and touches 2 MiB at a time until the
/// cgroup is 93% full, holds that until the stop file appears, then exits.
#[test]
fn pressure_hog() {
    let (Some(cg), Some(stop)) = (
        std::env::var_os("MFX_TEST_HOG_CGROUP"),
        std::env::var_os("MFX_TEST_HOG_STOP"),
    ) else {
        return;
    };
    let cg = PathBuf::from(cg);
    let read = |v1: &str, v2: &str| -> u64 {
        let p = if cg.join(v1).exists() {
            cg.join(v1)
        } else {
            cg.join(v2)
        };
        std::fs::read_to_string(p)
            .expect("cgroup file")
            .trim()
            .parse()
            .expect("number")
    };
    let limit = read("memory.limit_in_bytes", "memory.max");
    let mut held: Vec<Vec<u8>> = Vec::new();
    let t0 = Instant::now();
    while read("memory.usage_in_bytes", "memory.current") < limit / 100 * 93
        && t0.elapsed() < Duration::from_secs(30)
    {
        // Non-zero bytes on every page, so each page is really allocated.
        held.push(vec![1u8; 2 << 20]);
        std::thread::sleep(Duration::from_millis(10));
    }
    let t1 = Instant::now();
    while !Path::new(&stop).exists() && t1.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("hog held {} MiB", held.len() * 2);
}
