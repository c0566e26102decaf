//! What a `lambda` function receives from a trigger with `payload = "aws"`: the
//! event as AWS would have sent it, so handlers written for AWS run unchanged.
//!
//! An Invoke API `Event` invocation (type [`INVOKE_TYPE`]) is its payload, as given.
//! Anything else is the structured CloudEvent, as with `payload = "cloudevent"`.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use switchyard_event::{Event, Failure, Outcome, Reservation, Target, to_structured_json};

use crate::ManagedFunction;

/// The CloudEvent type of an Invoke API `Event` invocation stored on the bus: its
/// data is the payload, its source [`invoke_source`].
pub const INVOKE_TYPE: &str = "dev.switchyard.function.invoke";

/// The source of the Invoke API's `Event` invocations of `function`.
pub fn invoke_source(function: &str) -> String {
    format!("{INVOKE_SOURCE_PREFIX}{function}")
}

/// What every [`invoke_source`] starts with.
pub const INVOKE_SOURCE_PREFIX: &str = "/functions/";

/// The request id the handler sees for `event`: an Invoke API `Event` invocation
/// keeps the one its caller was given, on every attempt (as Lambda's do); other
/// events get a new one per attempt.
pub fn request_id(event: &Event) -> Option<String> {
    (event.ty == INVOKE_TYPE).then(|| event.id.clone())
}

/// The payload AWS would have sent for `event`.
pub fn render(event: &Event) -> Bytes {
    if event.ty == INVOKE_TYPE {
        return event.data.clone();
    }
    Bytes::from(to_structured_json(event))
}

/// A `lambda` function as a trigger with `payload = "aws"` calls it: the same
/// instances and budget, AWS-shaped payloads.
pub struct AwsPayloads {
    function: ManagedFunction,
}

impl ManagedFunction {
    /// This function, called with AWS-shaped payloads.
    pub fn aws_payloads(&self) -> AwsPayloads {
        AwsPayloads {
            function: self.clone(),
        }
    }
}

#[async_trait]
impl Target for AwsPayloads {
    async fn invoke(&self, event: &Event, timeout: Duration) -> Outcome {
        let reservation = match self.reserve().await {
            Ok(reservation) => reservation,
            Err(failure) => {
                return Outcome::RetryLater {
                    not_before: None,
                    failure,
                };
            }
        };
        self.invoke_reserved(reservation, event, timeout).await
    }

    fn reserves(&self) -> bool {
        true
    }

    async fn reserve(&self) -> Result<Option<Reservation>, Failure> {
        self.function.reserve().await
    }

    async fn invoke_reserved(
        &self,
        reservation: Option<Reservation>,
        event: &Event,
        timeout: Duration,
    ) -> Outcome {
        self.function
            .invoke_rendered(reservation, event, timeout, render)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invoke_api_event_is_its_payload_and_anything_else_a_structured_cloudevent() {
        let mut invoked = Event::new("1", invoke_source("thumbs"), INVOKE_TYPE);
        invoked.data = Bytes::from_static(b"{\"key\": [1, 2]}");
        assert_eq!(render(&invoked), invoked.data);
        let mut other = Event::new("2", "/hooks/github", "com.github.push");
        other.data = Bytes::from_static(b"{\"ref\":\"main\"}");
        let rendered: serde_json::Value = serde_json::from_slice(&render(&other)).unwrap();
        assert_eq!(rendered["type"], "com.github.push");
        assert_eq!(rendered["data"]["ref"], "main");
    }
}
