//! The two protocol versions behind one face: rumqttc's MQTT 3.1.1 and MQTT 5
//! clients differ in their types, not in what the source does with them.

use std::borrow::Cow;

use rumqttc::v5::mqttbytes::v5 as v5_packets;

/// A message the broker delivered, kept until it is acknowledged.
#[derive(Debug, Clone)]
pub enum Received {
    V311(rumqttc::Publish),
    V5(v5_packets::Publish),
}

impl Received {
    pub fn topic(&self) -> Cow<'_, str> {
        match self {
            Received::V311(publish) => Cow::Borrowed(&publish.topic),
            // MQTT 5 topics are UTF-8 (the broker checks them).
            Received::V5(publish) => String::from_utf8_lossy(&publish.topic),
        }
    }

    pub fn payload(&self) -> &bytes::Bytes {
        match self {
            Received::V311(publish) => &publish.payload,
            Received::V5(publish) => &publish.payload,
        }
    }

    /// MQTT 5's Content Type property (an empty one counts as none).
    pub fn content_type(&self) -> Option<&str> {
        match self {
            Received::V311(_) => None,
            Received::V5(publish) => publish
                .properties
                .as_ref()
                .and_then(|properties| properties.content_type.as_deref())
                .filter(|content_type| !content_type.is_empty()),
        }
    }

    /// MQTT 5's User Properties.
    pub fn user_properties(&self) -> &[(String, String)] {
        match self {
            Received::V311(_) => &[],
            Received::V5(publish) => publish
                .properties
                .as_ref()
                .map_or(&[], |properties| properties.user_properties.as_slice()),
        }
    }

    pub fn pkid(&self) -> u16 {
        match self {
            Received::V311(publish) => publish.pkid,
            Received::V5(publish) => publish.pkid,
        }
    }

    pub fn dup(&self) -> bool {
        match self {
            Received::V311(publish) => publish.dup,
            Received::V5(publish) => publish.dup,
        }
    }
}

/// What polling the connection brought.
pub enum Polled {
    /// The broker accepted the connection (MQTT 5: and said how long it keeps the
    /// session, when that is not what was asked for).
    Connected {
        session_present: bool,
        session_expiry: Option<u32>,
    },
    /// The DISCONNECT asked for went out.
    Disconnected,
    /// The subscriptions were granted (`Err`: refused, or granted at QoS 0 only).
    Subscribed(Result<(), String>),
    Message(Received),
    Other,
}

#[derive(Clone)]
pub enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

pub enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl Client {
    /// Subscribes to `topics` with QoS 1.
    pub async fn subscribe(&self, topics: &[String]) -> Result<(), String> {
        let result = match self {
            Client::V311(client) => client
                .subscribe_many(topics.iter().map(|topic| {
                    rumqttc::SubscribeFilter::new(topic.clone(), rumqttc::QoS::AtLeastOnce)
                }))
                .await
                .map_err(|error| error.to_string()),
            Client::V5(client) => client
                .subscribe_many(topics.iter().map(|topic| {
                    let mut filter = v5_packets::Filter::new(
                        topic.clone(),
                        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    );
                    // A resumed session's subscription does not bring the retained
                    // messages again (3.1.1 has no such option: they come at every
                    // subscribe).
                    filter.retain_forward_rule = v5_packets::RetainForwardRule::OnNewSubscribe;
                    filter
                }))
                .await
                .map_err(|error| error.to_string()),
        };
        result.map_err(|error| format!("subscribing failed: {error}"))
    }

    /// Queues the PUBACK of `message`; false when the event loop is gone.
    pub async fn ack(&self, message: &Received) -> bool {
        match (self, message) {
            (Client::V311(client), Received::V311(publish)) => {
                client.try_ack(publish).is_ok() || client.ack(publish).await.is_ok()
            }
            (Client::V5(client), Received::V5(publish)) => {
                client.try_ack(publish).is_ok() || client.ack(publish).await.is_ok()
            }
            _ => unreachable!("a message is acknowledged by the client that received it"),
        }
    }

    pub fn try_disconnect(&self) {
        let _ = match self {
            Client::V311(client) => client.try_disconnect().map_err(drop),
            Client::V5(client) => client.try_disconnect().map_err(drop),
        };
    }
}

impl EventLoop {
    /// The next thing the connection brought, or why it failed.
    pub async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            EventLoop::V311(eventloop) => {
                use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};
                match eventloop.poll().await.map_err(|error| error.to_string())? {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        if ack.code != rumqttc::ConnectReturnCode::Success {
                            return Err(format!(
                                "the broker refused the connection: {:?}",
                                ack.code
                            ));
                        }
                        Ok(Polled::Connected {
                            session_present: ack.session_present,
                            session_expiry: None,
                        })
                    }
                    Event::Outgoing(rumqttc::Outgoing::Disconnect) => Ok(Polled::Disconnected),
                    Event::Incoming(Packet::SubAck(ack)) => Ok(Polled::Subscribed(granted(
                        ack.return_codes.iter().map(|code| match code {
                            SubscribeReasonCode::Success(QoS::AtMostOnce) => Grant::AtMostOnce,
                            SubscribeReasonCode::Success(_) => Grant::Ok,
                            SubscribeReasonCode::Failure => Grant::Refused("Failure".to_owned()),
                        }),
                    ))),
                    Event::Incoming(Packet::Publish(publish)) => {
                        Ok(Polled::Message(Received::V311(publish)))
                    }
                    _ => Ok(Polled::Other),
                }
            }
            EventLoop::V5(eventloop) => {
                use rumqttc::v5::Event;
                use v5_packets::{Packet, SubscribeReasonCode};
                match eventloop.poll().await.map_err(|error| error.to_string())? {
                    Event::Incoming(Packet::ConnAck(ack)) => {
                        if ack.code != v5_packets::ConnectReturnCode::Success {
                            return Err(format!(
                                "the broker refused the connection: {:?}",
                                ack.code
                            ));
                        }
                        Ok(Polled::Connected {
                            session_present: ack.session_present,
                            session_expiry: ack
                                .properties
                                .as_ref()
                                .and_then(|properties| properties.session_expiry_interval),
                        })
                    }
                    Event::Outgoing(rumqttc::Outgoing::Disconnect) => Ok(Polled::Disconnected),
                    Event::Incoming(Packet::SubAck(ack)) => Ok(Polled::Subscribed(granted(
                        ack.return_codes.iter().map(|code| match code {
                            SubscribeReasonCode::Success(
                                rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                            ) => Grant::AtMostOnce,
                            SubscribeReasonCode::Success(_) => Grant::Ok,
                            refused => Grant::Refused(format!("{refused:?}")),
                        }),
                    ))),
                    Event::Incoming(Packet::Publish(publish)) => {
                        Ok(Polled::Message(Received::V5(publish)))
                    }
                    Event::Incoming(Packet::Disconnect(disconnect)) => Err(format!(
                        "the broker disconnected: {:?}",
                        disconnect.reason_code
                    )),
                    _ => Ok(Polled::Other),
                }
            }
        }
    }
}

enum Grant {
    Ok,
    AtMostOnce,
    Refused(String),
}

fn granted(grants: impl Iterator<Item = Grant>) -> Result<(), String> {
    for grant in grants {
        match grant {
            Grant::Ok => {}
            // QoS 0 would be at most once, with nothing to acknowledge and no bound on
            // what the broker sends.
            Grant::AtMostOnce => {
                return Err("the broker granted a subscription at QoS 0 only (at most once): allow QoS 1 for this client".to_owned());
            }
            Grant::Refused(reason) => {
                return Err(format!("the broker refused a subscription: {reason}"));
            }
        }
    }
    Ok(())
}
