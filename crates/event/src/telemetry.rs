//! Traces: the spans of one event's path (ingest, store, each delivery attempt, the
//! invocation and a cold start), linked through the event's W3C `traceparent` (the
//! CloudEvents distributed-tracing extension), so one trace shows an event end to end
//! across processes and retries.
//!
//! The binary installs a tracer when `[telemetry]` names an OTLP endpoint
//! ([`install`]); until then every function here returns at its first check of one
//! atomic load, and events are left untouched.
//!
//! How the context travels:
//! - an ingest span is a child of the `traceparent` the event arrived with (its own
//!   extension, or the HTTP request's header), else a new trace; the stored event's
//!   `traceparent` is then the ingest span's, so every later span of the event (in any
//!   process, on any retry) hangs under it;
//! - a delivery attempt is a child of the stored `traceparent`; its invocation a child
//!   of the attempt; the function gets the invocation's context (`traceparent` for
//!   http and process functions, `_X_AMZN_TRACE_ID` for lambda functions, as Lambda
//!   passes it).

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::SystemTime;

pub use opentelemetry::KeyValue;
use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::trace::{
    SpanBuilder, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
pub use opentelemetry::trace::{SpanContext, SpanKind};

use crate::Event;

static TRACER: OnceLock<BoxedTracer> = OnceLock::new();

/// Makes `tracer` the one every span starts on. Once per process: a second call is
/// ignored (returns false).
pub fn install(tracer: BoxedTracer) -> bool {
    TRACER.set(tracer).is_ok()
}

/// Whether traces are on (a tracer is installed).
#[inline]
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// A W3C `traceparent` value (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`)
/// as a remote span context; `None` when it is not one.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let value = value.trim();
    let mut parts = value.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    // Version 00 has exactly four fields; a later version may append more.
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let hex = |text: &str, len: usize| {
        text.len() == len
            && text
                .bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(version, 2) || !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::NONE,
    ))
}

/// `context` as a W3C `traceparent` value.
pub fn traceparent(context: &SpanContext) -> String {
    format!(
        "00-{:032x}-{:016x}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8() & 1
    )
}

/// The event's `traceparent` as a span context, if it carries a valid one.
pub fn event_context(event: &Event) -> Option<SpanContext> {
    event
        .extensions
        .get("traceparent")
        .and_then(|value| parse_traceparent(value))
}

/// The AWS X-Ray trace header Lambda passes its functions (`Lambda-Runtime-Trace-Id`,
/// which runtimes set as `_X_AMZN_TRACE_ID`) for a W3C context: X-Ray's root is the
/// trace id as `1-<first 8 hex>-<last 24 hex>`, its parent the span id.
pub fn xray_header(context: &SpanContext) -> String {
    let trace_id = format!("{:032x}", context.trace_id());
    format!(
        "Root=1-{}-{};Parent={:016x};Sampled={}",
        &trace_id[..8],
        &trace_id[8..],
        context.span_id(),
        u8::from(context.is_sampled())
    )
}

/// One span, ended when dropped (or with [`TraceSpan::end`]). A `TraceSpan` made
/// while traces are off holds nothing and every method does nothing.
#[derive(Default)]
pub struct TraceSpan(Option<BoxedSpan>);

impl std::fmt::Debug for TraceSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TraceSpan")
    }
}

impl TraceSpan {
    /// A span that does nothing.
    pub fn none() -> TraceSpan {
        TraceSpan(None)
    }

    /// Starts a span of `kind` named `name`, a child of `parent` (a new trace when
    /// `None`), with `attributes` when it records.
    pub fn start(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Option<&SpanContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> TraceSpan {
        TraceSpan::start_at(name, kind, parent, None, attributes)
    }

    /// [`TraceSpan::start`] with the span's start time given (a span of something
    /// that began before it could be traced, as a cold start).
    pub fn start_at(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Option<&SpanContext>,
        started: Option<SystemTime>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> TraceSpan {
        TraceSpan::start_full(name, kind, parent, started, Vec::new(), attributes)
    }

    /// [`TraceSpan::start`] with links to other spans (the events of a batch).
    pub fn start_linked(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Option<&SpanContext>,
        links: Vec<SpanContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> TraceSpan {
        TraceSpan::start_full(name, kind, parent, None, links, attributes)
    }

    fn start_full(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Option<&SpanContext>,
        started: Option<SystemTime>,
        links: Vec<SpanContext>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> TraceSpan {
        let Some(tracer) = TRACER.get() else {
            return TraceSpan(None);
        };
        // Attributes are built only for a span that records (most are not sampled).
        let mut builder = SpanBuilder::from_name(name).with_kind(kind);
        if let Some(started) = started {
            builder = builder.with_start_time(started);
        }
        if !links.is_empty() {
            builder = builder.with_links(
                links
                    .into_iter()
                    .map(opentelemetry::trace::Link::with_context)
                    .collect(),
            );
        }
        let parent_cx = match parent {
            Some(parent) => opentelemetry::Context::new().with_remote_span_context(parent.clone()),
            None => opentelemetry::Context::new(),
        };
        let mut span = tracer.build_with_context(builder, &parent_cx);
        {
            use opentelemetry::trace::Span as _;
            if span.is_recording() {
                span.set_attributes(attributes());
            }
        }
        TraceSpan(Some(span))
    }

    /// This span's context (`None` when traces are off, or the tracer is shut down).
    pub fn context(&self) -> Option<&SpanContext> {
        use opentelemetry::trace::Span as _;
        self.0
            .as_ref()
            .map(|span| span.span_context())
            .filter(|context| context.is_valid())
    }

    /// This span as a `traceparent` value.
    pub fn traceparent(&self) -> Option<String> {
        self.context().map(traceparent)
    }

    /// Whether the span records (it is on and sampled).
    pub fn is_recording(&self) -> bool {
        use opentelemetry::trace::Span as _;
        self.0.as_ref().is_some_and(|span| span.is_recording())
    }

    /// Sets attributes (built only when the span records).
    pub fn set(&mut self, attributes: impl FnOnce() -> Vec<KeyValue>) {
        use opentelemetry::trace::Span as _;
        if let Some(span) = self.0.as_mut().filter(|span| span.is_recording()) {
            span.set_attributes(attributes());
        }
    }

    /// Marks the span failed with `message`.
    pub fn fail(&mut self, message: impl Into<Cow<'static, str>>) {
        use opentelemetry::trace::Span as _;
        if let Some(span) = self.0.as_mut().filter(|span| span.is_recording()) {
            span.set_status(Status::error(message));
        }
    }

    /// Ends the span now.
    pub fn end(self) {
        drop(self);
    }

    /// Ends the span at `at`.
    pub fn end_at(mut self, at: SystemTime) {
        use opentelemetry::trace::Span as _;
        if let Some(span) = self.0.as_mut() {
            span.end_with_timestamp(at);
        }
    }
}

/// Starts the ingest span of `event` (named `name`: the door it came through) as a
/// child of the context it arrived with, and makes the span the event's
/// `traceparent` (keeping its `tracestate`). Does nothing while traces are off.
pub fn start_ingest(
    event: &mut Event,
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
    door: &str,
) -> TraceSpan {
    if !enabled() {
        return TraceSpan::none();
    }
    let parent = event_context(event);
    let span = TraceSpan::start(name, kind, parent.as_ref(), || {
        vec![
            KeyValue::new("switchyard.source", door.to_owned()),
            KeyValue::new("cloudevents.event_id", attribute(&event.id)),
            KeyValue::new("cloudevents.event_source", attribute(&event.source)),
            KeyValue::new("cloudevents.event_type", attribute(&event.ty)),
        ]
    });
    if let Some(value) = span.traceparent() {
        event.extensions.insert("traceparent".to_owned(), value);
        if parent.is_none() {
            // A new trace: a `tracestate` of another (or of an invalid traceparent)
            // does not belong to it (W3C Trace Context).
            event.extensions.remove("tracestate");
        }
    }
    span
}

/// Longest attribute value taken from an event (ids and sources are the sender's).
pub const MAX_ATTRIBUTE_BYTES: usize = 256;

/// `value` cut to [`MAX_ATTRIBUTE_BYTES`] (at a character boundary), as a span
/// attribute of an event's id, source or type.
pub fn attribute(value: &str) -> String {
    let mut end = value.len().min(MAX_ATTRIBUTE_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}

/// [`start_ingest`] for each of `events`, spans named `ingest <door>`; empty (and
/// nothing formatted) while traces are off.
pub fn start_ingests(events: &mut [Event], kind: SpanKind, door: &str) -> Vec<TraceSpan> {
    if !enabled() {
        return Vec::new();
    }
    let name = format!("ingest {door}");
    events
        .iter_mut()
        .map(|event| start_ingest(event, name.clone(), kind.clone(), door))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_values_are_refused() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = parse_traceparent(value).expect("valid");
        assert!(context.is_sampled());
        assert!(context.is_remote());
        assert_eq!(traceparent(&context), value);
        let unsampled =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("valid");
        assert!(!unsampled.is_sampled());
        // A later version may carry more fields; its known part is read.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_xray_header_carries_the_w3c_trace_and_span_ids() {
        let context =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            xray_header(&context),
            "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1"
        );
    }

    #[test]
    fn spans_are_nothing_while_traces_are_off() {
        // No tracer is installed in this test binary.
        let mut event = Event::new("1", "/s", "t");
        let span = start_ingest(&mut event, "ingest", SpanKind::Server, "s");
        assert!(span.context().is_none());
        assert!(!event.extensions.contains_key("traceparent"));
    }
}
