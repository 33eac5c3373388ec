//! gpt-oss's harmony response format: a completion is a sequence of
//! messages, each `<|channel|>NAME<|message|>TEXT` closed by `<|end|>` (then
//! `<|start|>assistant` opens the next) or by `<|return|>` / `<|call|>`.
//! Chat completions return the `final` channel as `content` and the others
//! (`analysis`: the model's reasoning; `commentary`) as `reasoning_content`,
//! as vLLM and llama.cpp's server do. The router here is pure: it tells, token
//! by token, where each generated token belongs; the markup itself is never
//! shown.

use moe_model::TextCodec;
use moe_types::TokenId;

/// The ids of the harmony markup tokens, when the tokenizer has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HarmonyTokens {
    start: TokenId,
    end: TokenId,
    message: TokenId,
    channel: TokenId,
    /// `<|return|>`, `<|call|>`, `<|constrain|>` where present.
    others: [Option<TokenId>; 3],
}

impl HarmonyTokens {
    /// The markup of `codec`'s vocabulary; `None` unless it has all of
    /// `<|start|>`, `<|end|>`, `<|message|>` and `<|channel|>`.
    pub fn from_codec(codec: &TextCodec) -> Option<Self> {
        Some(Self {
            start: codec.token_id("<|start|>")?,
            end: codec.token_id("<|end|>")?,
            message: codec.token_id("<|message|>")?,
            channel: codec.token_id("<|channel|>")?,
            others: ["<|return|>", "<|call|>", "<|constrain|>"].map(|t| codec.token_id(t)),
        })
    }

    fn is_markup(&self, id: TokenId) -> bool {
        [self.start, self.end, self.message, self.channel].contains(&id) || self.others.contains(&Some(id))
    }
}

/// Where a generated token belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The answer (`final` channel, or text outside any markup).
    Content,
    /// Any other channel's text.
    Reasoning,
    /// Markup, a role or a channel name: not shown.
    Markup,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Inside a message's text.
    Body(Route),
    /// Between `<|start|>` or `<|channel|>` and `<|message|>`: the role, the
    /// channel name (its tokens collected here) and any constraint.
    Header { channel: Option<Vec<TokenId>> },
}

/// Follows one choice's generated tokens through the harmony markup.
#[derive(Clone, Debug)]
pub struct HarmonyRouter {
    tokens: HarmonyTokens,
    state: State,
}

impl HarmonyRouter {
    /// A router at the start of a completion (text before any markup is content).
    pub fn new(tokens: HarmonyTokens) -> Self {
        Self { tokens, state: State::Body(Route::Content) }
    }

    /// Where token `id` belongs (`codec` decodes channel names).
    pub fn push(&mut self, codec: &TextCodec, id: TokenId) -> Route {
        let t = self.tokens;
        if id == t.channel {
            self.state = State::Header { channel: Some(Vec::new()) };
            return Route::Markup;
        }
        if id == t.message {
            let route = match &self.state {
                State::Header { channel: Some(name) } => {
                    let name = codec.decode(name, true).unwrap_or_default();
                    // "final", or "final <|constrain|>json"
                    if name.split_whitespace().next() == Some("final") {
                        Route::Content
                    } else {
                        Route::Reasoning
                    }
                }
                _ => Route::Content,
            };
            self.state = State::Body(route);
            return Route::Markup;
        }
        if id == t.start || id == t.end {
            self.state = State::Header { channel: None };
            return Route::Markup;
        }
        if t.is_markup(id) {
            return Route::Markup;
        }
        match &mut self.state {
            State::Body(route) => *route,
            State::Header { channel: Some(name) } => {
                name.push(id);
                Route::Markup
            }
            // the role after <|start|>
            State::Header { channel: None } => Route::Markup,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A byte-level tokenizer with the harmony markup as special tokens.
    fn codec() -> TextCodec {
        let mut vocab = serde_json::Map::new();
        for b in 0u8..=255 {
            let c = if b.is_ascii_alphanumeric() || b" .,!?'".contains(&b) {
                (b as char).to_string()
            } else {
                format!("<0x{b:02X}>")
            };
            vocab.insert(c, serde_json::json!(b as u32));
        }
        let specials =
            ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>"];
        let added: Vec<_> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "Split", "pattern": {"String": ""}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<0x00>"}
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        TextCodec::from_tokenizer_file(Path::new(&path)).unwrap()
    }

    /// Routes `text` token by token; returns (content, reasoning).
    fn route(codec: &TextCodec, text: &str) -> (String, String) {
        let mut r = HarmonyRouter::new(HarmonyTokens::from_codec(codec).expect("harmony tokens"));
        let (mut content, mut reasoning) = (Vec::new(), Vec::new());
        for id in codec.encode(text, false).unwrap() {
            match r.push(codec, id) {
                Route::Content => content.push(id),
                Route::Reasoning => reasoning.push(id),
                Route::Markup => {}
            }
        }
        (codec.decode(&content, false).unwrap(), codec.decode(&reasoning, false).unwrap())
    }

    #[test]
    fn analysis_is_reasoning_and_final_is_content() {
        let c = codec();
        let out = "<|channel|>analysis<|message|>Two plus two.<|end|><|start|>assistant<|channel|>final<|message|>It is 4.<|return|>";
        assert_eq!(route(&c, out), ("It is 4.".to_string(), "Two plus two.".to_string()));
        // a constrained final channel and a commentary preamble
        let out = "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>final <|constrain|>json<|message|>ok<|return|>";
        assert_eq!(route(&c, out), ("ok".to_string(), "Checking.".to_string()));
        // no markup at all: everything is content; an unfinished analysis stays reasoning
        assert_eq!(route(&c, "plain text"), ("plain text".to_string(), String::new()));
        assert_eq!(route(&c, "<|channel|>analysis<|message|>thinking"), (String::new(), "thinking".to_string()));
    }

    #[test]
    fn a_vocabulary_without_the_markup_is_not_harmony() {
        let codec = TextCodec::from_tokenizer_file(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-shakespeare-moe/tokenizer.json"),
        )
        .unwrap();
        assert!(HarmonyTokens::from_codec(&codec).is_none());
    }
}
