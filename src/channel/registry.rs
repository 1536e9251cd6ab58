//! The registry of channel kinds: the one list. A kind brings its settings (parsed and
//! validated from its channel file), its default delivery policy, the templates it needs and
//! the constructor of its adapter, all from its own module.

use super::{BuildContext, Channel};
use crate::config::{ConfigError, DeliveryPolicy, SecretSource};
use std::path::Path;
use std::sync::Arc;

/// A channel file's settings, once parsed; builds the adapter.
#[async_trait::async_trait]
pub trait ChannelSettings: std::fmt::Debug + Send + Sync {
    /// Builds the adapter of the channel `id`. This may do I/O (create a folder, set up a
    /// client, ask a provider for its limits).
    async fn build(
        &self,
        id: &str,
        policy: &DeliveryPolicy,
        context: &BuildContext,
    ) -> crate::Result<Arc<dyn Channel>>;

    /// The settings as `Any`, for a kind whose settings another part reads back (the server
    /// reads the status page's); other kinds keep the default, which downcasts to nothing.
    fn as_any(&self) -> &dyn std::any::Any {
        &()
    }

    /// The policy a channel starts from before its file's `[delivery]` applies: the kind's
    /// default, unless these settings ask for another (an SMS through Twilio has Twilio's
    /// rate, one through Kannel none).
    fn default_policy(&self, kind_default: &DeliveryPolicy) -> DeliveryPolicy {
        kind_default.clone()
    }

    /// Checks what can be checked without building: that a folder it will write to can be
    /// created. Reads only; `check-config` runs it.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    /// What works, but not as an operator would expect: each a sentence `check-config` prints
    /// and `crier serve` logs when it starts.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// What a kind's parser gets: the channel file, its table without `kind` and `delivery`, the
/// folder relative paths start from, and where secrets come from.
pub struct SettingsInput<'a> {
    pub file: &'a Path,
    pub base: &'a Path,
    pub table: toml::Value,
    pub secrets: &'a dyn SecretSource,
}

impl SettingsInput<'_> {
    /// Deserializes the table into a kind's file struct (which denies unknown fields).
    /// Deserializes the table into a kind's file struct (which denies unknown fields). A
    /// value of the wrong type is reported with its key, which toml's own message leaves out.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(self.table.clone()).map_err(|e| {
            let key = e.path().to_string();
            let reason = e.into_inner().message().trim().to_owned();
            // serde_path_to_error names the top level ".": no key to name then.
            let key = (!key.is_empty() && key != ".").then_some(key);
            ConfigError::new(self.file, key, reason)
        })
    }
}

pub struct ChannelKind {
    /// What a channel file's `kind` says.
    pub name: &'static str,
    /// Templates the kind renders; `check-config` requires them.
    pub templates: &'static [&'static str],
    pub default_policy: DeliveryPolicy,
    pub parse: fn(&SettingsInput) -> Result<Arc<dyn ChannelSettings>, ConfigError>,
}

impl std::fmt::Debug for ChannelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every kind crier has.
pub static KINDS: &[&ChannelKind] = &[
    &super::email::KIND,
    &super::webhook::KIND,
    &super::status_page::KIND,
    &super::sms::KIND,
    &super::mastodon::KIND,
    &super::discourse::KIND,
    &super::bluesky::KIND,
];

pub fn kind(name: &str) -> Option<&'static ChannelKind> {
    KINDS.iter().copied().find(|kind| kind.name == name)
}

/// "email, webhook or status_page", for error messages.
pub fn kind_names() -> String {
    let names: Vec<&str> = KINDS.iter().map(|kind| kind.name).collect();
    match names.split_last() {
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}
