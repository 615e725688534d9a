//! A starting point for a Plugboard text-to-speech hook. It may return audio
//! or, as here, rewrite the text for the built-in engine: this one spells
//! out `&` and `%` so that they are spoken.
//!
//! Build: `cargo build --release` (the target is set in .cargo/config.toml)
//! Deploy: `plugboard plugin deploy TENANT {{NAME}} target/wasm32-unknown-unknown/release/{{CRATE}}.wasm`

use plugboard_sdk::tts::{Guest, Output, Request};

struct Tts;

impl Guest for Tts {
    fn synthesize(req: Request) -> Result<Output, String> {
        let text = req.text.replace('&', " and ").replace('%', " percent");
        Ok(Output::Text(Request { text, ..req }))
    }
}

plugboard_sdk::tts::export_tts!(Tts);
