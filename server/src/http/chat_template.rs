//! Rendering a checkpoint's Jinja chat template with minijinja (plus the
//! Python string methods HF templates call, from `minijinja-contrib`).

use crate::frontend::error::ApiError;
use minijinja::{context, Environment, Error, ErrorKind, Value};

/// One chat message, validated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    /// system, user, assistant or developer.
    pub role: String,
    /// Text.
    pub content: String,
    /// Optional participant name (templates may use it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported at start-up.
    pub fn new(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())?;
        Ok(Self { env, bos: bos.unwrap_or_default().to_string(), eos: eos.unwrap_or_default().to_string() })
    }

    /// The prompt text for `messages`, ending with the assistant's turn.
    pub fn render(&self, messages: &[Message]) -> Result<String, ApiError> {
        let t = self.env.get_template("chat").map_err(|e| ApiError::internal(e.to_string()))?;
        t.render(context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => true,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        })
        .map_err(|e| ApiError::invalid("messages", format!("the chat template rejected the messages: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_hf_style_templates() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[{{ m['content'].strip() }}]\
                   {% else %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}\
                   {% if add_generation_prompt %}<|assistant|>{% endif %}";
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).unwrap();
        let msgs = vec![
            Message { role: "system".into(), content: "  be brief ".into(), name: None },
            Message { role: "user".into(), content: "hi".into(), name: None },
        ];
        assert_eq!(t.render(&msgs).unwrap(), "<s>[be brief]<|user|>hi</s><|assistant|>");
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}", None, None).unwrap();
        let e = t.render(&msgs).unwrap_err();
        assert!(e.message.contains("no system role"), "{}", e.message);
    }
}
