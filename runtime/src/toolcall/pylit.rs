//! Python literals read as JSON.
//!
//! Templates that write a non-string parameter with `| string` (Qwen3-Coder)
//! render an object argument the way the template engine prints a dict:
//! jinja2 as Python's `repr` (`{'a': True, 'b': None}`), minijinja with
//! double quotes but still `True`. The model learns that spelling and
//! writes it back, so a value that is not JSON is also tried as a Python
//! literal (vLLM's Qwen3-Coder parser does the same with `ast.literal_eval`).

use serde_json::Value as Json;

/// `raw` as JSON, or as a Python literal of JSON-like data; `None` if it
/// is neither.
pub(super) fn parse_loose(raw: &str) -> Option<Json> {
    let raw = raw.trim();
    if let Ok(v) = serde_json::from_str(raw) {
        return Some(v);
    }
    serde_json::from_str(&python_to_json(raw)?).ok()
}

/// Rewrites Python literal syntax into JSON text: quoted strings become
/// JSON strings, `True`/`False`/`None` JSON's words; everything else is
/// copied. `None` on an unterminated string.
fn python_to_json(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let mut text = String::new();
                loop {
                    match chars.next()? {
                        ch if ch == c => break,
                        '\\' => match chars.next()? {
                            'n' => text.push('\n'),
                            't' => text.push('\t'),
                            'r' => text.push('\r'),
                            other => text.push(other),
                        },
                        ch => text.push(ch),
                    }
                }
                out.push_str(&Json::String(text).to_string());
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_alphanumeric() || n == '_' {
                        word.push(n);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(match word.as_str() {
                    "True" => "true",
                    "False" => "false",
                    "None" => "null",
                    w => w,
                });
            }
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_reprs_and_json_both_parse() {
        let want = json!({"a": "it's", "b": [1, 2.5], "c": true, "d": null, "e": "x\"y"});
        for text in [
            r#"{"a": "it's", "b": [1, 2.5], "c": true, "d": null, "e": "x\"y"}"#,
            r#"{'a': "it's", 'b': [1, 2.5], 'c': True, 'd': None, 'e': 'x"y'}"#,
            r#"{"a": "it's", "b": [1, 2.5], "c": True, "d": None, "e": "x\"y"}"#,
        ] {
            assert_eq!(parse_loose(text), Some(want.clone()), "{text}");
        }
        assert_eq!(parse_loose("not json"), None);
        assert_eq!(parse_loose("{'open"), None);
    }
}
