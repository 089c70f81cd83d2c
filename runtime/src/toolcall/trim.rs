//! Whitespace at the edges of a streamed segment.
//!
//! Chat templates frame reasoning and text with newlines (`<think>\nR\n</think>\n\n`,
//! `C\n<minimax:tool_call>`); those are layout, not what the model meant
//! to say, and every template strips them when it renders the message back
//! (`content.strip()`, `.lstrip('\n')`). A segment's leading whitespace is
//! dropped, and trailing whitespace is held back until more text shows it
//! was inside the segment, or the segment ends and it is dropped.
//!
//! Only edges next to such markup are layout: the text of an output with
//! no reasoning or calls is the model's, whitespace and all (greedy output
//! must equal the reference's), so text starts untrimmed and what is held
//! at the very end is released ([`EdgeTrim::flush`]).

#[derive(Debug, Default)]
pub(super) struct EdgeTrim {
    /// Nothing but whitespace seen since the segment began.
    at_start: bool,
    /// Whitespace held back at the end of what was released.
    held: String,
}

impl EdgeTrim {
    /// A trimmer whose first segment's start is trimmed.
    pub fn new() -> Self {
        Self {
            at_start: true,
            held: String::new(),
        }
    }

    /// A trimmer whose first segment's start is kept.
    pub fn keeping_start() -> Self {
        Self {
            at_start: false,
            held: String::new(),
        }
    }

    /// Releases held whitespace (the output ended inside the segment).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// What of `delta` can be released now.
    pub fn push(&mut self, delta: &str) -> String {
        let delta = if self.at_start {
            delta.trim_start()
        } else {
            delta
        };
        if delta.is_empty() {
            return String::new();
        }
        self.at_start = false;
        let body = delta.trim_end();
        if body.is_empty() {
            self.held.push_str(delta);
            return String::new();
        }
        let mut out = std::mem::take(&mut self.held);
        out.push_str(body);
        self.held.push_str(&delta[body.len()..]);
        out
    }

    /// The segment ended: held whitespace is dropped and the next text
    /// starts a new segment.
    pub fn end(&mut self) {
        self.held.clear();
        self.at_start = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_go_inner_whitespace_stays_whatever_the_split() {
        let text = "\n\n  Hello,\n\n world  \n\n";
        for n in 1..=4 {
            let mut t = EdgeTrim::new();
            let mut out = String::new();
            let chars: Vec<char> = text.chars().collect();
            for c in chars.chunks(n) {
                out.push_str(&t.push(&c.iter().collect::<String>()));
            }
            t.end();
            assert_eq!(out, "Hello,\n\n world", "chunk {n}");
            assert_eq!(t.push(" again "), "again");
        }
    }
}
