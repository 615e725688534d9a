//! A starting point for a Plugboard CRM connector: looks customers up by
//! address and records finished interactions. This one keeps both in the
//! tenant's key-value store (grant it `kv`); a real one calls the CRM over
//! `http` (grant the CRM's host:port).
//!
//! Build: `cargo build --release` (the target is set in .cargo/config.toml)
//! Deploy: `plugboard plugin deploy TENANT {{NAME}} target/wasm32-unknown-unknown/release/{{CRATE}}.wasm`

use plugboard_sdk::crm::{Guest, Profile, Summary};
use plugboard_sdk::host;

struct Crm;

impl Guest for Crm {
    fn lookup_customer(_channel: String, address: String) -> Result<Option<Profile>, String> {
        let name = host::kv::get(&format!("customer/{address}")).map_err(|e| host::describe(&e))?;
        Ok(name.map(|n| Profile {
            id: address.clone(),
            name: Some(String::from_utf8_lossy(&n).into_owned()),
            attributes: Vec::new(),
        }))
    }

    fn record_interaction(summary: Summary) -> Result<(), String> {
        host::info(&format!("interaction {} ended", summary.id));
        host::kv::set(&format!("last/{}", summary.from), summary.id.as_bytes())
            .map_err(|e| host::describe(&e))
    }
}

plugboard_sdk::crm::export_crm!(Crm);
