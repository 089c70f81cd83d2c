//! Splitting `<think>…</think>` reasoning from the rest of an output.
//!
//! Qwen3, GLM-4.5+, MiniMax-M2 and DeepSeek-V3.1+ write their reasoning
//! in a `<think>` block before the answer. Some templates open the block
//! in the prompt (MiniMax-M2, GLM-4.7, DeepSeek in thinking mode end the
//! generation prompt with `<think>`), so the output starts inside it and
//! only `</think>` is generated: the splitter is told which.
//!
//! `<think>` opens a block only before any answer text (a model quoting
//! the tag in an answer, or in code, is not reasoning); `</think>` is the
//! only way out of one.

use super::partial_tag_len;

pub(super) const THINK_OPEN: &str = "<think>";
pub(super) const THINK_CLOSE: &str = "</think>";

#[derive(Debug, PartialEq)]
pub(super) enum Piece {
    Reasoning(String),
    /// The reasoning block closed.
    ReasoningEnd,
    Content(String),
}

#[derive(Debug)]
pub(super) struct ThinkSplitter {
    in_reasoning: bool,
    /// Answer text has been released: `<think>` is text from now on.
    answered: bool,
    buf: String,
}

impl ThinkSplitter {
    pub fn new(starts_in_reasoning: bool) -> Self {
        Self {
            in_reasoning: starts_in_reasoning,
            answered: false,
            buf: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> Vec<Piece> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        loop {
            if self.in_reasoning {
                if let Some(p) = self.buf.find(THINK_CLOSE) {
                    out.push(Piece::Reasoning(self.buf[..p].to_owned()));
                    out.push(Piece::ReasoningEnd);
                    self.buf.drain(..p + THINK_CLOSE.len());
                    self.in_reasoning = false;
                    continue;
                }
                let keep = partial_tag_len(&self.buf, THINK_CLOSE);
                let release = self.buf.len() - keep;
                out.push(Piece::Reasoning(self.buf[..release].to_owned()));
                self.buf.drain(..release);
                break;
            }
            if self.answered {
                out.push(Piece::Content(std::mem::take(&mut self.buf)));
                break;
            }
            let lead = self.buf.len() - self.buf.trim_start().len();
            let rest = &self.buf[lead..];
            if rest.starts_with(THINK_OPEN) {
                self.buf.drain(..lead + THINK_OPEN.len());
                self.in_reasoning = true;
                continue;
            }
            if rest.is_empty() || THINK_OPEN.starts_with(rest) {
                // Whitespace, or what may become `<think>`: wait.
                break;
            }
            self.answered = true;
        }
        out.retain(|p| !matches!(p, Piece::Reasoning(s) | Piece::Content(s) if s.is_empty()));
        out
    }

    /// Releases what was held back. A block the output never closed is
    /// reasoning (the model ran out of tokens while thinking).
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        if rest.is_empty() {
            return Vec::new();
        }
        if self.in_reasoning {
            vec![Piece::Reasoning(rest)]
        } else {
            vec![Piece::Content(rest)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(text: &str, start: bool, n: usize) -> (String, String) {
        let mut s = ThinkSplitter::new(start);
        let chars: Vec<char> = text.chars().collect();
        let mut pieces = Vec::new();
        for c in chars.chunks(n) {
            pieces.extend(s.push(&c.iter().collect::<String>()));
        }
        pieces.extend(s.finish());
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            match p {
                Piece::Reasoning(t) => r.push_str(&t),
                Piece::Content(t) => c.push_str(&t),
                Piece::ReasoningEnd => {}
            }
        }
        (r, c)
    }

    #[test]
    fn splits_whatever_the_chunking() {
        for n in 1..=5 {
            assert_eq!(
                run(
                    "<think>\nhmm <b>\n</think>\n\nAnswer <think>x</think>",
                    false,
                    n
                ),
                ("\nhmm <b>\n".into(), "\n\nAnswer <think>x</think>".into())
            );
            // The prompt opened the block.
            assert_eq!(
                run("plan</think>done", true, n),
                ("plan".into(), "done".into())
            );
            // No block at all, and a lookalike that is text.
            assert_eq!(run("<thin", false, n), ("".into(), "<thin".into()));
            assert_eq!(
                run("cut off <thi", true, n),
                ("cut off <thi".into(), "".into())
            );
        }
    }
}
