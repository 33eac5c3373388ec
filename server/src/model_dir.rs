//! Where models come from: `--model DIR`, or the built-in default model.

use std::path::PathBuf;

/// The built-in default model shipped in the repository
/// (`models/tiny-shakespeare-moe`, a small trained Mixtral-architecture MoE).
/// `MOE_DEFAULT_MODEL` overrides the location for installed binaries (the
/// container image sets it).
pub fn default_model_dir() -> PathBuf {
    match std::env::var_os("MOE_DEFAULT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/tiny-shakespeare-moe")),
    }
}

/// The name a model is served and recorded under: its final path
/// component (after resolving `.` and links; a `.gguf` file without its
/// extension), or "model".
pub fn model_name(dir: &std::path::Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|p| {
            let gguf = p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf"));
            let name = if gguf { p.file_stem() } else { p.file_name() };
            name.map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "model".into())
}

/// Loads a model directory with a progress bar on stderr (hidden when stderr
/// is not a terminal).
pub fn load_with_progress(dir: &std::path::Path) -> Result<moe_model::LoadedModel, moe_model::ModelError> {
    let mut bar = Bar(None);
    let loaded = moe_model::load_model(dir, &mut bar);
    bar.finish();
    loaded
}

/// A loading progress bar on stderr.
pub(crate) struct Bar(pub(crate) Option<indicatif::ProgressBar>);

impl Bar {
    /// Removes the bar.
    pub(crate) fn finish(self) {
        if let Some(b) = self.0 {
            b.finish_and_clear();
        }
    }
}

impl moe_model::LoadProgress for Bar {
    fn start(&mut self, total: u64) {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} ({eta})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        self.0 = Some(b);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(b) = &self.0 {
            b.inc(bytes);
        }
    }
}
