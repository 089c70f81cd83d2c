//! Chat templates: the model's own Jinja template, rendered like transformers.
//!
//! A chat model only behaves if its prompt is laid out exactly as in
//! training, and the layout lives in the checkpoint as a Jinja template
//! (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`).
//! transformers renders it with jinja2 plus a few extensions; we use
//! minijinja configured to match:
//!
//! * `trim_blocks` + `lstrip_blocks` and loop controls, as transformers sets;
//! * Python string/dict methods (`.strip()`, `.startswith()`, `.items()`...)
//!   through minijinja-contrib's `pycompat` callback;
//! * `raise_exception(msg)`, `strftime_now(fmt)`;
//! * a `tojson` that writes what Python's `json.dumps(ensure_ascii=False)`
//!   writes (`", "`/`": "` separators, key order kept, no HTML escaping) --
//!   minijinja's own escapes `<`, `>`, `&`, `'` for HTML, which would change
//!   the tool list the model sees.
//!
//! Messages, tools and tool calls are plain JSON values, passed through as-is,
//! so everything an OpenAI/Anthropic request carries (tool calls, tool
//! results, `reasoning_content`...) reaches the template. Templates expect
//! tool-call `arguments` as an object (HF convention); callers holding the
//! OpenAI string form should parse it first ([`normalize_tool_call_arguments`]).

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: invalid JSON: {source}")]
    Json {
        origin: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{origin}: field `{field}`: {msg}")]
    BadField {
        origin: String,
        field: String,
        msg: String,
    },
    #[error("chat template from {origin} does not compile: {detail}")]
    Syntax { origin: String, detail: String },
    #[error("chat template from {origin}: {bytes} bytes, more than the {max} a template may have (real ones are under 100 KB)")]
    TooLarge {
        origin: String,
        bytes: u64,
        max: u64,
    },
    #[error("chat template from {origin} failed to render: {detail}")]
    Render { origin: String, detail: String },
}

/// Extra inputs to a render besides the messages.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Tool definitions (OpenAI `tools` array entries), passed as `tools`.
    pub tools: Option<Vec<Json>>,
    /// Append the assistant header so the model answers next.
    pub add_generation_prompt: bool,
    /// More template variables, e.g. `enable_thinking: false` for Qwen3.
    pub extra: serde_json::Map<String, Json>,
}

/// A compiled chat template with the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The source, kept for format detection (minijinja's copy is only
    /// reachable through a borrow of a looked-up template).
    source: String,
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat";

/// The largest chat template accepted: the biggest on the hub are tens of
/// KB, and compiling one costs many times its size (a 100 MB template
/// OOM-killed `run --chat`, issue 16), so a larger one is refused before it
/// is read or compiled.
pub const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

impl ChatTemplate {
    /// Loads the template of a Hugging Face model directory: the
    /// `chat_template.jinja` file if present (newer checkpoints), else
    /// `tokenizer_config.json`'s `chat_template`. `Ok(None)` when the model
    /// has no template (a base model).
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let read_opt = |name: &str| -> Result<Option<(String, PathBuf)>, ChatTemplateError> {
            let path = dir.join(name);
            if name.ends_with(".jinja") {
                if let Ok(m) = std::fs::metadata(&path) {
                    if m.len() > MAX_TEMPLATE_BYTES {
                        return Err(ChatTemplateError::TooLarge {
                            origin: path.display().to_string(),
                            bytes: m.len(),
                            max: MAX_TEMPLATE_BYTES,
                        });
                    }
                }
            }
            match std::fs::read_to_string(&path) {
                Ok(s) => Ok(Some((s, path))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(ChatTemplateError::Io { path, source }),
            }
        };
        let config = read_opt("tokenizer_config.json")?;
        let jinja = read_opt("chat_template.jinja")?;
        Self::from_sources(
            config
                .as_ref()
                .map(|(s, p)| (s.as_str(), p.display().to_string())),
            jinja.map(|(s, p)| (s, p.display().to_string())),
        )
    }

    /// Builds the template from the raw file contents (as a pack embeds
    /// them): `tokenizer_config` is `(json text, origin for messages)`,
    /// `jinja` is `(chat_template.jinja text, origin)` and wins if present.
    pub fn from_sources(
        tokenizer_config: Option<(&str, String)>,
        jinja: Option<(String, String)>,
    ) -> Result<Option<Self>, ChatTemplateError> {
        let config: Option<(Json, String)> = match tokenizer_config {
            Some((text, origin)) => {
                let v = serde_json::from_str(text).map_err(|source| ChatTemplateError::Json {
                    origin: origin.clone(),
                    source,
                })?;
                Some((v, origin))
            }
            None => None,
        };
        let (bos, eos) = match &config {
            Some((v, origin)) => (
                special_token(v, "bos_token", origin)?,
                special_token(v, "eos_token", origin)?,
            ),
            None => (None, None),
        };
        if let Some((source, origin)) = jinja {
            return Self::new(source, origin, bos, eos).map(Some);
        }
        let Some((v, origin)) = config else {
            return Ok(None);
        };
        match template_from_config(&v, &origin)? {
            Some(source) => {
                Self::new(source, format!("{origin} (chat_template)"), bos, eos).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Instructions one render may run. Real templates render a long agent
    /// history with dozens of tools in well under a million.
    pub const RENDER_FUEL: u64 = 50_000_000;

    /// Compiles a template source. `origin` names it in error messages.
    pub fn new(
        source: String,
        origin: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatTemplateError> {
        if source.len() as u64 > MAX_TEMPLATE_BYTES {
            return Err(ChatTemplateError::TooLarge {
                origin,
                bytes: source.len() as u64,
                max: MAX_TEMPLATE_BYTES,
            });
        }
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // A template is code from the checkpoint: bound the instructions one
        // render may run, so nested loops cannot stall the server's worker
        // or `mfx run --chat` for hours (found by the chat_template fuzzer).
        env.set_fuel(Some(Self::RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson_filter);
        // DeepSeek-V3.2's template parses string arguments with it (a
        // filter of llama.cpp's minja, not of jinja2).
        env.add_filter("from_json", from_json_filter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_test("iterable", is_iterable);
        let kept = source.clone();
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| ChatTemplateError::Syntax {
                origin: origin.clone(),
                detail: describe(&e),
            })?;
        Ok(Self {
            env,
            source: kept,
            origin,
            bos_token,
            eos_token,
        })
    }

    /// The template's source text (what [`crate::toolcall::ChatFormat::detect`]
    /// reads the model's output format from).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders `messages` (each a JSON object with at least `role`) into the
    /// prompt text. Encode the result with `add_special_tokens = false`: the
    /// template already writes any BOS.
    pub fn render(
        &self,
        messages: &[Json],
        opts: &RenderOptions,
    ) -> Result<String, ChatTemplateError> {
        let render_err = |detail: String| ChatTemplateError::Render {
            origin: self.origin.clone(),
            detail,
        };
        for (i, m) in messages.iter().enumerate() {
            if !m.get("role").is_some_and(Json::is_string) {
                return Err(render_err(format!("message {i} has no string `role`")));
            }
        }
        // Same variables as transformers' render_jinja_template: missing
        // tools are `none`, special tokens by name, then caller kwargs.
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        ctx.insert(
            "tools".into(),
            opts.tools.clone().map_or(Json::Null, Json::Array),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(opts.add_generation_prompt),
        );
        ctx.insert(
            "bos_token".into(),
            self.bos_token.clone().map_or(Json::Null, Json::String),
        );
        ctx.insert(
            "eos_token".into(),
            self.eos_token.clone().map_or(Json::Null, Json::String),
        );
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| render_err(describe(&e)))?;
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| render_err(describe(&e)))
    }
}

/// A `{role, content}` message.
pub fn message(role: &str, content: &str) -> Json {
    serde_json::json!({ "role": role, "content": content })
}

/// Turns OpenAI-style tool-call `arguments` strings into JSON objects in
/// place (templates iterate them as mappings); a string that is not JSON is
/// left alone, as transformers would.
pub fn normalize_tool_call_arguments(messages: &mut [Json]) {
    for m in messages {
        let Some(calls) = m.get_mut("tool_calls").and_then(Json::as_array_mut) else {
            continue;
        };
        for call in calls {
            let target = match call.get_mut("function") {
                Some(f) => f,
                None => call,
            };
            if let Some(Json::String(s)) = target.get("arguments") {
                if let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(s) {
                    target["arguments"] = parsed;
                }
            }
        }
    }
}

/// Puts the reasoning of earlier assistant turns where `template_source`
/// reads it. OpenAI-style requests carry it as `reasoning_content` (as do
/// Qwen3, GLM, MiniMax and DeepSeek templates); gpt-oss's template reads
/// `thinking`, and there an assistant turn with tool calls may not have
/// both `content` and `thinking` (its content *is* the analysis), so the
/// two are joined into `thinking`.
pub fn adapt_reasoning_field(messages: &mut [Json], template_source: &str) {
    // A template variable named `thinking` (DeepSeek's switch) is not the
    // message field.
    let reads_thinking = [
        "message.thinking",
        "message['thinking']",
        "message[\"thinking\"]",
    ]
    .iter()
    .any(|f| template_source.contains(f));
    if template_source.contains("reasoning_content") || !reads_thinking {
        return;
    }
    for m in messages {
        let Some(obj) = m.as_object_mut() else {
            continue;
        };
        let Some(Json::String(r)) = obj.remove("reasoning_content") else {
            continue;
        };
        if r.is_empty() {
            continue;
        }
        let content = obj.get("content").and_then(Json::as_str).unwrap_or("");
        let has_calls = obj
            .get("tool_calls")
            .and_then(Json::as_array)
            .is_some_and(|c| !c.is_empty());
        if has_calls && !content.is_empty() {
            let joined = format!("{r}\n\n{content}");
            obj.insert("content".into(), Json::String(String::new()));
            obj.insert("thinking".into(), Json::String(joined));
        } else {
            obj.insert("thinking".into(), Json::String(r));
        }
    }
}

/// `bos_token`/`eos_token` are a string, an AddedToken object with
/// `content`, or null.
fn special_token(
    config: &Json,
    field: &str,
    origin: &str,
) -> Result<Option<String>, ChatTemplateError> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(ChatTemplateError::BadField {
                origin: origin.into(),
                field: field.into(),
                msg: "expected a string or an object with a string `content`".into(),
            }),
        },
        Some(_) => Err(ChatTemplateError::BadField {
            origin: origin.into(),
            field: field.into(),
            msg: "expected a string or an object with a string `content`".into(),
        }),
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which we
/// take `default` (transformers' rule when no template name is asked for).
fn template_from_config(config: &Json, origin: &str) -> Result<Option<String>, ChatTemplateError> {
    let bad = |msg: &str| ChatTemplateError::BadField {
        origin: origin.into(),
        field: "chat_template".into(),
        msg: msg.into(),
    };
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            for item in list {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_owned())),
                    (Some(_), Some(_)) => {}
                    _ => {
                        return Err(bad(
                            "list entries must be objects with string `name` and `template`",
                        ))
                    }
                }
            }
            Err(bad("list has no entry named `default`"))
        }
        Some(_) => Err(bad("expected a string or a list of {name, template}")),
    }
}

/// A minijinja error with its causes and the template line, on one line.
fn describe(e: &JinjaError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

fn from_json_filter(s: String) -> Result<Value, JinjaError> {
    let v: Json = serde_json::from_str(&s).map_err(|e| {
        JinjaError::new(ErrorKind::InvalidOperation, "from_json: not JSON").with_source(e)
    })?;
    Ok(Value::from_serialize(&v))
}

fn raise_exception(msg: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(
        ErrorKind::InvalidOperation,
        format!("template raised: {msg}"),
    ))
}

/// HF's `tojson(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, i.e. Python's `json.dumps` with those arguments.
/// jinja2's `iterable` test (Python's `iter(v)` succeeds): strings,
/// sequences, mappings and jinja2's Undefined (which iterates as empty), but
/// not `none`, numbers or booleans. minijinja's own test also says
/// yes to `none` (it iterates as empty), so Qwen3-Coder's
/// `tools is iterable and tools | length > 0` failed on the `none` that a
/// request without tools renders with ("cannot calculate length").
fn is_iterable(value: &Value) -> bool {
    !matches!(
        value.kind(),
        ValueKind::None | ValueKind::Bool | ValueKind::Number
    ) && (value.is_undefined() || value.try_iter().is_ok())
}

fn tojson_filter(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, JinjaError> {
    let indent: Option<Value> = match indent {
        Some(v) => Some(v),
        None => kwargs.get("indent")?,
    };
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(usize::try_from(v.clone()).map_err(|_| {
            JinjaError::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be an integer",
            )
        })?),
    };
    let ensure_ascii: bool = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let sort_keys: bool = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        // Python's default: ", " inline, "," when indenting.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let json = serde_json::to_value(value).map_err(|e| {
        JinjaError::new(ErrorKind::InvalidOperation, "tojson: cannot serialize").with_source(e)
    })?;
    let mut out = String::new();
    let style = PyJson {
        indent,
        item_sep: &item_sep,
        key_sep: &key_sep,
        ensure_ascii,
        sort_keys,
    };
    style.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

/// Python `json.dumps` formatting over a serde_json value.
struct PyJson<'a> {
    indent: Option<usize>,
    item_sep: &'a str,
    key_sep: &'a str,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson<'_> {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }

    fn write(&self, v: &Json, depth: usize, out: &mut String) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => out.push_str(&n.to_string()),
            Json::String(s) => self.write_str(s, out),
            Json::Array(a) if a.is_empty() => out.push_str("[]"),
            Json::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write(x, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            Json::Object(o) if o.is_empty() => out.push_str("{}"),
            Json::Object(o) => {
                let mut entries: Vec<(&String, &Json)> = o.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write_str(k, out);
                    out.push_str(self.key_sep);
                    self.write(x, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// `strftime_now(fmt)`: transformers passes local time; we have no time-zone
/// database, so this is UTC. Supports the directives chat templates use.
fn strftime_now(fmt: String) -> Result<Value, JinjaError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| JinjaError::new(ErrorKind::InvalidOperation, "system clock is before 1970"))?
        .as_secs() as i64;
    Ok(Value::from(format_utc(secs, &fmt)))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats a Unix time (UTC) with a strftime subset; unknown directives are
/// copied through, as glibc does.
fn format_utc(unix: i64, fmt: &str) -> String {
    let days = unix.div_euclid(86_400);
    let sod = unix.rem_euclid(86_400);
    let (h, mi, s) = (sod / 3600, sod % 3600 / 60, sod % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = doy_mar - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let wday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('-') => match it.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('I') => out.push_str(&format!("{:02}", if h % 12 == 0 { 12 } else { h % 12 })),
            Some('p') => out.push_str(if h < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mi:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(DAYS[wday]),
            Some('a') => out.push_str(&DAYS[wday][..3]),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/templates")
            .join(name)
    }

    fn shared_model(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/models")
            .join(name)
    }

    fn conversation() -> (Vec<Json>, Vec<Json>) {
        let text = std::fs::read_to_string(data("conversation.json")).expect("conversation.json");
        let v: Json = serde_json::from_str(&text).expect("json");
        (
            v["messages"].as_array().expect("messages").clone(),
            v["tools"].as_array().expect("tools").clone(),
        )
    }

    fn template_file(name: &str) -> ChatTemplate {
        let src = std::fs::read_to_string(data(name)).expect("template");
        ChatTemplate::new(src, name.into(), None, Some("<|im_end|>".into())).expect("compiles")
    }

    fn expected(name: &str) -> String {
        std::fs::read_to_string(data(name)).expect("expected output")
    }

    /// A template with nested loops of 10^10 iterations must fail within its
    /// fuel, not render for hours (the chat_template fuzzer's finding).
    #[test]
    fn runaway_template_runs_out_of_fuel() {
        let src =
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let t =
            ChatTemplate::new(src.into(), "hostile.jinja".into(), None, None).expect("compiles");
        let msgs = vec![serde_json::json!({"role": "user", "content": "hi"})];
        let err = t
            .render(&msgs, &RenderOptions::default())
            .expect_err("must run out of fuel");
        let msg = err.to_string();
        assert!(
            msg.contains("hostile.jinja"),
            "error names the template: {msg}"
        );
        // And the real templates render well within the fuel.
        let (messages, tools) = conversation();
        let opts = RenderOptions {
            tools: Some(tools),
            add_generation_prompt: true,
            ..Default::default()
        };
        template_file("qwen3-coder.jinja")
            .render(&messages, &opts)
            .expect("real template renders");
    }

    /// The expected files were rendered by transformers itself
    /// (tests/data/templates/render_reference.py).
    #[test]
    fn qwen3_with_tools_matches_transformers() {
        let (messages, tools) = conversation();
        let t = template_file("qwen3.jinja");
        let opts = RenderOptions {
            tools: Some(tools),
            add_generation_prompt: true,
            ..Default::default()
        };
        let got = t.render(&messages, &opts).expect("render");
        assert_eq!(got, expected("qwen3.tools.expected.txt"));
        // Structure, so a failure says what broke.
        assert!(got.starts_with("<|im_start|>system\nYou are a terse assistant.\n\n# Tools"));
        assert!(got.contains(r#"{"type": "function", "function": {"name": "get_weather""#));
        assert!(
            got.contains("<b>metric</b> units & ignores 'quotes'"),
            "tojson must not HTML-escape"
        );
        assert!(got.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"unit\": \"celsius\"}}\n</tool_call>"));
        assert!(got.contains("<|im_start|>user\n<tool_response>\n{\"temp\": 21, \"sky\": \"clear\"}\n</tool_response><|im_end|>"));
        assert!(got.ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn qwen3_enable_thinking_false_matches_transformers() {
        let (messages, _) = conversation();
        let t = template_file("qwen3.jinja");
        let mut extra = serde_json::Map::new();
        extra.insert("enable_thinking".into(), Json::Bool(false));
        let opts = RenderOptions {
            add_generation_prompt: true,
            extra,
            ..Default::default()
        };
        let got = t.render(&messages, &opts).expect("render");
        assert_eq!(got, expected("qwen3.no_thinking.expected.txt"));
        assert!(got.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    }

    #[test]
    fn qwen3_coder_with_tools_matches_transformers() {
        let (messages, tools) = conversation();
        let t = template_file("qwen3-coder.jinja");
        let opts = RenderOptions {
            tools: Some(tools),
            add_generation_prompt: true,
            ..Default::default()
        };
        let got = t.render(&messages, &opts).expect("render");
        assert_eq!(got, expected("qwen3-coder.tools.expected.txt"));
        assert!(got.contains(
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich\n</parameter>\n"
        ));
        assert!(got.contains("<required>[`city`]</required>"));
        assert!(got.contains("<|im_start|>user\n<tool_response>\n{\"temp\": 21, \"sky\": \"clear\"}\n</tool_response>\n<|im_end|>"));
    }

    /// Without tools the Qwen3-Coder template tests `tools is iterable` on
    /// `none`; jinja2 says no, and so must we (transformers' rendering).
    #[test]
    fn qwen3_coder_without_tools_matches_transformers() {
        let (messages, _) = conversation();
        let t = template_file("qwen3-coder.jinja");
        let opts = RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        let got = t.render(&messages, &opts).expect("render");
        assert_eq!(got, expected("qwen3-coder.no_tools.expected.txt"));
    }

    #[test]
    fn iterable_test_follows_python() {
        let t = ChatTemplate::new(
            "{% for v in [none, 1, true, 'ab', [1], {'a': 1}, undefined_name] %}{{ v is iterable }},{% endfor %}".into(),
            "test".into(),
            None,
            None,
        )
        .expect("template");
        let got = t.render(&[], &RenderOptions::default()).expect("render");
        // Exactly what jinja2 3.1 prints for the same template.
        assert_eq!(got, "False,False,False,True,True,True,True,");
    }

    #[test]
    fn shared_models_templates_render_chatml() {
        for model in ["tiny-qwen3-moe-coder", "tiny-qwen3-moe-coder-mlx-4bit"] {
            let t = ChatTemplate::from_model_dir(&shared_model(model))
                .expect("load")
                .expect("has a template");
            assert_eq!(t.eos_token(), Some("<|im_end|>"));
            assert_eq!(t.bos_token(), None);
            let msgs = [
                message("system", "Be brief."),
                message("user", "Hi"),
                message("assistant", "Hello."),
                message("user", "Bye"),
            ];
            let opts = RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            };
            assert_eq!(
                t.render(&msgs, &opts).expect("render"),
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
            );
        }
        // The reference "chat" prompt is exactly this template's output.
        let r: Json = serde_json::from_str(
            &std::fs::read_to_string(shared_model(
                "tiny-qwen3-moe-coder/reference/reference.json",
            ))
            .expect("ref"),
        )
        .expect("json");
        let text = r["prompts"]["chat"]["text"].as_str().expect("text");
        let user = text
            .strip_prefix("<|im_start|>user\n")
            .and_then(|s| s.split("<|im_end|>").next())
            .expect("user turn");
        let t = ChatTemplate::from_model_dir(&shared_model("tiny-qwen3-moe-coder"))
            .expect("load")
            .expect("template");
        let opts = RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        assert_eq!(
            t.render(&[message("user", user)], &opts).expect("render"),
            text
        );
    }

    #[test]
    fn template_sources_and_errors() {
        // List form picks "default"; AddedToken objects give their content.
        let cfg = r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D{{ messages|length }}"}]}"#;
        let t = ChatTemplate::from_sources(Some((cfg, "cfg".into())), None)
            .expect("ok")
            .expect("some");
        assert_eq!(
            t.render(&[message("user", "x")], &RenderOptions::default())
                .expect("render"),
            "<s>D1"
        );
        // chat_template.jinja wins over the config.
        let t = ChatTemplate::from_sources(
            Some((cfg, "cfg".into())),
            Some(("J{{ eos_token }}".into(), "file".into())),
        )
        .expect("ok")
        .expect("some");
        assert_eq!(
            t.render(&[], &RenderOptions::default()).expect("render"),
            "J</s>"
        );
        // No template at all.
        assert!(ChatTemplate::from_sources(Some(("{}", "cfg".into())), None)
            .expect("ok")
            .is_none());
        assert!(ChatTemplate::from_model_dir(Path::new("/nonexistent"))
            .expect("ok")
            .is_none());
        // Bad inputs name the origin and the field.
        let e =
            ChatTemplate::from_sources(Some(("{\"chat_template\": 3}", "tc.json".into())), None)
                .expect_err("bad");
        assert!(
            e.to_string().contains("tc.json") && e.to_string().contains("chat_template"),
            "{e}"
        );
        let e = ChatTemplate::from_sources(
            Some((
                "{\"chat_template\": [{\"name\": \"x\", \"template\": \"y\"}]}",
                "tc".into(),
            )),
            None,
        )
        .expect_err("no default");
        assert!(e.to_string().contains("default"), "{e}");
        let e = ChatTemplate::from_sources(Some(("not json", "tc.json".into())), None)
            .expect_err("bad json");
        assert!(e.to_string().contains("tc.json"), "{e}");
        let e = ChatTemplate::new("{% for %}".into(), "broken.jinja".into(), None, None)
            .expect_err("syntax");
        assert!(e.to_string().contains("broken.jinja"), "{e}");
        // raise_exception surfaces the template's message.
        let t = ChatTemplate::new(
            "{{ raise_exception('only user/assistant roles') }}".into(),
            "t".into(),
            None,
            None,
        )
        .expect("ok");
        let e = t
            .render(&[], &RenderOptions::default())
            .expect_err("raises");
        assert!(e.to_string().contains("only user/assistant roles"), "{e}");
        let e = t
            .render(
                &[serde_json::json!({"content": "x"})],
                &RenderOptions::default(),
            )
            .expect_err("no role");
        assert!(e.to_string().contains("role"), "{e}");
    }

    #[test]
    fn python_compat_methods_and_loop_controls() {
        let src = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
                   [{{ m.content.strip().upper() }}|{{ m.content.startswith(' a') }}|{{ m.content.split(',')|length }}]\
                   {% endfor %}{% for k, v in extra.items() %}{{ k }}={{ v }};{% endfor %}";
        let t = ChatTemplate::new(src.into(), "t".into(), None, None).expect("ok");
        let mut extra = serde_json::Map::new();
        extra.insert("extra".into(), serde_json::json!({"z": 1, "a": 2}));
        let msgs = [
            message("user", " a,b "),
            message("user", "c"),
            message("user", "never"),
        ];
        let got = t
            .render(
                &msgs,
                &RenderOptions {
                    extra,
                    ..Default::default()
                },
            )
            .expect("render");
        // Booleans print as Python does.
        assert_eq!(got, "[A,B|True|2][C|False|1]z=1;a=2;");
    }

    #[test]
    fn tojson_is_pythons_json_dumps() {
        let t = ChatTemplate::new(
            "{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ x|tojson(sort_keys=true, separators=[',', ':']) }}|{{ s|tojson(ensure_ascii=true) }}".into(),
            "t".into(),
            None,
            None,
        )
        .expect("ok");
        let mut extra = serde_json::Map::new();
        extra.insert(
            "x".into(),
            serde_json::json!({"b": [1, "<&>"], "a": {}, "c": null}),
        );
        extra.insert("s".into(), Json::String("é\n🦀".into()));
        let got = t
            .render(
                &[],
                &RenderOptions {
                    extra,
                    ..Default::default()
                },
            )
            .expect("render");
        // Python: json.dumps(x), json.dumps(x, indent=2), json.dumps(x, sort_keys=True, separators=(',', ':')),
        // json.dumps("é\n🦀", ensure_ascii=True)
        assert_eq!(
            got,
            "{\"b\": [1, \"<&>\"], \"a\": {}, \"c\": null}|{\n  \"b\": [\n    1,\n    \"<&>\"\n  ],\n  \"a\": {},\n  \"c\": null\n}|{\"a\":{},\"b\":[1,\"<&>\"],\"c\":null}|\"\\u00e9\\n\\ud83e\\udd80\""
        );
    }

    #[test]
    fn tool_call_arguments_are_parsed_from_openai_strings() {
        let mut msgs = vec![serde_json::json!({"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"type": "function", "function": {"name": "g", "arguments": "not json"}}
        ]})];
        normalize_tool_call_arguments(&mut msgs);
        assert_eq!(
            msgs[0]["tool_calls"][0]["function"]["arguments"],
            serde_json::json!({"x": 1})
        );
        assert_eq!(
            msgs[0]["tool_calls"][1]["function"]["arguments"],
            Json::String("not json".into())
        );
    }

    #[test]
    fn strftime_subset() {
        // 2024-02-29T13:05:09Z, a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(format_utc(t, "%Y-%m-%d %H:%M:%S"), "2024-02-29 13:05:09");
        assert_eq!(
            format_utc(t, "%d %b %Y, %A %a %B %j %I%p %-d/%-m %y %%"),
            "29 Feb 2024, Thursday Thu February 060 01PM 29/2 24 %"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %A"), "1970-01-01 Thursday");
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}".into(), "t".into(), None, None)
            .expect("ok");
        let year: i32 = t
            .render(&[], &RenderOptions::default())
            .expect("render")
            .parse()
            .expect("a year");
        assert!(year >= 2024);
    }
}
