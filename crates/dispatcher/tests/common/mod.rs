//! Shared by the dispatcher's tests against a real nats-server.

use switchyard_bus::{Bus, BusConfig};

/// A bus on `url` with its streams created, named after `prefix`; `extra` is more
/// `[nats]` settings and `streams` the streams' extra settings (`storage = "memory"`).
pub async fn bus(url: &str, prefix: &str, extra: &str, streams: &str) -> Bus {
    let config: BusConfig = toml::from_str(&format!(
        "url = \"{url}\"\nsubject_prefix = \"{prefix}\"\n{extra}\nevents_stream = {{ name = \"{prefix}_EVENTS\"{streams} }}\ndead_letter_stream = {{ name = \"{prefix}_DLQ\"{streams} }}\n"
    ))
    .unwrap();
    let bus = Bus::connect(&config).await.unwrap();
    bus.ensure_streams().await.unwrap();
    bus
}
