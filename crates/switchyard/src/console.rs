//! The web console, served on the admin listener at `/console/`: one page and its
//! script and style sheet, compiled into the binary (no build step, nothing fetched
//! from elsewhere). The page holds no data: it asks the admin API for everything
//! with the admin token the user signs in with, so the API's authentication is the
//! console's. The assets themselves are public (the sign-in form must load), sent
//! with a content security policy that lets the page run only its own script and
//! talk only to this listener.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");

/// Only this listener's own script, style and API; no framing, no inline script.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The console's routes (merged into the admin router, outside its authentication).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route(
            "/console/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/console.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // A new binary may bring a new console: asked again each time (they are small).
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// What the console needs to know of this process (`GET /v1/console`, behind the
/// admin token).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConsoleInfo {
    pub version: &'static str,
    /// Traces are exported (`[telemetry] otlp_endpoint` is set).
    pub telemetry: bool,
    /// `[telemetry] trace_url`: a trace's page, `{trace_id}` standing for its id.
    pub trace_url: Option<String>,
    /// The dead-letter endpoints answer (an admin token is set).
    pub dead_letters: bool,
}
