//! What every component's config step shares: the error that names the key, the value checks,
//! and the rule that relative paths are taken from the config file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why a configuration cannot be used. Every variant names the key or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} cannot be read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path} is not valid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The error for a bad value of `key`.
pub fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// `v` must be a finite number above 0.
pub fn positive(key: &'static str, v: f32) -> Result<(), ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(invalid(key, format!("must be a number above 0, not {v}")))
    }
}

/// `v` must lie in `[lo, hi]`.
pub fn within(key: &'static str, v: f32, lo: f32, hi: f32) -> Result<(), ConfigError> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(invalid(key, format!("must lie in [{lo}, {hi}], not {v}")))
    }
}

/// An `address:port` to listen on. The documented values are loopback ones; any other is
/// accepted and the listener logs a WARN at start-up that it is exposed (`warn_if_exposed`).
pub fn listen_addr(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|e| invalid(key, format!("'{text}' is not an address and port: {e}")))
}

/// Log a WARN when `what` listens beyond this host: anyone who reaches the address reads it.
pub fn warn_if_exposed(what: &str, addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "{what} listens on a non-loopback address: it is exposed to every host that can reach it, without authentication"
        );
    }
}

/// Where relative paths in a config are taken from: the config file's folder, or (embedded
/// defaults, command-line paths made absolute) nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct Base<'a>(pub Option<&'a Path>);

impl Base<'_> {
    pub fn path(&self, p: &Path) -> PathBuf {
        match self.0 {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_path_buf(),
        }
    }
}

/// A bundled file (`models/...`): beside the working directory, the executable or the source
/// tree.
pub fn bundled(rel: &str) -> PathBuf {
    crate::core::model::install_roots()
        .iter()
        .map(|r| r.join(rel))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_name_the_key_and_the_value() {
        assert!(positive("a.b", 1.0).is_ok());
        let e = positive("a.b", f32::NAN).unwrap_err().to_string();
        assert!(e.contains("a.b") && e.contains("NaN"), "{e}");
        assert!(within("x", 0.5, 0.0, 1.0).is_ok());
        assert!(within("x", 1.5, 0.0, 1.0).is_err());
        assert!(listen_addr("s", "127.0.0.1:9").is_ok());
        assert!(listen_addr("s", "[::1]:9").is_ok());
        assert!(listen_addr("s", "0.0.0.0:9").is_ok());
        let e = listen_addr("s", "localhost").unwrap_err().to_string();
        assert!(e.contains("s:") && e.contains("localhost"), "{e}");
        let b = Base(Some(Path::new("/etc/x")));
        assert_eq!(b.path(Path::new("m.onnx")), Path::new("/etc/x/m.onnx"));
        assert_eq!(b.path(Path::new("/m.onnx")), Path::new("/m.onnx"));
        assert_eq!(Base(None).path(Path::new("m")), Path::new("m"));
    }
}
