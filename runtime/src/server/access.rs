//! The access and error log: one structured `tracing` event per request
//! (target `mfx::access`), written when the response is complete: for a
//! stream, when its body ends or the client goes away, so that the tokens
//! and timings of the generation are on the same line as the status.
//!
//! Fields: `method`, `path`, `status`, `ms` (from the request to the end
//! of the response), `request_id` (the client's `x-request-id`, if any),
//! and for generations `prompt_tokens`,
//! `cached_tokens`, `completion_tokens`, `finish`, `ttft_ms`, `gen_ms`;
//! for errors the `error` message. Level: info for 2xx/3xx, warn for 4xx,
//! error for 5xx.
//!
//! The handler's generation finds its request's record through a task
//! local set by [`layer`] (handlers run inside the middleware's future),
//! and keeps it for the body stream, which runs outside it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

use super::backend::{Completion, Finish};

tokio::task_local! {
    static CURRENT: Arc<Record>;
}

/// What a request's handler learned, for its log line.
#[derive(Debug, Default)]
pub struct Record {
    usage: Mutex<Option<Completion>>,
}

impl Record {
    /// The record of the request whose handler is running, if any.
    pub fn current() -> Option<Arc<Record>> {
        CURRENT.try_with(Arc::clone).ok()
    }

    /// Notes a finished generation.
    pub fn completed(&self, c: &Completion) {
        if let Ok(mut u) = self.usage.lock() {
            *u = Some(c.clone());
        }
    }
}

/// The error message an [`super::error::ApiError`] response carries, for
/// the log (the body is already serialized).
#[derive(Debug, Clone)]
pub struct ErrorNote(pub String);

/// Writes the line when dropped: after the last byte of a stream, or
/// when the client went away.
struct Line {
    method: String,
    path: String,
    status: u16,
    request_id: Option<String>,
    error: Option<String>,
    start: Instant,
    record: Arc<Record>,
}

impl Drop for Line {
    fn drop(&mut self) {
        let ms = format!("{:.1}", self.start.elapsed().as_secs_f64() * 1e3);
        let usage = self.record.usage.lock().ok().and_then(|u| u.clone());
        let (prompt, cached, completion, finish, ttft, gen) = match &usage {
            Some(c) => (
                Some(c.prompt_tokens as u64),
                Some(c.cached_prompt_tokens as u64),
                Some(c.completion_tokens as u64),
                Some(finish_name(&c.finish)),
                Some(format!("{:.1}", c.time_to_first_token.as_secs_f64() * 1e3)),
                Some(format!("{:.1}", c.total_time.as_secs_f64() * 1e3)),
            ),
            None => (None, None, None, None, None, None),
        };
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "mfx::access",
                    method = %self.method,
                    path = %self.path,
                    status = self.status,
                    request_id = self.request_id.as_deref(),
                    ms = %ms,
                    prompt_tokens = prompt,
                    cached_tokens = cached,
                    completion_tokens = completion,
                    finish = finish,
                    ttft_ms = ttft.as_deref(),
                    gen_ms = gen.as_deref(),
                    error = self.error.as_deref(),
                )
            };
        }
        match self.status {
            500.. => line!(error),
            400..=499 => line!(warn),
            _ => line!(info),
        }
    }
}

fn finish_name(f: &Finish) -> &'static str {
    match f {
        Finish::Eos => "eos",
        Finish::Length => "length",
        Finish::Stop(_) => "stop",
        Finish::Cancelled => "cancelled",
        Finish::Halted => "halted",
    }
}

/// The middleware: runs the request with its record in scope and logs
/// when the response is done.
pub async fn layer(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(128).collect());
    let record = Arc::new(Record::default());
    let resp = CURRENT.scope(record.clone(), next.run(req)).await;
    let line = Line {
        method,
        path,
        status: resp.status().as_u16(),
        request_id,
        error: resp.extensions().get::<ErrorNote>().map(|e| e.0.clone()),
        start,
        record,
    };
    let streaming = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        drop(line);
        return resp;
    }
    // The line goes with the body: written when the stream is dropped.
    let (parts, body) = resp.into_parts();
    let stream = body.into_data_stream().map(move |chunk| {
        let _keep = &line;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}
