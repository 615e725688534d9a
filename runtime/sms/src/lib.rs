//! The SMS channel.
pub mod esme;
pub mod receipt;
pub mod text;
