//! `mfx serve`: an OpenAI- and Anthropic-compatible HTTP server.
//!
//! Layers, outermost first: [`router`] (axum routes, API-key check, request
//! counting), the provider modules ([`openai`], [`anthropic`]: JSON in and
//! out, SSE framing), [`pipeline`] (prompt to tokens, parameters, tool-call
//! parsing), [`worker`] (the bounded FIFO queue and the one generating
//! thread) and the [`Backend`] trait, the only thing that knows the model.

pub mod access;
pub mod anthropic;
pub mod backend;
pub mod constraint;
pub mod engine;
pub mod error;
pub mod fields;
pub mod metrics;
pub mod openai;
pub mod pipeline;
pub mod responses;
pub mod toolchoice;
pub mod worker;

#[cfg(test)]
mod template_tests;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

pub use backend::{
    Backend, BackendError, ChatPrompt, Completion, Delta, Finish, GenParams, Logprob, ModelInfo,
    Penalties, SamplingDefaults, StatsSnapshot,
};
use error::{ApiError, Flavor};
use metrics::Metrics;
use worker::Worker;

/// How the server is set up.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// When set, every `/v1` request and `/metrics` must carry it as
    /// `Authorization: Bearer KEY` or `x-api-key: KEY`.
    pub api_key: Option<String>,
    /// Requests that may wait while one generates; more get 429.
    pub max_queue: usize,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Origins browsers may call the API from (CORS; `*` for any); empty
    /// sends no CORS headers, so browsers refuse cross-origin calls.
    pub cors_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            max_queue: 64,
            max_body_bytes: 32 << 20,
            cors_origins: Vec::new(),
        }
    }
}

/// Shared by every handler.
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub worker: Worker,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<String>,
    /// Unix time the server started (the model's `created`).
    pub started_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not start the generation thread: {0}")]
    Worker(#[source] std::io::Error),
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("the server stopped with an error: {0}")]
    Serve(#[source] std::io::Error),
}

/// Builds the state and the router; the worker thread starts here.
pub fn router(
    backend: Arc<dyn Backend>,
    config: &ServerConfig,
) -> Result<(Router, Arc<AppState>), ServerError> {
    let metrics = Arc::new(Metrics::default());
    let worker = Worker::start(backend.clone(), config.max_queue, metrics.clone())
        .map_err(ServerError::Worker)?;
    let state = Arc::new(AppState {
        backend,
        worker,
        metrics,
        api_key: config.api_key.clone(),
        started_at: pipeline::unix_now(),
    });
    let protected = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/responses", post(responses::create))
        .route("/metrics", get(metrics_handler))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let app = Router::new()
        .merge(protected)
        .route("/health", get(health))
        // Claude Code probes `HEAD /` before its first request.
        .route("/", get(health))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(middleware::from_fn(access::layer))
        .with_state(state.clone());
    let app = match cors_layer(&config.cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    Ok((app, state))
}

/// The CORS layer for `--cors`: preflights are answered before the API
/// key is checked (browsers send them without credentials); the allowed
/// headers include the providers' (`authorization`, `x-api-key`,
/// `anthropic-version`, ...), since the layer mirrors what is asked.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| axum::http::HeaderValue::from_str(o.trim()).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([header::RETRY_AFTER])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServerError::Serve)
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM: what service managers
/// (systemd, Docker, Kubernetes) send to stop a server. Both end in a
/// graceful shutdown, so the caller can persist the prompt-cache slots; by
/// default SIGTERM would end the process with nothing written.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => eprintln!(
                "mfx serve: WARNING: no SIGTERM handler ({e}); only Ctrl-C stops gracefully"
            ),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Binds `addr` and serves until Ctrl-C or SIGTERM; prints the address it
/// listens on.
pub fn run_blocking(
    backend: Arc<dyn Backend>,
    config: &ServerConfig,
    addr: &str,
) -> Result<(), ServerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("mfx-http")
        .build()
        .map_err(ServerError::Serve)?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                addr: addr.to_owned(),
                source,
            })?;
        let local: SocketAddr = listener.local_addr().map_err(ServerError::Serve)?;
        let (app, state) = router(backend, config)?;
        eprintln!(
            "mfx serve: {} listening on http://{local}",
            state.backend.info().id
        );
        serve(listener, app, stop_signal()).await
    })
}

fn flavor_for(path: &str) -> Flavor {
    if path.starts_with("/v1/messages") {
        Flavor::Anthropic
    } else {
        Flavor::OpenAi
    }
}

async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        if !key_matches(req.headers(), key) {
            let flavor = flavor_for(req.uri().path());
            return ApiError::new(
                flavor,
                StatusCode::UNAUTHORIZED,
                "invalid or missing API key",
            )
            .code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares in constant time, so the key cannot be guessed byte by byte
/// from response times.
fn key_matches(headers: &HeaderMap, key: &str) -> bool {
    let eq = |given: &str| {
        let (a, b) = (given.as_bytes(), key.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|v| eq(v.trim()));
    let x_api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| eq(v.trim()));
    bearer || x_api_key
}

async fn count_requests(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    state
        .metrics
        .record_request(&endpoint, resp.status().as_u16());
    resp
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    Json(serde_json::json!({
        "status": "ok",
        "model": state.backend.info().id,
        "queue_depth": state.worker.queue_depth(),
    }))
    .into_response()
}

async fn metrics_handler(State(state): State<Arc<AppState>>) -> Response {
    let mut text = state
        .metrics
        .render(state.backend.cache_stats(), state.worker.queue_depth());
    metrics::render_slots(&mut text, state.backend.slot_stats().as_ref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_owned();
    ApiError::new(
        flavor_for(&path),
        StatusCode::NOT_FOUND,
        format!("no route for {} {path}", req.method()),
    )
    .into_response()
}
