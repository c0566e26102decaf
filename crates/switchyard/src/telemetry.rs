//! `[telemetry]`: exporting traces over OTLP/HTTP (protobuf) to an OpenTelemetry
//! collector, Jaeger, Tempo or any OTLP backend. Off unless `otlp_endpoint` is set;
//! then the spans of [`switchyard_event::telemetry`] are sampled
//! (`ParentBased(TraceIdRatioBased(sampling_ratio))`: an incoming `traceparent`'s
//! decision is kept) and sent in batches by the SDK's batch processor, on a thread of
//! its own, through Switchyard's own HTTP client. A full queue drops spans, never
//! slows an event; a failing backend is logged once per failure streak.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP endpoint (`http://collector:4318`): traces are posted to
    /// `<endpoint>/v1/traces` (an endpoint already ending in `/v1/traces` is taken as
    /// is). Unset: no traces, and nothing of them costs anything.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded, 0.0 to 1.0. An event arriving with a
    /// sampled `traceparent` is always recorded, one with an unsampled one never.
    #[serde(default = "default_sampling_ratio")]
    pub sampling_ratio: f64,
    /// `service.name` of the spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Headers sent with every export (an API key, `authorization`); never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretString>,
    /// How long one export may take.
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
    /// Where a trace is seen, with `{trace_id}` standing for its id (Jaeger:
    /// `http://jaeger:16686/trace/{trace_id}`): the web console links each traced
    /// invocation there. Unset: the console shows the trace id without a link.
    #[serde(default)]
    pub trace_url: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            sampling_ratio: default_sampling_ratio(),
            service_name: default_service_name(),
            headers: BTreeMap::new(),
            export_timeout: default_export_timeout(),
            trace_url: None,
        }
    }
}

fn default_sampling_ratio() -> f64 {
    1.0
}

fn default_service_name() -> String {
    "switchyard".to_owned()
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(10)
}

impl TelemetryConfig {
    /// What is wrong with the settings, by field.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !(0.0..=1.0).contains(&self.sampling_ratio) || self.sampling_ratio.is_nan() {
            problems.push((
                "sampling_ratio",
                format!("must be between 0.0 and 1.0, not {}", self.sampling_ratio),
            ));
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            match reqwest::Url::parse(endpoint) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {
                    if !url.username().is_empty()
                        || url.password().is_some()
                        || url.query().is_some()
                        || url.fragment().is_some()
                    {
                        problems.push((
                            "otlp_endpoint",
                            "must not carry credentials, a query or a fragment; put keys in telemetry.headers".to_owned(),
                        ));
                    }
                }
                _ => problems.push((
                    "otlp_endpoint",
                    "must be an http:// or https:// URL such as http://127.0.0.1:4318".to_owned(),
                )),
            }
            if !cfg!(feature = "otlp") {
                problems.push((
                    "otlp_endpoint",
                    "this build has no OTLP support (the `otlp` feature)".to_owned(),
                ));
            }
        }
        if self.service_name.trim().is_empty() {
            problems.push(("service_name", "must not be empty".to_owned()));
        }
        {
            use secrecy::ExposeSecret as _;
            for (name, value) in &self.headers {
                if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    problems.push(("headers", format!("`{name}` is not a header name")));
                } else if reqwest::header::HeaderValue::from_str(value.expose_secret()).is_err() {
                    // The value itself is a secret: not quoted.
                    problems.push((
                        "headers",
                        format!("the value of `{name}` is not a valid header value (a line break, a control character?)"),
                    ));
                }
            }
        }
        if let Some(trace_url) = &self.trace_url {
            let parsed = reqwest::Url::parse(&trace_url.replace("{trace_id}", "0"));
            if !trace_url.contains("{trace_id}") {
                problems.push((
                    "trace_url",
                    "must hold `{trace_id}` where the trace's id goes, as in http://jaeger:16686/trace/{trace_id}".to_owned(),
                ));
            } else if !parsed.is_ok_and(|url| matches!(url.scheme(), "http" | "https")) {
                problems.push((
                    "trace_url",
                    "must be an http:// or https:// URL such as http://jaeger:16686/trace/{trace_id}".to_owned(),
                ));
            }
        }
        if self.export_timeout.is_zero() {
            problems.push(("export_timeout", "must be longer than 0s".to_owned()));
        }
        problems
    }

    /// The URL spans are posted to.
    fn traces_url(&self) -> Option<String> {
        let endpoint = self.otlp_endpoint.as_deref()?.trim_end_matches('/');
        Some(if endpoint.ends_with("/v1/traces") {
            endpoint.to_owned()
        } else {
            format!("{endpoint}/v1/traces")
        })
    }
}

/// Traces being exported; [`Telemetry::shutdown`] sends what is still queued.
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Telemetry {
    /// Sends the spans still queued (bounded by the export timeout).
    pub async fn shutdown(self) {
        #[cfg(feature = "otlp")]
        {
            let provider = self.provider;
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(error) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                    tracing::warn!(%error, "sending the last spans failed");
                }
            })
            .await;
        }
    }
}

/// Starts exporting traces when `otlp_endpoint` is set (`None` otherwise), and
/// installs the tracer every span of Switchyard starts on. Call from within the
/// runtime: exports run on it.
#[cfg(feature = "otlp")]
pub fn start(config: &TelemetryConfig) -> anyhow::Result<Option<Telemetry>> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use secrecy::ExposeSecret as _;

    let Some(url) = config.traces_url() else {
        return Ok(None);
    };
    // No redirects: the headers (API keys) go to the endpoint and nowhere else.
    let client = reqwest::Client::builder()
        .timeout(config.export_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    // The headers are added by the client below, marked sensitive, exactly as
    // written (the exporter's own would percent-decode them).
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in &config.headers {
        let mut value = reqwest::header::HeaderValue::from_str(value.expose_secret())?;
        value.set_sensitive(true);
        headers.insert(
            reqwest::header::HeaderName::from_bytes(name.as_bytes())?,
            value,
        );
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url.clone())
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_timeout(config.export_timeout)
        .with_http_client(Exporting {
            client,
            headers,
            runtime: tokio::runtime::Handle::current(),
            failing: std::sync::atomic::AtomicBool::new(false),
        })
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sampling_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(config.service_name.clone())
                .with_attributes([
                    opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                    opentelemetry::KeyValue::new(
                        "service.instance.id",
                        uuid::Uuid::new_v4().to_string(),
                    ),
                ])
                .build(),
        )
        .build();
    let tracer = provider.tracer("switchyard");
    if !switchyard_event::telemetry::install(opentelemetry::global::BoxedTracer::new(Box::new(
        tracer,
    ))) {
        anyhow::bail!("traces are already set up in this process");
    }
    tracing::info!(endpoint = %url, sampling_ratio = config.sampling_ratio, "exporting traces over OTLP/HTTP");
    Ok(Some(Telemetry { provider }))
}

#[cfg(not(feature = "otlp"))]
pub fn start(config: &TelemetryConfig) -> anyhow::Result<Option<Telemetry>> {
    match config.otlp_endpoint {
        None => Ok(None),
        Some(_) => anyhow::bail!("this build has no OTLP support (the `otlp` feature)"),
    }
}

/// The exporter's HTTP client: Switchyard's reqwest (rustls with ring, already in the
/// build) run on the process's runtime, while the SDK's batch processor waits on its
/// own thread. (opentelemetry-otlp's own reqwest clients are of another reqwest
/// major version and TLS stack, which would double both in the binary.)
#[cfg(feature = "otlp")]
#[derive(Debug)]
struct Exporting {
    client: reqwest::Client,
    /// `telemetry.headers`, sensitive (left out of Debug output).
    headers: reqwest::header::HeaderMap,
    runtime: tokio::runtime::Handle,
    failing: std::sync::atomic::AtomicBool,
}

#[cfg(feature = "otlp")]
#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Exporting {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        use std::sync::atomic::Ordering;
        let client = self.client.clone();
        let headers = self.headers.clone();
        let sent = self
            .runtime
            .spawn(async move {
                let mut request = reqwest::Request::try_from(request)?;
                request.headers_mut().extend(headers);
                let response = client.execute(request).await?;
                let mut answer = opentelemetry_http::Response::builder().status(response.status());
                for (name, value) in response.headers() {
                    answer = answer.header(name, value);
                }
                // The backend's answer is a small protobuf (partial success); a
                // larger one is cut, not buffered whole.
                let mut body = Vec::new();
                let mut response = response;
                while let Some(chunk) = response.chunk().await? {
                    if body.len() + chunk.len() > 64 * 1024 {
                        break;
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok::<_, reqwest::Error>(answer.body(opentelemetry_http::Bytes::from(body)))
            })
            .await;
        let failure = match &sent {
            Ok(Ok(Ok(response))) if response.status().is_success() => None,
            Ok(Ok(Ok(response))) => Some(format!("the backend answered {}", response.status())),
            Ok(Ok(Err(error))) => Some(error.to_string()),
            // The URL is the endpoint's, checked to carry no credentials.
            Ok(Err(error)) => Some(error.to_string()),
            Err(error) => Some(error.to_string()),
        };
        match failure {
            Some(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "exporting spans failed; spans are dropped until the backend takes them again");
                }
            }
            None => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("exporting spans works again");
                }
            }
        }
        Ok(sent???)
    }
}
