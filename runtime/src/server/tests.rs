//! Protocol tests against a fake backend over real sockets (raw HTTP/1.0,
//! so the bytes on the wire are what is checked). The real model is tested
//! end to end with the official Python clients in `tests/server/`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A model that "generates" a scripted reply one character per token.
/// The reply is chosen by the last message's text: `TOOL` asks for a Qwen3-
/// Coder XML tool call, `SLOW` for 20 ms per token; anything else gets
/// `Hello, world! How are you?`.
struct Fake {
    info: ModelInfo,
    /// Prompts rendered, for assertions on template input.
    rendered: Mutex<Vec<String>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    cancelled: AtomicUsize,
    started: Mutex<Vec<String>>,
    /// Renders with this real chat template when set.
    template: Option<crate::chat::ChatTemplate>,
    /// Every prompt `generate` was given, as text.
    prompts: Mutex<Vec<String>>,
    /// What `cache_stats` reports.
    cache: Mutex<Option<StatsSnapshot>>,
    /// Every `GenParams` `generate` was given.
    params: Mutex<Vec<GenParams>>,
}

impl Fake {
    fn new() -> Arc<Self> {
        Self::build(None)
    }

    /// A fake that renders with `tests/data/templates/NAME`.
    fn with_template(name: &str) -> Arc<Self> {
        let path = format!(
            "{}/../tests/data/templates/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let t = crate::chat::ChatTemplate::new(src, name.into(), None, Some("<|im_end|>".into()))
            .expect("template compiles");
        Self::build(Some(t))
    }

    fn build(template: Option<crate::chat::ChatTemplate>) -> Arc<Self> {
        // Real templates write long tool instructions (one token per char here).
        let context_length = if template.is_some() { 16384 } else { 1024 };
        Arc::new(Self {
            info: ModelInfo {
                id: "fake-model".into(),
                context_length,
                defaults: SamplingDefaults {
                    temperature: 0.7,
                    top_p: 0.9,
                    top_k: 40,
                },
            },
            rendered: Mutex::new(Vec::new()),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            started: Mutex::new(Vec::new()),
            template,
            prompts: Mutex::new(Vec::new()),
            cache: Mutex::new(None),
            params: Mutex::new(Vec::new()),
        })
    }
}

/// What a model continues a server-forced tool call with, by how the prompt
/// ends (see `ToolForm::forced_prefix`); each named-call continuation goes on
/// to a second call, so that "no parallel calls" has something to cut.
fn forced_continuation(prompt: &str) -> Option<&'static str> {
    let table: [(&str, &str); 4] = [
        (
            "<function=get_weather>\n",
            "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=now>\n</function>\n</tool_call>",
        ),
        ("<tool_call>\n<function", "=now>\n</function>\n</tool_call>"),
        (
            "\"arguments\":",
            " {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>",
        ),
        ("<tool_call>\n{\"name\":", " \"now\", \"arguments\": {}}\n</tool_call>"),
    ];
    table
        .iter()
        .find(|(end, _)| prompt.ends_with(end))
        .map(|(_, cont)| *cont)
}

/// A Qwen3-style reply with reasoning before the answer.
const THINK_REPLY: &str =
    "<think>\nThe user says hi; answer <briefly>.\n</think>\n\nHello! How are you?";

/// gpt-oss (harmony) reasoning, then a call, as the model writes them.
const HARMONY_REPLY: &str = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\", \"days\": 2}";

const TOOL_REPLY: &str = "I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>";

impl Backend for Fake {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn render_chat(&self, p: &ChatPrompt) -> Result<String, BackendError> {
        if let Some(t) = &self.template {
            let mut extra = serde_json::Map::new();
            if let Some(on) = p.enable_thinking {
                extra.insert("enable_thinking".into(), on.into());
            }
            let opts = crate::chat::RenderOptions {
                tools: Some(p.tools.clone()),
                add_generation_prompt: true,
                extra,
            };
            let s = t
                .render(&p.messages, &opts)
                .map_err(|e| BackendError::Invalid(e.to_string()))?;
            if let Ok(mut r) = self.rendered.lock() {
                r.push(s.clone());
            }
            return Ok(s);
        }
        let mut s = String::new();
        if !p.tools.is_empty() {
            s.push_str(&format!("tools:{}\n", Value::Array(p.tools.clone())));
        }
        for m in &p.messages {
            s.push_str(&format!("{m}\n"));
        }
        if let Ok(mut r) = self.rendered.lock() {
            r.push(s.clone());
        }
        Ok(s)
    }

    fn template_source(&self) -> Option<&str> {
        self.template
            .as_ref()
            .map(crate::chat::ChatTemplate::source)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, BackendError> {
        Ok(text.chars().map(|c| c as u32).collect())
    }

    fn cache_stats(&self) -> Option<StatsSnapshot> {
        *self.cache.lock().expect("lock")
    }

    fn generate(
        &self,
        prompt: &[u32],
        params: &GenParams,
        on_delta: &mut dyn FnMut(Delta<'_>) -> bool,
    ) -> Result<Completion, BackendError> {
        let t0 = Instant::now();
        let n = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(n, Ordering::SeqCst);
        let prompt_text: String = prompt.iter().filter_map(|&c| char::from_u32(c)).collect();
        let tag = prompt_text
            .rsplit("content")
            .next()
            .unwrap_or("")
            .to_owned();
        if let Ok(mut s) = self.started.lock() {
            s.push(tag.clone());
        }
        if let Ok(mut p) = self.prompts.lock() {
            p.push(prompt_text.clone());
        }
        if let Ok(mut p) = self.params.lock() {
            p.push(params.clone());
        }
        let long_reply = "Hello, world! How are you? ".repeat(20);
        let reply = if let Some(cont) = forced_continuation(&prompt_text) {
            cont
        } else if tag.contains("HARMONY") {
            HARMONY_REPLY
        } else if tag.contains("THINK") {
            THINK_REPLY
        } else if tag.contains("TOOL") {
            TOOL_REPLY
        } else if tag.contains("LONG") {
            long_reply.as_str()
        } else {
            "Hello, world! How are you?"
        };
        let slow = tag.contains("SLOW");
        let mut out = String::new();
        let mut finish = Finish::Eos;
        let mut produced = 0;
        for ch in reply.chars() {
            if produced == params.max_tokens {
                finish = Finish::Length;
                break;
            }
            produced += 1;
            out.push(ch);
            if let Some(stop) = params.stop.iter().find(|s| out.ends_with(s.as_str())) {
                finish = Finish::Stop(stop.clone());
                break;
            }
            if slow {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Hold back nothing: the fake's stop strings are only checked
            // for single characters in these tests.
            // Each character "has" log-probability -0.25 * (its position
            // in the reply + 1), its alternatives lower.
            let lp = params.logprobs.map(|k| Logprob {
                token: ch.to_string(),
                logprob: -0.25 * produced as f32,
                top: (0..k)
                    .map(|j| (format!("alt{j}"), -0.25 * produced as f32 - j as f32))
                    .collect(),
            });
            if lp.is_some_and(|lp| !on_delta(Delta::Logprob(lp)))
                || !on_delta(Delta::Text(&ch.to_string()))
            {
                self.cancelled.fetch_add(1, Ordering::SeqCst);
                finish = Finish::Cancelled;
                break;
            }
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(Completion {
            finish,
            prompt_tokens: prompt.len(),
            completion_tokens: produced,
            cached_prompt_tokens: 0,
            time_to_first_token: Duration::from_millis(1),
            total_time: t0.elapsed(),
        })
    }
}

async fn start(fake: Arc<Fake>, config: ServerConfig) -> (SocketAddr, Arc<AppState>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (app, state) = router(fake, &config).expect("router");
    tokio::spawn(serve(listener, app, std::future::pending()));
    (addr, state)
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.0 exchange: the server closes the connection after the body,
/// so streams arrive unchunked and complete.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    s.write_all(body).await.expect("write body");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("reply in time")
        .expect("read");
    let text = String::from_utf8(buf).expect("utf8");
    let (head, body) = text.split_once("\r\n\r\n").expect("http head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    Reply {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    }
}

async fn post(addr: SocketAddr, path: &str, body: Value) -> Reply {
    raw(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await
}

fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
        })
        .collect()
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_non_streaming_with_usage_and_defaults() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let r = post(addr, "/v1/chat/completions", json!({
        "model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "some_unknown_field": 1
    }))
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let prompt_len = fake.rendered.lock().expect("lock")[0].chars().count();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_len);
    assert_eq!(v["usage"]["total_tokens"], prompt_len + 5);

    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "stop": ","}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_is_well_formed_and_ends_with_done() {
    let (addr, _) = start(Fake::new(), ServerConfig::default()).await;
    let r = post(addr, "/v1/chat/completions", json!({
        "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}
    }))
    .await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{}",
        r.headers
    );
    let events = sse_data(&r.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello, world! How are you?");
    let finals: Vec<_> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0]["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 26);
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_openai_both_ways_and_tools_reach_the_template() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let req = json!({"messages": [{"role": "user", "content": "TOOL please"}], "tools": [weather_tool()]});
    let v = post(addr, "/v1/chat/completions", req.clone()).await.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    // The newline before the call is the template's layout, not text.
    assert_eq!(choice["message"]["content"], "I'll look.");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(call["id"].as_str().is_some_and(|s| s.starts_with("call_")));
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("string"))
        .expect("json");
    assert_eq!(args, json!({"city": "Paris", "days": 2}));
    assert!(fake.rendered.lock().expect("lock")[0].contains("\"get_weather\""));

    let mut sreq = req;
    sreq["stream"] = json!(true);
    let r = post(addr, "/v1/chat/completions", sreq).await;
    let events = sse_data(&r.body);
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).expect("json"))
        .collect();
    let tc: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert!(
        tc.len() >= 3,
        "name chunk then one chunk per parameter then close: {tc:?}"
    );
    assert_eq!(tc[0]["function"]["name"], "get_weather");
    assert!(tc[0]["id"].is_string());
    let streamed: String = tc
        .iter()
        .filter_map(|t| t["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&streamed).expect("args json"),
        json!({"city": "Paris", "days": 2})
    );
    assert_eq!(
        chunks
            .iter()
            .rev()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str()),
        Some("tool_calls")
    );

    // tool_choice "none" keeps the tools out of the prompt and the output unparsed.
    let v = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "TOOL"}],
        "tools": [weather_tool()], "tool_choice": "none"}),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["message"]["content"], TOOL_REPLY);
    assert!(!fake.rendered.lock().expect("lock")[2].contains("get_weather\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_results_go_back_through_the_template_in_template_shape() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}
    ], "tools": [weather_tool()]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rendered = fake.rendered.lock().expect("lock")[0].clone();
    // arguments arrive at the template as an object, content as a string
    assert!(
        rendered.contains(r#""arguments":{"city":"Oslo"}"#),
        "{rendered}"
    );
    assert!(
        rendered.contains(r#"{"role":"tool","content":"sunny","tool_call_id":"call_1"}"#),
        "{rendered}"
    );

    let r = post(addr, "/v1/messages", json!({"max_tokens": 10, "system": [{"type": "text", "text": "Be brief."}], "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}
    ]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rendered = fake.rendered.lock().expect("lock")[1].clone();
    let lines: Vec<Value> = rendered
        .lines()
        .map(|l| serde_json::from_str(l).expect("line"))
        .collect();
    assert_eq!(lines[0], json!({"role": "system", "content": "Be brief."}));
    assert_eq!(
        lines[2]["tool_calls"][0]["function"],
        json!({"name": "get_weather", "arguments": {"city": "Oslo"}})
    );
    assert_eq!(lines[2]["content"], "Checking.");
    assert_eq!(
        lines[3],
        json!({"role": "tool", "content": "sunny", "tool_call_id": "toolu_1"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_and_event_sequence() {
    let (addr, _) = start(Fake::new(), ServerConfig::default()).await;
    let v = post(
        addr,
        "/v1/messages",
        json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await
    .json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"], json!([{"type": "text", "text": "Hello"}]));
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 5);

    let v = post(addr, "/v1/messages", json!({"max_tokens": 50, "stop_sequences": ["!"], "messages": [{"role": "user", "content": "hi"}]})).await.json();
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], "!");

    let r = post(addr, "/v1/messages", json!({"max_tokens": 200, "stream": true,
        "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}],
        "messages": [{"role": "user", "content": "TOOL"}]})).await;
    let names: Vec<&str> = r
        .body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("event: "))
        .map(|e| e.lines().next().unwrap_or(""))
        .collect();
    let mut expected = vec!["message_start", "ping", "content_block_start"];
    // One character a token; a space goes out with the letter after it,
    // and the newline before the call is template layout, dropped.
    let text_deltas = "I'll look.".chars().count() - 1;
    expected.extend(std::iter::repeat_n("content_block_delta", text_deltas));
    expected.extend([
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]);
    assert_eq!(names, expected);
    let datas: Vec<Value> = sse_data(&r.body)
        .iter()
        .map(|d| serde_json::from_str(d).expect("json"))
        .collect();
    let tool_start = datas
        .iter()
        .find(|d| d["content_block"]["type"] == "tool_use")
        .expect("tool block");
    assert_eq!(tool_start["index"], 1);
    assert_eq!(tool_start["content_block"]["name"], "get_weather");
    let partial: String = datas
        .iter()
        .filter_map(|d| d["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&partial).expect("json"),
        json!({"city": "Paris", "days": 2})
    );
    let md = datas
        .iter()
        .find(|d| d["type"] == "message_delta")
        .expect("message_delta");
    assert_eq!(md["delta"]["stop_reason"], "tool_use");
    assert!(md["usage"]["output_tokens"].as_u64().is_some_and(|n| n > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_provider_shapes() {
    let (addr, _) = start(Fake::new(), ServerConfig::default()).await;
    let r = raw(addr, "POST", "/v1/chat/completions", &[], b"{not json").await;
    assert_eq!(r.status, 400);
    let e = &r.json()["error"];
    assert_eq!(e["type"], "invalid_request_error");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("malformed JSON")),
        "{e}"
    );
    assert!(e.get("param").is_some() && e.get("code").is_some());

    let r = post(addr, "/v1/chat/completions", json!({"model": "m"})).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("messages")));

    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": 5}]}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "messages[0].content");

    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [], "temperature": 0.5}),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("temperature"))
    );
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}], "top_p": 0}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("top_p"))
    );

    let long = "x".repeat(1100);
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    // The message names the limit and the remedy (clients show it as is).
    let msg = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        msg.contains("maximum context length is 1024 tokens") && msg.contains("--max-context"),
        "{msg}"
    );

    let r = post(
        addr,
        "/v1/messages",
        json!({"max_tokens": 5, "messages": "nope"}),
    )
    .await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let r = post(
        addr,
        "/v1/messages",
        json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x".repeat(1100)}]}),
    )
    .await;
    assert_eq!((r.status, r.json()["type"].clone()), (400, json!("error")));
    let r = raw(addr, "POST", "/v1/messages", &[], b"").await;
    assert_eq!(
        (r.status, r.json()["error"]["type"].clone()),
        (400, json!("invalid_request_error"))
    );

    let r = raw(addr, "GET", "/v1/nothing", &[], b"").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
}

/// Issue 16 item 9: 16 stop strings of 1 MB each were accepted and stalled
/// the single worker; count and length are capped with a 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_count_and_length_are_capped() {
    let (addr, _) = start(Fake::new(), ServerConfig::default()).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let huge = "x".repeat(pipeline::MAX_STOP_BYTES + 1);
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "stop": ["ok", huge]}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "stop[1]");
    let many: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let r = post(
        addr,
        "/v1/completions",
        json!({"prompt": "hi", "stop": many}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("stop"))
    );
    let r = post(
        addr,
        "/v1/messages",
        json!({"max_tokens": 5, "messages": msgs, "stop_sequences": [huge]}),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let m = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(m.starts_with("stop_sequences[0]"), "{m}");
    // At the caps, accepted.
    let ok = "x".repeat(pipeline::MAX_STOP_BYTES - 2);
    let sixteen: Vec<String> = (0..16).map(|i| format!("{i:02}{ok}")).collect();
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "stop": sixteen, "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_checked_on_both_headers() {
    let config = ServerConfig {
        api_key: Some("sekrit".into()),
        ..ServerConfig::default()
    };
    let (addr, _) = start(Fake::new(), config).await;
    let r = raw(addr, "GET", "/v1/models", &[], b"").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = raw(
        addr,
        "POST",
        "/v1/messages",
        &[("x-api-key", "wrong")],
        b"{}",
    )
    .await;
    assert_eq!((r.status, r.json()["type"].clone()), (401, json!("error")));
    let r = raw(
        addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer sekrit")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "fake-model");
    let r = raw(addr, "GET", "/v1/models", &[("x-api-key", "sekrit")], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(raw(addr, "GET", "/health", &[], b"").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_is_fifo_bounded_and_one_at_a_time() {
    let fake = Fake::new();
    let config = ServerConfig {
        max_queue: 2,
        ..ServerConfig::default()
    };
    let (addr, state) = start(fake.clone(), config).await;
    let mut handles = Vec::new();
    for i in 0..3 {
        let body = json!({"messages": [{"role": "user", "content": format!("SLOW {i}")}], "max_tokens": 10});
        handles.push(tokio::spawn(post(addr, "/v1/chat/completions", body)));
        // Let each request reach the queue before the next, so order is defined.
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.started.lock().expect("lock").len() + state.worker.queue_depth() < i + 1
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // One generating and two waiting: the next is refused.
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    let r = post(
        addr,
        "/v1/messages",
        json!({"max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["type"].clone()),
        (429, json!("rate_limit_error"))
    );
    for h in handles {
        assert_eq!(h.await.expect("join").status, 200);
    }
    let order: Vec<String> = fake.started.lock().expect("lock").clone();
    let idx: Vec<usize> = order
        .iter()
        .filter_map(|t| (0..3).find(|i| t.contains(&format!("SLOW {i}"))))
        .collect();
    assert_eq!(idx, vec![0, 1, 2]);
    assert_eq!(fake.max_running.load(Ordering::SeqCst), 1);

    let metrics = raw(addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        metrics.contains("mfx_requests_total{endpoint=\"/v1/chat/completions\",status=\"429\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mfx_generated_tokens_total 30"),
        "{metrics}"
    );
    assert!(metrics.contains("mfx_queue_depth 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_generation() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let body =
        json!({"messages": [{"role": "user", "content": "SLOW LONG"}], "stream": true}).to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.expect("read");
    assert!(n > 0);
    // The role chunk goes out before the worker takes the job; leave only
    // once the generation runs (a client gone before that is skipped, not
    // cancelled, and the fake would never hear of it).
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.started.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.cancelled.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        fake.cancelled.load(Ordering::SeqCst),
        1,
        "generation was not cancelled; the reply began {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // The slot is free again.
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_completions() {
    let (addr, _) = start(Fake::new(), ServerConfig::default()).await;
    let v = post(
        addr,
        "/v1/completions",
        json!({"prompt": "def f():", "max_tokens": 3}),
    )
    .await
    .json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "Hel");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 8);
    let r = post(
        addr,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 4, "stream": true}),
    )
    .await;
    let events = sse_data(&r.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            serde_json::from_str::<Value>(e)
                .ok()
                .and_then(|v| v["choices"][0]["text"].as_str().map(str::to_owned))
        })
        .collect();
    assert_eq!(text, "Hell");
}

fn now_tool() -> Value {
    json!({"type": "function", "function": {"name": "now", "description": "The time",
        "parameters": {"type": "object", "properties": {}}}})
}

fn openai_calls(v: &Value) -> Vec<(String, Value)> {
    v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .map(|c| {
                    let args = c["function"]["arguments"].as_str().expect("string args");
                    (
                        c["function"]["name"].as_str().expect("name").to_owned(),
                        serde_json::from_str(args).expect("arguments are JSON"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A named `tool_choice` makes the reply a call to that function in the
/// template's own form (XML for Qwen3-Coder, Hermes JSON for Qwen3), even
/// for a message the model would answer in text, and the call the server
/// wrote the start of comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tool_choice_forces_the_call_in_each_templates_form() {
    for (tmpl, forced) in [
        (
            "qwen3-coder.jinja",
            "<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n",
        ),
        (
            "qwen3.jinja",
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\":",
        ),
    ] {
        let fake = Fake::with_template(tmpl);
        let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
        let choice = json!({"type": "function", "function": {"name": "get_weather"}});
        let req = json!({"messages": [{"role": "user", "content": "hi"}],
            "tools": [weather_tool(), now_tool()], "tool_choice": choice});
        let r = post(addr, "/v1/chat/completions", req.clone()).await;
        assert_eq!(r.status, 200, "{tmpl}: {}", r.body);
        let v = r.json();
        let prompt = fake.prompts.lock().expect("lock")[0].clone();
        assert!(prompt.ends_with(forced), "{tmpl}: {prompt}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{tmpl}");
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null, "{tmpl}");
        let calls = openai_calls(&v);
        // Parallel calls are allowed by default: the model's second call stays.
        assert_eq!(
            calls,
            vec![
                ("get_weather".into(), json!({"city": "Paris", "days": 2})),
                ("now".into(), json!({})),
            ],
            "{tmpl}"
        );

        // Slowly (20 ms a token), so the stop is seen while there is more to come.
        let mut one = req.clone();
        one["parallel_tool_calls"] = json!(false);
        one["messages"][0]["content"] = json!("SLOW hi");
        let v = post(addr, "/v1/chat/completions", one).await.json();
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{tmpl}");
        assert_eq!(
            openai_calls(&v),
            vec![("get_weather".into(), json!({"city": "Paris", "days": 2}))],
            "{tmpl}"
        );
        // The generation was stopped after the first call, not run to its end.
        let full = forced_continuation(&prompt)
            .expect("scripted")
            .chars()
            .count();
        assert!(
            v["usage"]["completion_tokens"].as_u64().expect("usage") < full as u64,
            "{tmpl}: {}",
            v["usage"]
        );

        // Streaming: the name first (the XML form knows it before the model
        // writes anything), then arguments that concatenate to the JSON.
        let mut sreq = req;
        sreq["stream"] = json!(true);
        sreq["parallel_tool_calls"] = json!(false);
        let r = post(addr, "/v1/chat/completions", sreq).await;
        let events = sse_data(&r.body);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).expect("chunk json"))
            .collect();
        let tc: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
            .collect();
        assert_eq!(tc[0]["function"]["name"], "get_weather", "{tmpl}");
        assert!(tc.iter().all(|t| t["index"] == 0), "{tmpl}: {tc:?}");
        let args: String = tc
            .iter()
            .filter_map(|t| t["function"]["arguments"].as_str())
            .collect();
        assert_eq!(
            serde_json::from_str::<Value>(&args).expect("args json"),
            json!({"city": "Paris", "days": 2}),
            "{tmpl}"
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "", "{tmpl}");
        assert_eq!(
            chunks
                .iter()
                .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
                .collect::<Vec<_>>(),
            vec!["tool_calls"]
        );
    }
}

/// "required" / `any` with several tools: the server writes the call's
/// opening up to the name and the model picks the function.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tool_choice_opens_a_call_and_the_model_names_it() {
    for (tmpl, forced) in [
        ("qwen3-coder.jinja", "assistant\n<tool_call>\n<function"),
        ("qwen3.jinja", "assistant\n<tool_call>\n{\"name\":"),
    ] {
        let fake = Fake::with_template(tmpl);
        let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
        let v = post(
            addr,
            "/v1/chat/completions",
            json!({
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [weather_tool(), now_tool()], "tool_choice": "required"}),
        )
        .await
        .json();
        assert!(
            fake.prompts.lock().expect("lock")[0].ends_with(forced),
            "{tmpl}"
        );
        assert_eq!(
            v["choices"][0]["finish_reason"], "tool_calls",
            "{tmpl}: {v}"
        );
        assert_eq!(openai_calls(&v), vec![("now".into(), json!({}))], "{tmpl}");

        let v = post(
            addr,
            "/v1/messages",
            json!({"max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}},
                      {"name": "now", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"}}),
        )
        .await
        .json();
        assert_eq!(v["stop_reason"], "tool_use", "{tmpl}: {v}");
        assert_eq!(
            v["content"].as_array().map(Vec::len),
            Some(1),
            "{tmpl}: {v}"
        );
        assert_eq!(v["content"][0]["type"], "tool_use");
        assert_eq!(v["content"][0]["name"], "now");
        assert_eq!(v["content"][0]["input"], json!({}));
    }
}

/// Anthropic's `tool` choice with `disable_parallel_tool_use`, streamed: one
/// tool_use block, whole, then `stop_reason: tool_use`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_named_tool_choice_streams_one_tool_use_block() {
    let fake = Fake::with_template("qwen3-coder.jinja");
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let tools = json!([
        {"name": "get_weather", "input_schema": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}}},
        {"name": "now", "input_schema": {"type": "object"}}]);
    let r = post(
        addr,
        "/v1/messages",
        json!({"max_tokens": 200, "stream": true, "tools": tools,
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let datas: Vec<Value> = sse_data(&r.body)
        .iter()
        .map(|d| serde_json::from_str(d).expect("json"))
        .collect();
    let kinds: Vec<&str> = datas.iter().filter_map(|d| d["type"].as_str()).collect();
    assert_eq!(kinds[..3], ["message_start", "ping", "content_block_start"]);
    assert_eq!(
        kinds[kinds.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let starts: Vec<&Value> = datas
        .iter()
        .filter(|d| d["type"] == "content_block_start")
        .collect();
    assert_eq!(starts.len(), 1, "{datas:?}");
    assert_eq!(starts[0]["content_block"]["type"], "tool_use");
    assert_eq!(starts[0]["content_block"]["name"], "get_weather");
    let partial: String = datas
        .iter()
        .filter_map(|d| d["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&partial).expect("json"),
        json!({"city": "Paris", "days": 2})
    );
    let md = datas
        .iter()
        .find(|d| d["type"] == "message_delta")
        .expect("message_delta");
    assert_eq!(md["delta"]["stop_reason"], "tool_use");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_choice_is_a_400_in_each_providers_shape() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "tools": [weather_tool()],
        "tool_choice": {"type": "function", "function": {"name": "get_wether"}}}),
    )
    .await;
    assert_eq!(r.status, 400);
    let e = &r.json()["error"];
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(e["param"], "tool_choice");
    assert!(
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("get_wether") && m.contains("get_weather")),
        "{e}"
    );
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "tool_choice": "required"}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("tool_choice"))
    );
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "tools": [weather_tool()], "tool_choice": "always"}),
    )
    .await;
    assert_eq!(r.status, 400);

    let tools = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let r = post(
        addr,
        "/v1/messages",
        json!({"max_tokens": 5, "messages": msgs, "tools": tools,
        "tool_choice": {"type": "tool", "name": "nope"}}),
    )
    .await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{v}"
    );
    let r = post(
        addr,
        "/v1/messages",
        json!({"max_tokens": 5, "messages": msgs,
        "tool_choice": {"type": "any"}}),
    )
    .await;
    assert_eq!((r.status, r.json()["type"].clone()), (400, json!("error")));
    // Nothing reached the generator.
    assert!(fake.prompts.lock().expect("lock").is_empty());
}

/// A Prometheus text-format exposition, checked line by line: every sample
/// belongs to a family announced by `# HELP` and `# TYPE` (counter or
/// gauge) before it, and every value is a float. Returns name -> value for
/// the unlabelled samples.
fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let mut help = std::collections::HashSet::new();
    let mut typed = std::collections::HashMap::new();
    let mut values = std::collections::HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, doc) = rest.split_once(' ').expect("HELP name text");
            assert!(!doc.is_empty(), "{line}");
            assert!(help.insert(name.to_owned()), "HELP twice: {line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(help.contains(name), "TYPE before HELP: {line}");
            assert!(matches!(kind, "counter" | "gauge"), "{line}");
            assert!(
                typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line}"
            );
        } else {
            let (series, value) = line.rsplit_once(' ').expect("sample: series value");
            let name = series.split('{').next().expect("name");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            assert!(typed.contains_key(name), "sample without TYPE: {line}");
            let v: f64 = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
            if typed[name] == "counter" {
                assert!(v >= 0.0, "negative counter: {line}");
            }
            if !series.contains('{') {
                values.insert(name.to_owned(), v);
            }
        }
    }
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_export_the_backends_cache_statistics() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let m = parse_prometheus(&raw(addr, "GET", "/metrics", &[], b"").await.body);
    assert_eq!(m["mfx_expert_cache_enabled"], 0.0);
    // Announced (HELP/TYPE), but no sample without a cache.
    assert!(!m.contains_key("mfx_expert_cache_hits_total"));
    let text = raw(addr, "GET", "/metrics", &[], b"").await.body;
    assert!(
        text.contains("# TYPE mfx_expert_cache_hit_rate gauge\n"),
        "{text}"
    );

    let snap = |hits: u64, misses: u64, bytes: u64, stall_ms: f64| StatsSnapshot {
        hits,
        misses,
        bytes_read: bytes,
        stall_ms,
        loads: misses,
        evictions: misses / 2,
        hit_rate: hits as f64 / (hits + misses) as f64,
        ..StatsSnapshot::default()
    };
    *fake.cache.lock().expect("lock") = Some(snap(300, 100, 4 << 20, 1500.0));
    let m = parse_prometheus(&raw(addr, "GET", "/metrics", &[], b"").await.body);
    assert_eq!(m["mfx_expert_cache_enabled"], 1.0);
    assert_eq!(m["mfx_expert_cache_hits_total"], 300.0);
    assert_eq!(m["mfx_expert_cache_misses_total"], 100.0);
    assert_eq!(m["mfx_expert_cache_hit_rate"], 0.75);
    assert_eq!(m["mfx_expert_cache_read_bytes_total"], (4 << 20) as f64);
    assert_eq!(m["mfx_expert_cache_io_stall_seconds_total"], 1.5);
    assert_eq!(m["mfx_expert_cache_loads_total"], 100.0);
    assert_eq!(m["mfx_expert_cache_evictions_total"], 50.0);

    *fake.cache.lock().expect("lock") = Some(snap(900, 100, 5 << 20, 2250.0));
    let m = parse_prometheus(&raw(addr, "GET", "/metrics", &[], b"").await.body);
    assert_eq!(m["mfx_expert_cache_hits_total"], 900.0);
    assert_eq!(m["mfx_expert_cache_hit_rate"], 0.9);
    assert_eq!(m["mfx_expert_cache_read_bytes_total"], (5 << 20) as f64);
    assert_eq!(m["mfx_expert_cache_io_stall_seconds_total"], 2.25);
}

/// Issue 23: Claude Code's first request carries a mid-conversation system
/// message, `thinking`, `context_management`, `output_config` and a
/// `max_tokens` larger than the context; mfx answered 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_first_request_is_accepted() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let r = post(addr, "/v1/messages?beta=true", json!({
        "model": "claude-opus-4-8", "max_tokens": 64000, "stream": false,
        "system": [{"type": "text", "text": "You are an agent.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
            {"role": "system", "content": "Available agent types: none."},
        ],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "x"},
    }))
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["stop_reason"], "end_turn");
    // The mid-conversation system message was folded into the user turn.
    let rendered = fake
        .rendered
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .unwrap_or_default();
    assert!(
        rendered.contains("Say hi\\n\\nAvailable agent types: none."),
        "{rendered}"
    );
    // One system message (the leading one), as every template accepts.
    let systems = rendered
        .lines()
        .filter(|l| l.contains("\"role\":\"system\""))
        .count();
    assert_eq!(systems, 1, "{rendered}");
    // Fields that would need what this server lacks are refused by name.
    for (field, value, name) in [
        (
            "output_config",
            json!({"format": {"type": "json_schema"}}),
            "output_config.format",
        ),
        ("thinking", json!({"type": "sometimes"}), "thinking.type"),
        (
            "context_management",
            json!({"edits": [{"type": "clear_tool_uses_20250919"}]}),
            "context_management.edits.0.type",
        ),
    ] {
        let mut body = json!({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        body[field] = value;
        let r = post(addr, "/v1/messages", body).await;
        assert_eq!(r.status, 400, "{field}: {}", r.body);
        let m = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(m.starts_with(name), "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_tokens_equals_the_prompt_tokens_of_the_same_request() {
    let (addr, _) = start(Fake::new(), ServerConfig::default()).await;
    let body = json!({"model": "m", "system": "Be brief.", "tools": [{"name": "now", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Well,"}]});
    let r = post(addr, "/v1/messages/count_tokens", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let counted = r.json()["input_tokens"].as_u64().expect("input_tokens");
    let mut req = body;
    req["max_tokens"] = json!(3);
    let v = post(addr, "/v1/messages", req).await.json();
    let u = &v["usage"];
    let prompt = u["input_tokens"].as_u64().unwrap_or(0)
        + u["cache_read_input_tokens"].as_u64().unwrap_or(0);
    assert_eq!(counted, prompt, "{v}");
}

/// A trailing assistant message is the start of the reply: the prompt ends
/// with it (after the generation prompt) and the reply is its continuation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_trailing_assistant_message_is_continued() {
    let fake = Fake::with_template("qwen3-coder.jinja");
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let r = post(addr, "/v1/messages", json!({"max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure: {"}]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let prompts = fake.prompts.lock().expect("lock");
    let p = prompts.last().expect("a prompt");
    assert!(p.ends_with("<|im_start|>assistant\nSure: {"), "{p:?}");
    assert_eq!(r.json()["content"][0]["text"], "Hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_usage_does_not_count_cache_reads_twice() {
    let c = Completion {
        finish: Finish::Eos,
        prompt_tokens: 100,
        completion_tokens: 7,
        cached_prompt_tokens: 60,
        time_to_first_token: Duration::ZERO,
        total_time: Duration::ZERO,
    };
    let u = anthropic::usage_for_tests(&c);
    assert_eq!(
        (
            u["input_tokens"].clone(),
            u["cache_read_input_tokens"].clone()
        ),
        (json!(40), json!(60))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_carries_retry_after() {
    let e = error::ApiError::new(
        error::Flavor::Anthropic,
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "busy",
    );
    let resp = e.into_response();
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_retrieve_by_id() {
    let (addr, _) = start(Fake::new(), ServerConfig::default()).await;
    let r = raw(addr, "GET", "/v1/models/fake-model", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], "fake-model");
    assert_eq!(r.json()["object"], "model");
    let r = raw(
        addr,
        "GET",
        "/v1/models/fake-model",
        &[("anthropic-version", "2023-06-01")],
        b"",
    )
    .await;
    assert_eq!(
        (r.json()["type"].clone(), r.json()["id"].clone()),
        (json!("model"), json!("fake-model"))
    );
    let r = raw(addr, "GET", "/v1/models/other", &[], b"").await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("model_not_found"))
    );
}

fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|ev| {
            let name = ev.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = ev.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((
                name.to_owned(),
                serde_json::from_str(data).expect("event JSON"),
            ))
        })
        .collect()
}

/// The Responses API as Codex sends it: developer messages, function tools
/// in a namespace and a hosted tool, streamed events in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_api_text_and_stream() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let r = post(
        addr,
        "/v1/responses",
        json!({"model": "m", "input": "hi", "max_output_tokens": 5}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        (v["object"].clone(), v["status"].clone()),
        (json!("response"), json!("incomplete"))
    );
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["output"][0]["content"][0]["text"], "Hello");
    assert_eq!(
        v["output"][0]["status"], "incomplete",
        "the message the limit cut"
    );
    assert_eq!(v["usage"]["output_tokens"], 5);

    let r = post(addr, "/v1/responses", json!({"model": "m", "stream": true, "store": false,
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Be an agent."}]},
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Skills: none."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        ],
        "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object", "properties": {}}},
                  {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "close_agent"}]},
                  {"type": "web_search"}],
        "tool_choice": "auto", "parallel_tool_calls": true, "reasoning": {"summary": "auto"},
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let evs = sse_events(&r.body);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        &names[names.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (i, (name, v)) in evs.iter().enumerate() {
        assert_eq!(
            (v["type"].as_str(), v["sequence_number"].as_u64()),
            (Some(name.as_str()), Some(i as u64))
        );
    }
    let text: String = evs
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .filter_map(|(_, v)| v["delta"].as_str())
        .collect();
    assert_eq!(text, "Hello, world! How are you?");
    let done = &evs.last().expect("events").1["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], text.as_str());
    assert!(done["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0);
    let rendered = fake
        .rendered
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .unwrap_or_default();
    assert!(
        rendered.contains("Be an agent.\\n\\nSkills: none."),
        "{rendered}"
    );
    assert!(
        rendered.contains("exec_command") && rendered.contains("close_agent"),
        "{rendered}"
    );
    assert!(!rendered.contains("web_search"), "{rendered}");

    let r = post(
        addr,
        "/v1/responses",
        json!({"input": "hi", "previous_response_id": "resp_1"}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("previous_response_id"))
    );
    let r = post(
        addr,
        "/v1/responses",
        json!({"input": [{"type": "computer_call"}]}),
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("input[0].type"))
    );
}

/// Function calls come out as `function_call` items (streamed arguments),
/// and a round trip (call, output) goes back through the template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_api_function_calls_both_ways() {
    let fake = Fake::with_template("qwen3-coder.jinja");
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let tools = json!([{"type": "function", "name": "get_weather", "parameters": weather_tool()["function"]["parameters"]}]);
    let r = post(
        addr,
        "/v1/responses",
        json!({"input": "TOOL", "tools": tools}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let call = v["output"]
        .as_array()
        .and_then(|o| o.iter().find(|i| i["type"] == "function_call"))
        .cloned()
        .expect("a call");
    assert_eq!(call["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["arguments"].as_str().unwrap_or("")).expect("JSON arguments");
    assert_eq!(args, json!({"city": "Paris", "days": 2}));

    let r = post(
        addr,
        "/v1/responses",
        json!({"input": "TOOL", "tools": tools, "stream": true}),
    )
    .await;
    let evs = sse_events(&r.body);
    let added = evs
        .iter()
        .find(|(n, v)| n == "response.output_item.added" && v["item"]["type"] == "function_call")
        .expect("call added");
    assert_eq!(added.1["item"]["name"], "get_weather");
    let args: String = evs
        .iter()
        .filter(|(n, _)| n == "response.function_call_arguments.delta")
        .filter_map(|(_, v)| v["delta"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).expect("args"),
        json!({"city": "Paris", "days": 2})
    );

    // Cut off inside the call by the token limit: the item says so (an
    // agent must not run a call whose arguments may be missing fields).
    let cut = TOOL_REPLY.find("<parameter=days>").expect("fixture") + 20;
    for stream in [false, true] {
        let r = post(
            addr,
            "/v1/responses",
            json!({"input": "TOOL", "tools": tools, "max_output_tokens": cut, "stream": stream}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = if stream {
            let evs = sse_events(&r.body);
            let done = evs
                .iter()
                .find(|(n, v)| {
                    n == "response.output_item.done" && v["item"]["type"] == "function_call"
                })
                .expect("call done");
            assert_eq!(done.1["item"]["status"], "incomplete", "{}", r.body);
            evs.iter()
                .find(|(n, _)| n == "response.incomplete")
                .expect("response.incomplete")
                .1["response"]
                .clone()
        } else {
            r.json()
        };
        assert_eq!(v["status"], "incomplete");
        let call = v["output"]
            .as_array()
            .and_then(|o| o.iter().find(|i| i["type"] == "function_call"))
            .cloned()
            .expect("a call");
        assert_eq!(call["status"], "incomplete", "stream={stream}: {call}");
    }

    let r = post(addr, "/v1/responses", json!({"tools": tools, "max_output_tokens": 3, "input": [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    ]})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rendered = fake
        .rendered
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .unwrap_or_default();
    assert!(
        rendered.contains("<function=get_weather>") && rendered.contains("Oslo"),
        "{rendered}"
    );
    assert!(rendered.contains("sunny, 21 C"), "{rendered}");
}

/// The second turn of the real agent clients, as scripts/agents_e2e.sh
/// recorded them (docs/AGENTS.md; trimmed): Claude Code 2.1.332 after a
/// Read call, Codex CLI 0.171.0 after an exec_command call. Each must be
/// answered 200 with the tool's output in the rendered prompt, and, for
/// Claude Code, the mid-conversation system text kept after the first
/// user message (so the first turn's rendering, and its cached KV, does
/// not change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_clients_second_turns_reach_the_template() {
    let fake = Fake::with_template("qwen3-coder.jinja");
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let last_rendered = || {
        fake.rendered
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .unwrap_or_default()
    };
    let read_tool = json!({"name": "Read", "description": "Reads a file from the local filesystem.",
        "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "properties": {"file_path": {"type": "string"}, "limit": {"type": "integer", "exclusiveMinimum": 0}},
            "required": ["file_path"], "additionalProperties": false}});
    let claude = json!({
        "model": "claude-opus-5-5", "max_tokens": 128000, "stream": true,
        "metadata": {"user_id": "{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"s\"}"},
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332;"},
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Use the tools.", "cache_control": {"type": "ephemeral"}}],
        "tools": [read_tool],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>attribution</system-reminder>"},
                {"type": "text", "text": "What is the first line of notes.txt?"}]},
            {"role": "system", "content": "# Environment\nPrimary working directory: /w"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read",
                "input": {"file_path": "/w/notes.txt"}}]},
            {"role": "user", "content": [{"tool_use_id": "toolu_1", "type": "tool_result",
                "content": "1\tmfx-e2e-token\n2\tsecond line\n", "cache_control": {"type": "ephemeral"}}]}]});
    let r = raw(
        addr,
        "POST",
        "/v1/messages?beta=true",
        &[
            ("Content-Type", "application/json"),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,effort-2025-11-24"),
        ],
        claude.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("event: message_stop"), "{}", r.body);
    let rendered = last_rendered();
    let (question, env, call, result) = (
        rendered.find("first line of notes.txt"),
        rendered.find("Primary working directory"),
        rendered.find("<function=Read>"),
        rendered.find("mfx-e2e-token"),
    );
    assert!(
        matches!((question, env, call, result), (Some(q), Some(e), Some(c), Some(t)) if q < e && e < c && c < t),
        "{rendered}"
    );

    let codex = json!({
        "model": "mfx-agent", "stream": true, "store": false, "tool_choice": "auto",
        "parallel_tool_calls": true, "reasoning": {"summary": "auto"},
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k",
        "client_metadata": {"x-codex-installation-id": "i"},
        "tools": [
            {"type": "function", "name": "exec_command", "description": "Runs a command.", "strict": false,
             "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"],
                 "additionalProperties": false}},
            {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [
                {"type": "function", "name": "close_agent", "description": "Close an agent.", "strict": false,
                 "parameters": {"type": "object", "properties": {"target": {"type": "string"}}}}]},
            {"type": "web_search", "external_web_access": false}],
        "input": [
            {"type": "message", "id": "msg_1", "role": "developer",
             "content": [{"type": "input_text", "text": "You are a coding agent running in the Codex CLI."}]},
            {"type": "message", "id": "msg_2", "role": "developer",
             "content": [{"type": "input_text", "text": "<permissions instructions>read-only</permissions instructions>"}]},
            {"type": "message", "id": "msg_3", "role": "user",
             "content": [{"type": "input_text", "text": "<environment_context>cwd</environment_context>"}]},
            {"type": "message", "id": "msg_4", "role": "user",
             "content": [{"type": "input_text", "text": "What is the first line of notes.txt?"}]},
            {"type": "function_call", "status": "completed", "id": "fc_1", "name": "exec_command",
             "arguments": "{\"cmd\": \"head -n 1 notes.txt\"}", "call_id": "call_1"},
            {"type": "function_call_output", "id": "fco_1", "call_id": "call_1",
             "output": "Process exited with code 0\nOutput:\nmfx-e2e-token\n"}]});
    let r = post(addr, "/v1/responses", codex).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("event: response.completed"), "{}", r.body);
    let rendered = last_rendered();
    let (call, result) = (
        rendered.find("<function=exec_command>"),
        rendered.find("mfx-e2e-token"),
    );
    assert!(
        matches!((call, result), (Some(c), Some(t)) if c < t) && rendered.contains("close_agent"),
        "{rendered}"
    );
}

/// Reasoning is returned apart from the text, in each provider's shape,
/// streamed and not, and never appears in the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_comes_back_separately_in_every_api() {
    let fake = Fake::with_template("qwen3.jinja");
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let reasoning = "The user says hi; answer <briefly>.";
    let answer = "Hello! How are you?";
    let msgs = json!([{"role": "user", "content": "THINK"}]);

    // OpenAI chat, whole.
    let v = post(addr, "/v1/chat/completions", json!({"messages": msgs}))
        .await
        .json();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], answer, "{v}");
    assert_eq!(m["reasoning_content"], reasoning, "{v}");
    // Streamed: reasoning deltas, then content deltas, joined the same.
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "stream": true}),
    )
    .await;
    let (mut rs, mut cs, mut order) = (String::new(), String::new(), Vec::new());
    for d in sse_data(&r.body).iter().filter(|d| *d != "[DONE]") {
        let d: Value = serde_json::from_str(d).expect("chunk");
        let delta = &d["choices"][0]["delta"];
        if let Some(t) = delta["reasoning_content"].as_str() {
            rs.push_str(t);
            order.push('r');
        }
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            cs.push_str(t);
            order.push('c');
        }
    }
    assert_eq!((rs.as_str(), cs.as_str()), (reasoning, answer));
    assert!(
        order.windows(2).all(|w| w != ['c', 'r']),
        "reasoning first: {order:?}"
    );

    // Anthropic, whole: a thinking block, then a text block.
    let v = post(
        addr,
        "/v1/messages",
        json!({"max_tokens": 200, "messages": msgs}),
    )
    .await
    .json();
    assert_eq!(
        v["content"],
        json!([{"type": "thinking", "thinking": reasoning, "signature": ""},
               {"type": "text", "text": answer}]),
        "{v}"
    );
    // Streamed: thinking_delta in block 0 (closed with a signature), text in block 1.
    let r = post(
        addr,
        "/v1/messages",
        json!({"max_tokens": 200, "stream": true, "messages": msgs}),
    )
    .await;
    let ev = sse_events(&r.body);
    let starts: Vec<&Value> = ev
        .iter()
        .filter(|(n, _)| n == "content_block_start")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[0]["content_block"]["type"], "thinking");
    assert_eq!(starts[1]["content_block"]["type"], "text");
    let joined = |kind: &str, field: &str, index: u64| -> String {
        ev.iter()
            .filter(|(n, d)| {
                n == "content_block_delta" && d["index"] == index && d["delta"]["type"] == kind
            })
            .filter_map(|(_, d)| d["delta"][field].as_str())
            .collect()
    };
    assert_eq!(joined("thinking_delta", "thinking", 0), reasoning);
    assert_eq!(joined("text_delta", "text", 1), answer);
    assert!(ev
        .iter()
        .any(|(_, d)| d["index"] == 0 && d["delta"]["type"] == "signature_delta"));

    // Responses: a reasoning item, then the message.
    let v = post(addr, "/v1/responses", json!({"input": "THINK"}))
        .await
        .json();
    let out = v["output"].as_array().expect("output");
    assert_eq!(out.len(), 2, "{v}");
    assert_eq!(out[0]["type"], "reasoning");
    assert_eq!(out[0]["content"][0]["text"], reasoning);
    assert_eq!(out[1]["content"][0]["text"], answer);
    let r = post(
        addr,
        "/v1/responses",
        json!({"input": "THINK", "stream": true}),
    )
    .await;
    let ev = sse_events(&r.body);
    let deltas: String = ev
        .iter()
        .filter(|(n, _)| n == "response.reasoning_text.delta")
        .filter_map(|(_, d)| d["delta"].as_str())
        .collect();
    assert_eq!(deltas, reasoning);
    let done = ev
        .iter()
        .find(|(n, _)| n == "response.completed")
        .expect("completed");
    assert_eq!(done.1["response"]["output"][0]["type"], "reasoning");
}

/// A reasoning turn sent back (OpenAI `reasoning_content`, Anthropic
/// `thinking` block, Responses `reasoning` item) reaches the template,
/// which renders it as the model was trained to see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_sent_back_reaches_the_template() {
    let fake = Fake::with_template("qwen3.jinja");
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let tools = json!([weather_tool()]);
    let expect = "<think>\nEarlier thought.\n</think>\n\n";
    let openai = json!({"tools": tools, "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "reasoning_content": "Earlier thought.",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]});
    let anthropic = json!({"max_tokens": 10, "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Earlier thought.", "signature": "x"},
            {"type": "tool_use", "id": "c1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "sunny"}]}]});
    let responses = json!({"tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "input": [
        {"type": "message", "role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Earlier thought."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]});
    for (path, body) in [
        ("/v1/chat/completions", openai),
        ("/v1/messages", anthropic),
        ("/v1/responses", responses),
    ] {
        let r = post(addr, path, body).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        let rendered = fake
            .rendered
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("rendered");
        assert!(
            rendered.contains(&format!("<|im_start|>assistant\n{expect}<tool_call>")),
            "{path}: {rendered}"
        );
    }
}

/// gpt-oss: harmony channels from the model's output become reasoning and
/// a tool call, through the real template's format detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harmony_output_is_split_into_reasoning_and_calls() {
    let fake = Fake::with_template("gpt-oss.jinja");
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let req =
        json!({"tools": [weather_tool()], "messages": [{"role": "user", "content": "HARMONY"}]});
    let v = post(addr, "/v1/chat/completions", req.clone()).await.json();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "Need the weather.", "{v}");
    assert_eq!(m["content"], Value::Null, "{v}");
    assert_eq!(
        openai_calls(&v),
        vec![(
            "get_weather".to_owned(),
            json!({"city": "Paris", "days": 2})
        )]
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let rendered = fake
        .rendered
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("rendered");
    assert!(rendered.ends_with("<|start|>assistant"), "{rendered}");
}

/// The sampler fields reach the backend, range- and type-checked by name;
/// the fields this server cannot honour are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampler_fields_are_honoured_or_refused_by_name() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "max_tokens": 2,
        "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.1,
        "min_p": 0.05, "logit_bias": {"7": -100, "3": 2.5}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = fake
        .params
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("params");
    assert_eq!(
        p.penalties,
        Penalties {
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.25),
            repetition_penalty: Some(1.1),
            min_p: Some(0.05),
            logit_bias: vec![(3, 2.5), (7, -100.0)],
        }
    );
    let r = post(
        addr,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 2, "frequency_penalty": 1.0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let p = fake
        .params
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("params");
    assert_eq!(p.penalties.frequency_penalty, Some(1.0));

    for (path, extra, param) in [
        (
            "/v1/chat/completions",
            json!({"presence_penalty": "x"}),
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            json!({"presence_penalty": 2.5}),
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            json!({"frequency_penalty": -3}),
            "frequency_penalty",
        ),
        (
            "/v1/chat/completions",
            json!({"repetition_penalty": 0}),
            "repetition_penalty",
        ),
        ("/v1/chat/completions", json!({"min_p": 1.5}), "min_p"),
        (
            "/v1/chat/completions",
            json!({"logit_bias": {"abc": 1}}),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            json!({"logit_bias": {"5": 101}}),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            json!({"logprobs": "yes"}),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"top_logprobs": 3}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            "/v1/completions",
            json!({"presence_penalty": "x"}),
            "presence_penalty",
        ),
        (
            "/v1/responses",
            json!({"presence_penalty": "x"}),
            "presence_penalty",
        ),
        (
            "/v1/responses",
            json!({"temperature": "hot"}),
            "temperature",
        ),
        ("/v1/responses", json!({"top_logprobs": 2}), "top_logprobs"),
        (
            "/v1/responses",
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            "/v1/completions",
            json!({"top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
        ),
        ("/v1/completions", json!({"logprobs": 21}), "logprobs"),
        ("/v1/completions", json!({"logprobs": true}), "logprobs"),
        ("/v1/completions", json!({"suffix": "end"}), "suffix"),
        ("/v1/completions", json!({"min_p": -0.1}), "min_p"),
    ] {
        let mut body = match path {
            "/v1/completions" => json!({"prompt": "x"}),
            "/v1/responses" => json!({"input": "x"}),
            _ => json!({"messages": msgs}),
        };
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let r = post(addr, path, body).await;
        assert_eq!(r.status, 400, "{path} {extra}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["param"], param, "{path} {extra}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(param)),
            "{v}"
        );
    }
    // Their neutral values are accepted.
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "max_tokens": 1,
        "logprobs": false, "response_format": {"type": "text"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Log-probabilities in chat's and completions' shapes, streamed and not:
/// one entry per generated token, in order, with the asked-for number of
/// alternatives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_in_chat_and_completions() {
    let fake = Fake::new();
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let reply: Vec<String> = "Hello".chars().map(|c| c.to_string()).collect();
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "max_tokens": 5,
        "logprobs": true, "top_logprobs": 2}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content")
        .clone();
    assert_eq!(content.len(), 5, "{v}");
    for (i, e) in content.iter().enumerate() {
        assert_eq!(e["token"], reply[i]);
        assert_eq!(e["logprob"], json!(-0.25 * (i + 1) as f32));
        assert_eq!(e["bytes"], json!(reply[i].as_bytes()));
        assert_eq!(e["top_logprobs"].as_array().map(Vec::len), Some(2));
        assert_eq!(e["top_logprobs"][1]["token"], "alt1");
    }
    // Not asked: null, and the backend is not asked either.
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.json()["choices"][0]["logprobs"], Value::Null);
    assert_eq!(
        fake.params.lock().expect("lock").last().map(|p| p.logprobs),
        Some(None)
    );
    // Streamed: every token's entry rides on a chunk, in order.
    let r = post(
        addr,
        "/v1/chat/completions",
        json!({"messages": msgs, "max_tokens": 5,
        "logprobs": true, "stream": true}),
    )
    .await;
    let mut tokens = Vec::new();
    for d in sse_data(&r.body).iter().filter(|d| d.as_str() != "[DONE]") {
        let c: Value = serde_json::from_str(d).expect("chunk");
        for e in c["choices"][0]["logprobs"]["content"]
            .as_array()
            .into_iter()
            .flatten()
        {
            assert_eq!(e["top_logprobs"], json!([]));
            tokens.push(e["token"].as_str().expect("token").to_owned());
        }
    }
    assert_eq!(tokens, reply);
    // Completions: the legacy shape, `logprobs: N` alternatives.
    let r = post(
        addr,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 5, "logprobs": 3}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let lp = r.json()["choices"][0]["logprobs"].clone();
    assert_eq!(lp["tokens"], json!(reply));
    assert_eq!(lp["token_logprobs"][4], json!(-1.25f32));
    assert_eq!(lp["text_offset"], json!([0, 1, 2, 3, 4]));
    assert_eq!(lp["top_logprobs"][0].as_object().map(|o| o.len()), Some(3));
    let r = post(
        addr,
        "/v1/completions",
        json!({"prompt": "x", "max_tokens": 5, "logprobs": 0,
        "stream": true}),
    )
    .await;
    let mut tokens = Vec::new();
    for d in sse_data(&r.body).iter().filter(|d| d.as_str() != "[DONE]") {
        let c: Value = serde_json::from_str(d).expect("chunk");
        let lp = &c["choices"][0]["logprobs"];
        let offsets = lp["text_offset"].as_array().cloned().unwrap_or_default();
        for (t, o) in lp["tokens"].as_array().into_iter().flatten().zip(offsets) {
            assert_eq!(o, json!(tokens.len()), "offsets continue across chunks");
            tokens.push(t.as_str().expect("token").to_owned());
        }
    }
    assert_eq!(tokens, reply);
}

/// Anthropic's `thinking: {type: disabled}` turns the template's reasoning
/// off (`enable_thinking: false`: Qwen3 writes an empty think block after
/// the generation prompt); `adaptive` leaves the template's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_thinking_disabled_reaches_the_template() {
    let fake = Fake::with_template("qwen3.jinja");
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    let last = || {
        fake.rendered
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("rendered")
    };
    for (thinking, empty_block) in [
        (json!({"type": "disabled"}), true),
        (json!({"type": "adaptive"}), false),
        (json!({"type": "enabled", "budget_tokens": 1024}), false),
    ] {
        let r = post(
            addr,
            "/v1/messages",
            json!({"max_tokens": 4, "thinking": thinking,
            "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            last().ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            empty_block,
            "{thinking}: {}",
            last()
        );
    }
}

/// An assistant history whose call has `arguments: ""` or `"null"` (what
/// clients send for a call without arguments) renders as a call without
/// parameters with Qwen3-Coder's template, which iterates over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_or_null_call_arguments_render() {
    let fake = Fake::with_template("qwen3-coder.jinja");
    let (addr, _) = start(fake.clone(), ServerConfig::default()).await;
    for args in ["", "null", " "] {
        let r = post(
            addr,
            "/v1/chat/completions",
            json!({"max_tokens": 2, "messages": [
            {"role": "user", "content": "what time is it?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "now", "arguments": args}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]}),
        )
        .await;
        assert_eq!(r.status, 200, "{args:?}: {}", r.body);
        let rendered = fake
            .rendered
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("rendered");
        assert!(
            rendered.contains("<function=now>\n</function>"),
            "{args:?}: {rendered}"
        );
        // Responses' function_call items likewise.
        let r = post(
            addr,
            "/v1/responses",
            json!({"max_output_tokens": 2, "input": [
            {"role": "user", "content": "what time is it?"},
            {"type": "function_call", "call_id": "c1", "name": "now", "arguments": args},
            {"type": "function_call_output", "call_id": "c1", "output": "12:00"}]}),
        )
        .await;
        assert_eq!(r.status, 200, "{args:?}: {}", r.body);
    }
}

/// `--cors`: preflights are answered (before the key check) for the
/// listed origins only; without it no CORS header is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_opt_in_and_per_origin() {
    let config = ServerConfig {
        api_key: Some("k".into()),
        cors_origins: vec!["http://ui.example".into()],
        ..ServerConfig::default()
    };
    let (addr, _) = start(Fake::new(), config).await;
    let preflight = |origin: &'static str| async move {
        let h = [
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization,content-type,x-api-key",
            ),
        ];
        raw(addr, "OPTIONS", "/v1/chat/completions", &h, b"").await
    };
    let r = preflight("http://ui.example").await;
    assert_eq!(r.status, 200, "{}", r.headers);
    let h = r.headers.to_ascii_lowercase();
    assert!(
        h.contains("access-control-allow-origin: http://ui.example"),
        "{h}"
    );
    assert!(
        h.contains("access-control-allow-headers: authorization,content-type,x-api-key"),
        "{h}"
    );
    let r = preflight("http://evil.example").await;
    assert!(
        !r.headers
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{}",
        r.headers
    );
    // A real request carries the header too (and still needs the key).
    let r = raw(
        addr,
        "GET",
        "/v1/models",
        &[("Origin", "http://ui.example"), ("x-api-key", "k")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r
        .headers
        .to_ascii_lowercase()
        .contains("access-control-allow-origin: http://ui.example"));
    let r = raw(
        addr,
        "GET",
        "/v1/models",
        &[("Origin", "http://ui.example")],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);

    let (addr, _) = start(Fake::new(), ServerConfig::default()).await;
    let r = raw(
        addr,
        "GET",
        "/v1/models",
        &[("Origin", "http://ui.example")],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(
        !r.headers.to_ascii_lowercase().contains("access-control"),
        "{}",
        r.headers
    );
}

/// The access log: one `mfx::access` line per request, written when the
/// response is complete (a stream's after its last event) with status,
/// tokens and timings; errors carry their message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request() {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    // The only test that installs one; the server's threads log into it.
    tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
    let lines = |marker: &str| -> Vec<String> {
        let b = buf.0.lock().expect("lock");
        String::from_utf8_lossy(&b)
            .lines()
            .filter(|l| l.contains("mfx::access") && l.contains(marker))
            .map(str::to_owned)
            .collect()
    };
    let (addr, _) = start(Fake::new(), ServerConfig::default()).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // Other tests log into the same subscriber: these requests carry ids.
    let send = |path: &'static str, id: &'static str, body: Value| async move {
        let h = [("Content-Type", "application/json"), ("x-request-id", id)];
        raw(addr, "POST", path, &h, body.to_string().as_bytes()).await
    };
    let r = send(
        "/v1/chat/completions",
        "acc-chat",
        json!({"messages": msgs, "max_tokens": 5}),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(
        "/v1/completions",
        "acc-stream",
        json!({"prompt": "x", "max_tokens": 3, "stream": true}),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send("/v1/messages", "acc-error", json!({"messages": msgs})).await;
    assert_eq!(r.status, 400);
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines("acc-stream").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let chat = lines("acc-chat");
    assert_eq!(chat.len(), 1, "{chat:?}");
    for field in [
        "INFO",
        "method=POST",
        "path=/v1/chat/completions",
        "status=200",
        "completion_tokens=5",
        "length",
        "ttft_ms=",
        "gen_ms=",
        "ms=",
    ] {
        assert!(chat[0].contains(field), "{field}: {}", chat[0]);
    }
    assert!(chat[0].contains("prompt_tokens="), "{}", chat[0]);
    let stream = lines("acc-stream");
    assert_eq!(stream.len(), 1, "{stream:?}");
    assert!(stream[0].contains("completion_tokens=3"), "{}", stream[0]);
    let err = lines("acc-error");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(
        err[0].contains("WARN") && err[0].contains("status=400"),
        "{}",
        err[0]
    );
    assert!(
        err[0].contains("max_tokens"),
        "the error message: {}",
        err[0]
    );
    assert!(!err[0].contains("completion_tokens"), "{}", err[0]);
}
