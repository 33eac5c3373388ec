//! Turning a choice's tokens into text deltas: incremental detokenization,
//! then stop strings, which may span several tokens and are never returned.
//! Text that could still become a stop string is held back until it cannot.

use moe_model::{IncrementalDecoder, TextCodec};
use moe_types::TokenId;

/// Text of one choice as it is generated.
pub struct TextAssembler {
    decoder: IncrementalDecoder,
    stop: Vec<String>,
    max_stop: usize,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl TextAssembler {
    /// Watches for `stop` strings.
    pub fn new(stop: Vec<String>) -> Self {
        let max_stop = stop.iter().map(String::len).max().unwrap_or(0);
        Self { decoder: IncrementalDecoder::new(), stop, max_stop, text: String::new(), emitted: 0, stopped: false }
    }

    /// Adds a token; returns the text that may be shown now. After a stop
    /// string matched, [`stopped`](Self::stopped) is true and the text ends
    /// just before it.
    pub fn push(&mut self, codec: &TextCodec, id: TokenId) -> moe_model::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let delta = self.decoder.push(codec, id)?;
        Ok(self.accept(&delta))
    }

    /// The rest of the text at the end of generation.
    pub fn finish(&mut self, codec: &TextCodec) -> moe_model::Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let delta = self.decoder.finish(codec)?;
        let mut out = self.accept(&delta);
        if !self.stopped {
            out.push_str(&self.text[self.emitted..]);
            self.emitted = self.text.len();
        }
        Ok(out)
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    fn accept(&mut self, delta: &str) -> String {
        if delta.is_empty() {
            return String::new();
        }
        let from = floor_char(&self.text, self.emitted.saturating_sub(self.max_stop));
        self.text.push_str(delta);
        if !self.stop.is_empty() {
            let hit = self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p)).min();
            if let Some(p) = hit {
                let out = self.text[self.emitted.min(p)..p].to_string();
                self.text.truncate(p);
                self.emitted = p;
                self.stopped = true;
                return out;
            }
        }
        // hold back the longest tail that is a prefix of some stop string
        let mut keep = self.text.len();
        for s in &self.stop {
            for l in (1..s.len()).rev() {
                if s.is_char_boundary(l) && l <= self.text.len() - self.emitted && self.text.ends_with(&s[..l]) {
                    keep = keep.min(self.text.len() - l);
                    break;
                }
            }
        }
        let out = self.text[self.emitted..keep].to_string();
        self.emitted = keep;
        out
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
