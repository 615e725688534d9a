//! `plugboard plugin new`: writes a plugin project a developer builds and
//! deploys with two commands. The templates are the SDKs' own (compiled by
//! the test suite): the Rust ones are embedded here, the JavaScript and
//! Python ones are read from the SDK checkout the project will build with.

use anyhow::{Context, Result, bail};
use plugboard_core::PluginKind;
use std::path::{Path, PathBuf};

/// A plugin language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust (cargo, wasm32-unknown-unknown; the server wraps the module into a component).
    Rust,
    /// JavaScript (componentize-js).
    Js,
    /// Python (componentize-py).
    Python,
}

/// Parses `--kind` (`flow`, `router`, `tts` or `crm`).
pub fn parse_kind(s: &str) -> Result<PluginKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?} is not a plugin kind: use flow, router, tts or crm"))
}

const RUST_FLOW: &str = include_str!("../../../sdk/rust/template/src/lib.rs");
const RUST_ROUTER: &str = include_str!("../../../sdk/rust/templates/router.rs");
const RUST_TTS: &str = include_str!("../../../sdk/rust/templates/tts.rs");
const RUST_CRM: &str = include_str!("../../../sdk/rust/templates/crm.rs");

/// Finds the SDKs: `given`, else the checkout this binary was built in.
pub fn sdk_root(given: Option<PathBuf>) -> Result<PathBuf> {
    let ok = |p: &Path| p.join("sdk/rust/Cargo.toml").exists();
    if let Some(p) = given {
        if ok(&p) {
            return Ok(std::fs::canonicalize(&p)?);
        }
        bail!(
            "{} does not hold the Plugboard SDKs (sdk/rust)",
            p.display()
        );
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/plugboard → the checkout.
        candidates.extend(exe.ancestors().nth(3).map(Path::to_path_buf));
    }
    candidates.push(std::env::current_dir()?);
    candidates
        .into_iter()
        .find(|p| ok(p))
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .context("cannot find the Plugboard SDKs; pass --sdk PATH (the Plugboard checkout)")
}

fn check_name(name: &str) -> Result<()> {
    plugboard_core::validate_id("plugin", name).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Writes the project; returns the files written and the commands to build
/// and deploy it.
pub fn scaffold(
    lang: Lang,
    kind: PluginKind,
    name: &str,
    dir: &Path,
    sdk: &Path,
) -> Result<(Vec<PathBuf>, Vec<String>)> {
    check_name(name)?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let krate = name.replace('-', "_");
    let sdk_s = sdk.display().to_string();
    let fill = |t: &str| {
        t.replace("{{NAME}}", name)
            .replace("{{CRATE}}", &krate)
            .replace("{{KIND}}", &kind.to_string())
            .replace("{{SDK}}", &sdk_s)
    };
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    let wasm = match lang {
        Lang::Rust => {
            let lib = match kind {
                PluginKind::Flow => RUST_FLOW
                    .replace("my-flow", "{{NAME}}")
                    .replace("my_flow", "{{CRATE}}"),
                PluginKind::Router => RUST_ROUTER.to_string(),
                PluginKind::Tts => RUST_TTS.to_string(),
                PluginKind::Crm => RUST_CRM.to_string(),
            };
            files.push(("src/lib.rs".into(), fill(&lib)));
            files.push((
                "Cargo.toml".into(),
                fill(
                    r#"[package]
name = "{{NAME}}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
plugboard-sdk = { path = "{{SDK}}/sdk/rust", features = ["{{KIND}}"] }

[profile.release]
opt-level = "s"
lto = true
strip = true
panic = "abort"

[workspace]
"#,
                ),
            ));
            files.push((
                ".cargo/config.toml".into(),
                "[build]\ntarget = \"wasm32-unknown-unknown\"\n".into(),
            ));
            files.push((".gitignore".into(), "/target\n".into()));
            format!("target/wasm32-unknown-unknown/release/{krate}.wasm")
        }
        Lang::Js | Lang::Python => {
            // (SDK directory, template extension, source file, build input)
            let (sub, ext, src, input) = if lang == Lang::Js {
                ("js", "js", format!("{name}.js"), format!("{name}.js"))
            } else {
                ("python", "py", "app.py".to_string(), ".".to_string())
            };
            let template = sdk
                .join("sdk")
                .join(sub)
                .join("templates")
                .join(format!("{kind}.{ext}"));
            let text = std::fs::read_to_string(&template)
                .with_context(|| format!("reading the template {}", template.display()))?;
            files.push((src.into(), fill(&text)));
            files.push((
                "build.sh".into(),
                format!(
                    "#!/usr/bin/env bash\n# Builds {name}.wasm with the Plugboard {sub} SDK.\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\nexec \"{sdk_s}/sdk/{sub}/build.sh\" --world {kind} {input} {name}.wasm\n"
                ),
            ));
            files.push((".gitignore".into(), format!("/{name}.wasm\n")));
            format!("{name}.wasm")
        }
    };
    let build = match lang {
        Lang::Rust => "cargo build --release".to_string(),
        _ => "./build.sh".to_string(),
    };
    let commands = vec![
        format!("cd {} && {build}", dir.display()),
        format!("plugboard plugin deploy TENANT {name} {wasm}"),
    ];
    files.push((
        "README.md".into(),
        format!(
            "# {name}\n\nA Plugboard {kind} plugin ({lang:?}).\n\n```sh\n{build}\nplugboard plugin deploy TENANT {name} {wasm}\n```\n"
        ),
    ));
    let mut written = Vec::new();
    for (rel, text) in files {
        let p = dir.join(&rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        #[cfg(unix)]
        if rel.extension().is_some_and(|e| e == "sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
        written.push(p);
    }
    Ok((written, commands))
}
