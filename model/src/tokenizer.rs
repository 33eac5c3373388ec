//! The text side of a checkpoint: `tokenizer.json`, `tokenizer_config.json`
//! (special tokens, chat template) and `generation_config.json` (eos ids,
//! sampling defaults).

use crate::{ModelConfig, ModelError, Result};
use moe_types::TokenId;
use serde_json::Value;
use std::path::Path;
use tokenizers::Tokenizer;

/// `t` with special-token text encoded as text.
fn plain(t: &Tokenizer) -> Tokenizer {
    let mut p = t.clone();
    p.set_encode_special_tokens(true);
    p
}

/// The texts of `t`'s special tokens, sorted.
fn special_texts(t: &Tokenizer) -> Vec<String> {
    let mut texts: Vec<String> =
        t.get_added_tokens_decoder().into_values().filter(|a| a.special).map(|a| a.content).collect();
    texts.sort();
    texts
}

/// Sampling defaults a checkpoint ships in `generation_config.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationDefaults {
    /// Default temperature when sampling.
    pub temperature: Option<f32>,
    /// Default nucleus threshold.
    pub top_p: Option<f32>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
}

/// A codec's special-token facts, however they were read.
struct Parts {
    eos_ids: Vec<TokenId>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

/// Tokenizer plus the special-token facts needed to drive generation.
pub struct TextCodec {
    tokenizer: Tokenizer,
    /// The same tokenizer with special-token text encoded as ordinary text.
    plain: Tokenizer,
    /// The texts of its special tokens, sorted.
    specials: Vec<String>,
    eos_ids: Vec<TokenId>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
    defaults: GenerationDefaults,
}

impl TextCodec {
    /// A codec from a tokenizer built elsewhere (a GGUF file's), with `cfg`'s
    /// eos ids and the named bos/eos token texts.
    pub(crate) fn from_parts(
        tokenizer: Tokenizer,
        cfg: &ModelConfig,
        bos_token: Option<String>,
        eos_token: Option<String>,
        chat_template: Option<String>,
    ) -> Self {
        let parts = Parts { eos_ids: cfg.eos_token_ids.clone(), bos_token, eos_token, chat_template };
        Self::assemble(tokenizer, parts, GenerationDefaults::default())
    }

    /// The codec of `tokenizer`: the eos token's id joins the eos ids.
    fn assemble(tokenizer: Tokenizer, parts: Parts, defaults: GenerationDefaults) -> Self {
        let Parts { mut eos_ids, bos_token, eos_token, chat_template } = parts;
        eos_ids.extend(eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t)));
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Self {
            plain: plain(&tokenizer),
            specials: special_texts(&tokenizer),
            tokenizer,
            eos_ids,
            bos_token,
            eos_token,
            chat_template,
            defaults,
        }
    }

    /// Loads the tokenizer files of a model directory; `cfg` contributes its
    /// eos ids. `tokenizer_config.json` and `generation_config.json` are
    /// optional; `tokenizer.json` is required.
    pub fn load(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let tk_path = dir.join("tokenizer.json");
        if !tk_path.is_file() {
            return Err(ModelError::Io {
                path: tk_path,
                cause: std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            });
        }
        let tokenizer =
            Tokenizer::from_file(&tk_path).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tk_path.display())))?;
        let tk_cfg = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gen_cfg = read_json_opt(&dir.join("generation_config.json"))?;
        let token_str = |v: Option<&Value>| -> Option<String> {
            match v? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token_str(tk_cfg.as_ref().and_then(|c| c.get("bos_token")));
        let eos_token = token_str(tk_cfg.as_ref().and_then(|c| c.get("eos_token")));
        let chat_template = tk_cfg.as_ref().and_then(|c| c.get("chat_template")).and_then(|t| match t {
            Value::String(s) => Some(s.clone()),
            // a list of named templates: take "default", else the first
            Value::Array(a) => a
                .iter()
                .find(|x| x.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| a.first())
                .and_then(|x| x.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        });
        let mut eos_ids = cfg.eos_token_ids.clone();
        if let Some(g) = &gen_cfg {
            match g.get("eos_token_id") {
                Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
                Some(Value::Array(a)) => eos_ids.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32)),
                _ => {}
            }
        }
        let f = |k: &str| gen_cfg.as_ref().and_then(|g| g.get(k)).and_then(Value::as_f64);
        let defaults = GenerationDefaults {
            temperature: f("temperature").map(|x| x as f32),
            top_p: f("top_p").map(|x| x as f32),
            top_k: f("top_k").map(|x| x as usize),
            repetition_penalty: f("repetition_penalty").map(|x| x as f32),
        };
        Ok(Self::assemble(tokenizer, Parts { eos_ids, bos_token, eos_token, chat_template }, defaults))
    }

    /// Wraps a tokenizer file alone (tests, tools).
    pub fn from_tokenizer_file(path: &Path) -> Result<Self> {
        let tokenizer =
            Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self {
            plain: plain(&tokenizer),
            specials: special_texts(&tokenizer),
            tokenizer,
            eos_ids: Vec::new(),
            bos_token: None,
            eos_token: None,
            chat_template: None,
            defaults: GenerationDefaults::default(),
        })
    }

    /// Token ids of `text`, with the tokenizer's special tokens (e.g. bos)
    /// when `add_special_tokens`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>> {
        let enc = self.tokenizer.encode(text, add_special_tokens).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` read as ordinary text: the text of a special token
    /// (`</s>`, `<|im_start|>`) is encoded as its characters, never as the
    /// special token itself; nothing is added.
    pub fn encode_text(&self, text: &str) -> Result<Vec<TokenId>> {
        let enc = self.plain.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The texts of the tokenizer's special tokens (read once at load).
    pub fn special_token_texts(&self) -> &[String] {
        &self.specials
    }

    /// The id of the token whose text is exactly `text` (special tokens
    /// included), if the vocabulary has one.
    pub fn token_id(&self, text: &str) -> Option<TokenId> {
        self.tokenizer.token_to_id(text)
    }

    /// Text of `ids`, without special tokens when `skip_special_tokens`.
    pub fn decode(&self, ids: &[TokenId], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Ids that end generation.
    pub fn eos_ids(&self) -> &[TokenId] {
        &self.eos_ids
    }

    /// The bos token text, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The eos token text, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The Jinja chat template source, if the checkpoint has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Sampling defaults from `generation_config.json`.
    pub fn defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|cause| ModelError::Io { path: path.into(), cause })?;
    serde_json::from_str(&text).map(Some).map_err(|e| ModelError::Config { path: path.into(), message: e.to_string() })
}

/// Turns a stream of token ids into text deltas, holding back bytes that do
/// not yet form whole characters and letting context-dependent decoders
/// (e.g. leading-space rules) see the previous tokens.
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<TokenId>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder with no tokens yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, codec: &TextCodec, id: TokenId) -> Result<String> {
        self.ids.push(id);
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = codec.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(delta);
        }
        Ok(String::new())
    }

    /// Text still held back (an incomplete character at the end), as decoded.
    pub fn finish(&mut self, codec: &TextCodec) -> Result<String> {
        let prefix = codec.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = codec.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
