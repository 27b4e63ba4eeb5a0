//! The one configuration tree, and how it is assembled from its layers:
//! defaults < TOML file < `VIGIE_<SECTION>_<KEY>` environment variables < flags.
//!
//! Unknown keys are an error that names the key, in every layer. The
//! environment is read through [`Env`] so that tests never touch the real one.
//! This module must never start anything: it only describes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::Validation;

/// Everything `vigie serve` can be told.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: Server,
    pub policies: Policies,
    pub data: Data,
    pub authzen: Authzen,
    pub cache: crate::cache::Config,
    pub audit: crate::audit::Config,
    pub ext_authz: crate::extauthz::Config,
    pub telemetry: crate::telemetry::Config,
    pub plugins: crate::plugin::Config,
    pub log: Log,
}

/// `[server]`: where and how requests are accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// TCP address to listen on. Default `127.0.0.1:8190` (loopback only).
    pub listen: SocketAddr,
    /// Also listen on this Unix socket. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unix_socket: Option<PathBuf>,
    /// Largest request body accepted, in bytes; larger gets HTTP 413. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Most requests in one batch call. Default 1000.
    pub max_batch: usize,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8190)),
            unix_socket: None,
            max_body_bytes: 1 << 20,
            max_batch: 1000,
        }
    }
}

/// `[policies]`: the policy directory and how it is reloaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policies {
    /// The policy directory. Default `policies` (the bundled example).
    pub dir: PathBuf,
    /// `strict` (default), `permissive` or `off`.
    pub validation: Validation,
    /// Watch the directory and reload on change. Default true.
    pub watch: bool,
    /// Interval of the polling fallback (used when file watching is not
    /// available, and as a safety net beside it), in milliseconds. Default 500.
    pub poll_interval_ms: u64,
}

impl Default for Policies {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("policies"),
            validation: Validation::Strict,
            watch: true,
            poll_interval_ms: 500,
        }
    }
}

/// `[data]`: where the sidecar keeps its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Data {
    /// Data directory. Default `.vigie` (relative to the working directory).
    pub dir: PathBuf,
}

impl Default for Data {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".vigie"),
        }
    }
}

/// `[authzen]`: how AuthZEN requests map onto Cedar.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Authzen {
    /// AuthZEN `type` → Cedar entity type, e.g. `user = "Agency::User"`.
    /// Default: none (a type is used as given, or resolved in the schema's namespace).
    pub aliases: BTreeMap<String, String>,
    /// Which wins when a request's `properties` and a stored entity both give
    /// an attribute: `stored` (default: a caller cannot grant itself a role)
    /// or `request`.
    pub properties: Precedence,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precedence {
    #[default]
    Stored,
    Request,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` (default) or `vigie=debug`.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file `{path}`: {message}")]
    File { path: PathBuf, message: String },
    #[error("environment variable `{var}`: {message}")]
    Env { var: String, message: String },
    #[error("{message}")]
    Invalid { message: String },
}

/// Where environment variables come from.
pub trait Env {
    /// Every variable whose name starts with `VIGIE_`.
    fn vigie_vars(&self) -> Vec<(String, String)>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsEnv;

impl Env for OsEnv {
    fn vigie_vars(&self) -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with("VIGIE_"))
            .collect()
    }
}

impl Env for BTreeMap<String, String> {
    fn vigie_vars(&self) -> Vec<(String, String)> {
        self.iter()
            .filter(|(k, _)| k.starts_with("VIGIE_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// One value set on the command line: `section.key = value`.
#[derive(Debug, Clone)]
pub struct Flag {
    pub section: &'static str,
    pub key: &'static str,
    pub value: toml::Value,
}

impl Config {
    /// Assembles the configuration: file (if any) < env < flags.
    pub fn load(file: Option<&Path>, env: &dyn Env, flags: &[Flag]) -> Result<Self, ConfigError> {
        load_layers(file, env, flags, default_keys)
    }
}

/// The layering behind every `Config::load`: file < `VIGIE_*` env < flags,
/// for any configuration tree `T`; `keys` lists each section's keys.
pub fn load_layers<T>(
    file: Option<&Path>,
    env: &dyn Env,
    flags: &[Flag],
    keys: fn(&str) -> &'static [&'static str],
) -> Result<T, ConfigError>
where
    T: Default + Serialize + serde::de::DeserializeOwned,
{
    {
        let mut table = match file {
            None => toml::Table::new(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    message: e.to_string().trim_end().to_owned(),
                })?;
                // Check the file alone first, so an error names the file.
                T::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
                    ConfigError::File {
                        path: path.to_owned(),
                        message: e.to_string().trim_end().to_owned(),
                    }
                })?;
                table
            }
        };
        overlay_env::<T>(&mut table, env, keys)?;
        for flag in flags {
            section_mut(&mut table, flag.section)
                .map_err(|message| ConfigError::Invalid { message })?
                .insert(flag.key.to_owned(), flag.value.clone());
        }
        T::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Invalid {
            message: e.to_string().trim_end().to_owned(),
        })
    }
}

fn section_mut<'a>(
    table: &'a mut toml::Table,
    section: &str,
) -> Result<&'a mut toml::Table, String> {
    table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| format!("`{section}` must be a table"))
}

/// Applies `VIGIE_<SECTION>_<KEY>` variables. The type of each key is taken
/// from the defaults, so `VIGIE_SERVER_MAX_BODY_BYTES=2048` is a number and
/// `VIGIE_DATA_DIR=/var/lib/vigie` a string.
fn overlay_env<T: Default + Serialize>(
    table: &mut toml::Table,
    env: &dyn Env,
    default_keys: fn(&str) -> &'static [&'static str],
) -> Result<(), ConfigError> {
    let defaults = match toml::Value::try_from(T::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let mut vars = env.vigie_vars();
    vars.sort();
    for (var, raw) in vars {
        let name = var.trim_start_matches("VIGIE_").to_ascii_lowercase();
        let section = defaults
            .keys()
            .filter(|s| name.starts_with(&format!("{s}_")))
            .max_by_key(|s| s.len())
            .ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                message: format!(
                    "unknown setting (sections are {})",
                    defaults.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })?;
        let key = name[section.len() + 1..].to_owned();
        let known = default_keys(section);
        if !known.contains(&key.as_str()) {
            return Err(ConfigError::Env {
                var,
                message: format!("unknown key `{key}` in section `[{section}]`"),
            });
        }
        let default = defaults.get(section).and_then(|s| s.get(&key)).cloned();
        let value = typed(&raw, default.as_ref()).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
        section_mut(table, section)
            .map_err(|message| ConfigError::Env {
                var: var.clone(),
                message,
            })?
            .insert(key, value);
    }
    Ok(())
}

/// Every key of a section, including those whose default is absent.
fn default_keys(section: &str) -> &'static [&'static str] {
    match section {
        "server" => &["listen", "unix_socket", "max_body_bytes", "max_batch"],
        "policies" => &["dir", "validation", "watch", "poll_interval_ms"],
        "data" => &["dir"],
        "authzen" => &["aliases", "properties"],
        "audit" => &[
            "durability",
            "max_outbox_bytes",
            "when_full",
            "full_wait_ms",
            "mask",
            "ledger",
            "sidecar_id",
            "key",
            "batch_max_records",
            "batch_max_delay_ms",
            "heartbeat_ms",
            "max_backoff_ms",
        ],
        "ext_authz" => &[
            "enabled",
            "listen",
            "identity",
            "routes",
            "context",
            "denied_status",
            "denied_body",
            "headers",
        ],
        "telemetry" => &[
            "enabled",
            "endpoint",
            "protocol",
            "headers",
            "sample_ratio",
            "service_name",
        ],
        "cache" => &[
            "enabled",
            "ttl_ms",
            "l1_max_entries",
            "l1_max_bytes",
            "l2",
            "l2_max_entries",
            "l2_max_bytes",
            "l2_page_cache_bytes",
            "l2_trim_interval_ms",
        ],
        "plugins" => &[
            "enabled",
            "instances",
            "max_memory_mib",
            "stack_kib",
            "max_wasm_mib",
            "keep_resident_kib",
            "tick_ms",
            "quarantine_after",
            "quarantine_seconds",
            "cache_dir",
        ],
        "log" => &["format", "level"],
        _ => &[],
    }
}

fn typed(raw: &str, default: Option<&toml::Value>) -> Result<toml::Value, String> {
    match default {
        Some(toml::Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("expected an integer, got `{raw}`")),
        Some(toml::Value::Boolean(_)) => match raw.trim() {
            "true" | "1" | "yes" | "on" => Ok(toml::Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("expected true or false, got `{raw}`")),
        },
        Some(toml::Value::Table(_)) | Some(toml::Value::Array(_)) => {
            let doc: toml::Table = toml::from_str(&format!("v = {raw}"))
                .map_err(|e| format!("expected an inline TOML value: {e}"))?;
            doc.get("v").cloned().ok_or_else(|| "empty value".into())
        }
        _ => Ok(toml::Value::String(raw.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn defaults_are_safe() {
        let c = Config::load(None, &env(&[]), &[]).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8190");
        assert_eq!(c.server.max_body_bytes, 1 << 20);
        assert_eq!(c.policies.validation, Validation::Strict);
        assert_eq!(c.authzen.properties, Precedence::Stored);
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let f =
            file("[server]\nlisten = \"127.0.0.1:1\"\nmax_body_bytes = 10\n[data]\ndir = \"a\"\n");
        let e = env(&[
            ("VIGIE_SERVER_LISTEN", "127.0.0.1:2"),
            ("VIGIE_DATA_DIR", "b"),
        ]);
        let flags = [Flag {
            section: "server",
            key: "listen",
            value: toml::Value::String("127.0.0.1:3".into()),
        }];
        let c = Config::load(Some(f.path()), &e, &flags).unwrap();
        assert_eq!(c.server.listen.port(), 3);
        assert_eq!(c.server.max_body_bytes, 10);
        assert_eq!(c.data.dir, PathBuf::from("b"));
    }

    #[test]
    fn env_values_take_the_type_of_the_key() {
        let e = env(&[
            ("VIGIE_SERVER_MAX_BODY_BYTES", "2048"),
            ("VIGIE_POLICIES_WATCH", "false"),
            ("VIGIE_AUTHZEN_ALIASES", "{ user = \"Agency::User\" }"),
        ]);
        let c = Config::load(None, &e, &[]).unwrap();
        assert_eq!(c.server.max_body_bytes, 2048);
        assert!(!c.policies.watch);
        assert_eq!(c.authzen.aliases["user"], "Agency::User");
    }

    #[test]
    fn unknown_keys_are_named() {
        let f = file("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n");
        let err = Config::load(Some(f.path()), &env(&[]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");

        let err = Config::load(None, &env(&[("VIGIE_SERVER_LISEN", "x")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("VIGIE_SERVER_LISEN") && err.contains("`lisen`"),
            "{err}"
        );

        let err = Config::load(None, &env(&[("VIGIE_NOPE_X", "x")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("VIGIE_NOPE_X"), "{err}");

        let f = file("[sever]\n");
        let err = Config::load(Some(f.path()), &env(&[]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("sever"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::load(None, &env(&[("VIGIE_SERVER_MAX_BODY_BYTES", "lots")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("VIGIE_SERVER_MAX_BODY_BYTES"), "{err}");
        let f = file("[policies]\nvalidation = \"lenient\"\n");
        let err = Config::load(Some(f.path()), &env(&[]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lenient"), "{err}");
    }
}
