//! Tenants' secrets (API tokens for a CRM, …): sealed with the server's
//! key (ChaCha20-Poly1305) before they reach the store, bound to their
//! tenant and name (a sealed value copied to another tenant or name does
//! not open), opened only for a plugin granted them by name, never
//! returned by the API, and masked wherever the host writes what a plugin
//! did (timeline, event stream, simulation output).
//!
//! A plugin reads a secret through its configuration: a top-level config
//! entry `{"secret": "NAME"}` is replaced by the secret's value when the
//! plugin's grants list `NAME` under `secrets`, and left out otherwise.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde_json::Value;

use crate::{EngineError, EngineResult};

/// Format version of a sealed secret (first byte).
const VERSION: u8 = 1;
/// Longest secret value, bytes.
pub const MAX_SECRET: usize = 8 * 1024;
/// What a secret's value is replaced with wherever it would be shown.
pub const MASK: &str = "[secret]";

/// The server's key for sealing secrets (32 bytes).
#[derive(Clone)]
pub struct SecretKey(Key);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A key from 64 hex digits.
    pub fn from_hex(text: &str) -> EngineResult<SecretKey> {
        let bytes = hex::decode(text.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| EngineError::Internal("a secret key is 64 hex digits".into()))?;
        Ok(SecretKey(*Key::from_slice(&bytes)))
    }

    /// A new random key, and its hex form to keep.
    pub fn generate() -> EngineResult<(SecretKey, String)> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)
            .map_err(|e| EngineError::Internal(format!("no randomness for a key: {e}")))?;
        Ok((SecretKey(*Key::from_slice(&bytes)), hex::encode(bytes)))
    }

    /// An HMAC-SHA256 of `data` under a key derived from this one for
    /// `purpose` (tokens the server gives out and checks later).
    pub fn mac(&self, purpose: &str, data: &[u8]) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        let mut derive = <Hmac<sha2::Sha256> as Mac>::new_from_slice(self.0.as_slice())
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        derive.update(b"plugboard-mac\0");
        derive.update(purpose.as_bytes());
        let key = derive.finalize().into_bytes();
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    fn aad(tenant: &str, name: &str) -> Vec<u8> {
        format!("plugboard-secret\0{tenant}\0{name}").into_bytes()
    }

    /// Seals a tenant's secret: version, nonce, ciphertext and tag.
    pub fn seal(&self, tenant: &str, name: &str, value: &str) -> EngineResult<Vec<u8>> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce)
            .map_err(|e| EngineError::Internal(format!("no randomness for a nonce: {e}")))?;
        let aad = Self::aad(tenant, name);
        let sealed = ChaCha20Poly1305::new(&self.0)
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &aad,
                },
            )
            .map_err(|_| EngineError::Internal("cannot seal the secret".into()))?;
        let mut out = Vec::with_capacity(1 + nonce.len() + sealed.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens what [`SecretKey::seal`] sealed for this tenant and name; an
    /// error for another key, tenant or name, or tampering.
    pub fn open(&self, tenant: &str, name: &str, sealed: &[u8]) -> EngineResult<String> {
        let bad = || {
            EngineError::Internal(format!(
                "secret {name} does not open with this server's key"
            ))
        };
        if sealed.len() < 13 || sealed[0] != VERSION {
            return Err(bad());
        }
        let aad = Self::aad(tenant, name);
        let plain = ChaCha20Poly1305::new(&self.0)
            .decrypt(
                Nonce::from_slice(&sealed[1..13]),
                Payload {
                    msg: &sealed[13..],
                    aad: &aad,
                },
            )
            .map_err(|_| bad())?;
        String::from_utf8(plain).map_err(|_| bad())
    }
}

/// Masks secret values in what the host shows of a plugin's work.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    values: Vec<String>,
}

impl Redactor {
    /// A redactor for these values (empty ones are ignored).
    pub fn new(values: Vec<String>) -> Redactor {
        Redactor {
            values: values.into_iter().filter(|v| !v.is_empty()).collect(),
        }
    }

    /// True when there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `text` with every secret value replaced by [`MASK`].
    pub fn text(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), MASK);
            }
        }
        out
    }

    /// Masks every string (and object key) inside a JSON value.
    pub fn value(&self, v: Value) -> Value {
        if self.is_empty() {
            return v;
        }
        match v {
            Value::String(s) => Value::String(self.text(&s)),
            Value::Array(a) => Value::Array(a.into_iter().map(|x| self.value(x)).collect()),
            Value::Object(o) => Value::Object(
                o.into_iter()
                    .map(|(k, x)| (self.text(&k), self.value(x)))
                    .collect(),
            ),
            other => other,
        }
    }
}

/// The top-level config entries that name a secret: `(key, secret name)`.
pub fn references(config: &Value) -> Vec<(String, String)> {
    config
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| {
                    let obj = v.as_object().filter(|m| m.len() == 1)?;
                    let name = obj.get("secret")?.as_str()?;
                    Some((k.clone(), name.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sealed_secrets_open_only_for_their_tenant_and_name_and_key() {
        let (key, hex) = SecretKey::generate().unwrap();
        let sealed = key.seal("acme", "crm", "s3cr3t-token").unwrap();
        assert!(!sealed.windows(12).any(|w| w == b"s3cr3t-token"));
        assert_eq!(key.open("acme", "crm", &sealed).unwrap(), "s3cr3t-token");
        assert_eq!(
            SecretKey::from_hex(&hex)
                .unwrap()
                .open("acme", "crm", &sealed)
                .unwrap(),
            "s3cr3t-token"
        );
        assert!(key.open("other", "crm", &sealed).is_err());
        assert!(key.open("acme", "billing", &sealed).is_err());
        let (other, _) = SecretKey::generate().unwrap();
        assert!(other.open("acme", "crm", &sealed).is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key.open("acme", "crm", &tampered).is_err());
        assert!(SecretKey::from_hex("abcd").is_err());
    }

    #[test]
    fn redaction_and_references() {
        let r = Redactor::new(vec!["tok3n".into(), String::new()]);
        assert_eq!(
            r.value(json!({"url": "http://crm/?t=tok3n", "n": 1, "l": ["tok3n"], "tok3n": true})),
            json!({"url": "http://crm/?t=[secret]", "n": 1, "l": ["[secret]"], "[secret]": true})
        );
        assert_eq!(
            references(
                &json!({"token": {"secret": "crm"}, "url": "x", "o": {"secret": "a", "b": 1}})
            ),
            vec![("token".to_string(), "crm".to_string())]
        );
    }
}
