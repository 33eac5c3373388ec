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
        // as transformers provides it (gpt-oss and Llama 3 templates print the date)
        env.add_function("strftime_now", |format: String| -> String {
            let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            strftime_utc(secs, &format)
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

/// `format` for the UTC time `secs` after the Unix epoch: `%Y %m %d %H %M %S
/// %b %B %A %a %j %%`; other directives are kept as written.
fn strftime_utc(secs: u64, format: &str) -> String {
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
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = (secs / 86_400) as i64;
    // civil date from days since 1970-01-01 (H. Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(month - 1) as usize];
    let yday = before + day + i64::from(leap && month > 2);
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('H') => out.push_str(&format!("{h:02}")),
            Some('M') => out.push_str(&format!("{m:02}")),
            Some('S') => out.push_str(&format!("{s:02}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[days.rem_euclid(7) as usize]),
            Some('a') => out.push_str(&DAYS[days.rem_euclid(7) as usize][..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod strftime_tests {
    #[test]
    fn formats_utc_dates_as_python_does() {
        // 2026-12-06 19:34:58 UTC, a Sunday; and the leap day of 2024
        assert_eq!(super::strftime_utc(1_796_585_698, "%Y-%m-%d %H:%M:%S"), "2026-12-06 19:34:58");
        assert_eq!(
            super::strftime_utc(1_796_585_698, "%d %b %Y, %A, day %j, 100%%"),
            "06 Dec 2026, Sunday, day 340, 100%"
        );
        assert_eq!(super::strftime_utc(1_709_164_800, "%Y-%m-%d %a %B %j"), "2024-02-29 Thu February 060");
        assert_eq!(super::strftime_utc(0, "%Y-%m-%d %q"), "1970-01-01 %q");
    }
}
