//! `mfx serve` as a process: it starts on a free port, answers over HTTP with
//! transformers' greedy text, and fails to start with a clear message on
//! bad input. The protocol in depth is tested in `runtime/src/server/` and
//! with the official clients in `tests/server/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/models/tiny-qwen3-moe-coder"
);

struct Server {
    child: Child,
    addr: String,
    /// What the server printed up to its address line.
    banner: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    start_model(MODEL, extra)
}

fn start_model(model: &str, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mfx"))
        .args(["serve", model, "--port", "0"])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn mfx serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut banner = Vec::new();
    let addr = loop {
        let line = lines
            .next()
            .expect("server printed its address before exiting")
            .expect("stderr line");
        banner.push(line.clone());
        if let Some(pos) = line.find("http://") {
            break line[pos + 7..].trim().to_owned();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server {
        child,
        addr,
        banner,
    }
}

pub(crate) fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(s, "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("http response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

/// POSTs `req` as JSON; the reply must be 200 and JSON.
fn post_ok(addr: &str, path: &str, req: &serde_json::Value) -> serde_json::Value {
    let (status, body) = http(addr, "POST", path, &req.to_string());
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

#[test]
fn serve_answers_with_transformers_greedy_text() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{MODEL}/reference/reference.json"))
            .expect("reference.json"),
    )
    .expect("json");
    let chat = &reference["prompts"]["chat"];
    let server = start(&[]);
    let (status, body) = http(&server.addr, "GET", "/health", "");
    assert_eq!(status, 200, "{body}");

    let req = serde_json::json!({
        "messages": [{"role": "user", "content": "Write a Python function `read_lines(path)`: Return the lines of a text file without trailing newlines."}],
        "temperature": 0, "max_tokens": 48,
    });
    let v = post_ok(&server.addr, "/v1/chat/completions", &req);
    assert_eq!(v["choices"][0]["message"]["content"], chat["greedy_text"]);
    assert_eq!(
        v["usage"]["prompt_tokens"],
        chat["ids"].as_array().map(Vec::len).unwrap_or(0)
    );

    let (status, body) = http(
        &server.addr,
        "POST",
        "/v1/chat/completions",
        "{\"messages\": 1}",
    );
    assert_eq!(status, 400);
    assert!(body.contains("invalid_request_error"), "{body}");
}

/// The shipped tool-calling model (models/tiny-qwen3-moe-coder-tools-mlx-4bit,
/// issue 23) does a tool round trip unconstrained: a `read_file` call with
/// the path from the question, then an answer quoting the tool's result.
#[test]
fn the_shipped_tool_model_makes_a_call_and_answers_from_its_result() {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/tiny-qwen3-moe-coder-tools-mlx-4bit"
    );
    let server = start_model(model, &[]);
    let tools = serde_json::json!([
        {"type": "function", "function": {"name": "read_file", "description": "Read the contents of a file.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string", "description": "Path of the file to read"}}, "required": ["path"]}}},
        {"type": "function", "function": {"name": "run_command", "description": "Run a shell command and return its output.",
            "parameters": {"type": "object", "properties": {"command": {"type": "string", "description": "The shell command to run"}}, "required": ["command"]}}}
    ]);
    let mut messages = vec![
        serde_json::json!({"role": "user", "content": "What is the first line of notes.txt?"}),
    ];
    let ask = |messages: &[serde_json::Value]| {
        let req = serde_json::json!({"messages": messages, "tools": tools, "temperature": 0, "max_tokens": 100});
        post_ok(&server.addr, "/v1/chat/completions", &req)["choices"][0].clone()
    };
    let first = ask(&messages);
    assert_eq!(first["finish_reason"], "tool_calls", "{first}");
    let call = &first["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "read_file", "{first}");
    let args: serde_json::Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or(""))
            .expect("arguments");
    assert_eq!(args, serde_json::json!({"path": "notes.txt"}));
    messages.push(first["message"].clone());
    messages.push(serde_json::json!({"role": "tool", "tool_call_id": call["id"], "content": "release notes for alpha\nsecond line"}));
    let answer = ask(&messages);
    assert_eq!(answer["finish_reason"], "stop", "{answer}");
    let text = answer["message"]["content"].as_str().unwrap_or("");
    assert!(text.contains("release notes for alpha"), "{answer}");
}

#[test]
fn serve_refuses_bad_input_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_mfx"))
        .args(["serve", "/nonexistent/model-dir", "--port", "0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model-dir"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_mfx"))
        .args(["serve", MODEL, "--port", "0", "--ram", "lots"])
        .output()
        .expect("run");
    // A usage error (exit 2): the size is parsed with the flags, before the model loads.
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'lots' for '--ram <SIZE|auto>'"), "{err}");
}

/// Issue 16 item 9: `mfx serve --help` printed `[env: MFX_API_KEY=<the key>]`.
#[test]
fn serve_help_does_not_print_the_api_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_mfx"))
        .args(["serve", "--help"])
        .env("MFX_API_KEY", "sekrit-key-4711")
        .output()
        .expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("MFX_API_KEY"), "{help}");
    assert!(!help.contains("sekrit-key-4711"), "{help}");
}

/// Issue 16 item 9: `--host 0.0.0.0` without a key started silently.
#[test]
fn serve_on_all_interfaces_without_key_warns() {
    let server = start(&["--host", "0.0.0.0"]);
    let banner = server.banner.join("\n");
    assert!(
        banner.contains("WARNING") && banner.contains("without an API key"),
        "{banner}"
    );
    let keyed = start(&["--host", "0.0.0.0", "--api-key", "k"]);
    let banner = keyed.banner.join("\n");
    assert!(!banner.contains("WARNING"), "{banner}");
    let local = start(&[]);
    assert!(!local.banner.join("\n").contains("WARNING"));
}

/// Issue 19: two conversations interleaved A, B, A, B... through the
/// server, each turn its history plus the reply and a new message. With
/// prompt-cache slots both keep more than 90% of their prompt cached after
/// their first turn; with one session (`--prompt-slots 0`) each turn after
/// the other conversation's starts over, so the check can fail.
#[test]
fn serve_interleaved_conversations_keep_their_cached_prompts() {
    let topics = [
        "You maintain a Rust crate for parsing INI files. ",
        "You are reviewing a Python data pipeline written with pandas. ",
    ];
    let mut cached = Vec::new();
    for slots in ["4", "0"] {
        let server = start(&["--prefill-chunk", "16", "--prompt-slots", slots]);
        let mut hist: Vec<Vec<serde_json::Value>> = topics
            .iter()
            .map(|t| {
                vec![
                    serde_json::json!({"role": "system", "content": t.repeat(60)}),
                    serde_json::json!({"role": "user", "content": "Start with the first step."}),
                ]
            })
            .collect();
        let mut ratios = Vec::new();
        for turn in 0..3 {
            for h in hist.iter_mut() {
                let req = serde_json::json!({"messages": h, "temperature": 0, "max_tokens": 4});
                let (status, body) = http(
                    &server.addr,
                    "POST",
                    "/v1/chat/completions",
                    &req.to_string(),
                );
                assert_eq!(status, 200, "{body}");
                let v: serde_json::Value = serde_json::from_str(&body).expect("json");
                let prompt = v["usage"]["prompt_tokens"].as_u64().expect("prompt_tokens");
                let hit = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .expect("cached_tokens");
                if turn > 0 {
                    ratios.push(hit as f64 / prompt as f64);
                }
                let reply = v["choices"][0]["message"]["content"].clone();
                h.push(serde_json::json!({"role": "assistant", "content": reply}));
                h.push(serde_json::json!({"role": "user", "content": format!("Go on with step {}.", turn + 2)}));
            }
        }
        if slots != "0" {
            let (_, metrics) = http(&server.addr, "GET", "/metrics", "");
            let hits = metrics
                .lines()
                .find_map(|l| l.strip_prefix("mfx_prompt_slot_hits_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("mfx_prompt_slot_hits_total sample");
            assert!(hits >= 4, "{metrics}");
        }
        cached.push(ratios);
    }
    assert!(
        cached[0].iter().all(|&r| r > 0.9),
        "with slots: cached share per turn {:?}",
        cached[0]
    );
    assert!(
        cached[1].iter().all(|&r| r < 0.5),
        "one session only: {:?}",
        cached[1]
    );
}

/// SIGTERM, what service managers send, stops the server gracefully: the
/// session is written to `--slot-dir`, and the next start serves the same
/// prompt from it (issue 19). Without a handler SIGTERM ended the process
/// with nothing written.
#[cfg(unix)]
#[test]
fn sigterm_keeps_the_prompt_cache_for_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let slots = dir.path().to_str().expect("utf-8 path");
    // Longer than one 512-token prefill chunk: only whole chunks are kept.
    let prompt = "Write a Python function `read_lines(path)`. ".repeat(150);
    let req = serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "max_tokens": 8,
    });
    let mut server = start(&["--slot-dir", slots]);
    let first = post_ok(&server.addr, "/v1/chat/completions", &req);
    // The shell's builtin `kill`: a fresh machine may lack procps' binary.
    let term = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", server.child.id())])
        .status()
        .expect("kill");
    assert!(term.success());
    let exit = server.child.wait().expect("wait");
    assert!(
        exit.success(),
        "SIGTERM should end the server cleanly: {exit}"
    );
    let files = std::fs::read_dir(dir.path()).expect("slot dir").count();
    assert!(files > 0, "no slot file written on SIGTERM");

    let server = start(&["--slot-dir", slots]);
    let again = post_ok(&server.addr, "/v1/chat/completions", &req);
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens");
    assert!(
        cached > 0,
        "the restart did not reuse the saved session: {again}"
    );
    assert_eq!(
        again["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );
}
