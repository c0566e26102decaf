"""paho-mqtt against a mosquitto broker, for the MQTT source's tests and benchmark.

    mqtt_client.py PORT publish TOPIC COUNT [--prefix P] [--user U --password W]
                   [--structured] [--garbage] [--bytes N]
                   [--v5 [--binary-ce] [--binary-garbage] [--content-type T]]

Publishes COUNT QoS 1 messages with payloads `<prefix>-<n>` and waits until the
broker acknowledged each; --structured sends them as structured CloudEvents (id
`ce-<prefix>-<n>`, type com.example.structured), --garbage as JSON objects with a
`specversion` that are not valid CloudEvents, --bytes pads each payload to N bytes.
--v5 speaks MQTT 5: --binary-ce sends binary-mode CloudEvents (attributes as User
Properties: id `ce-<prefix>-<n>`, type com.example.binary, extension `sensorid`,
Content Type text/plain; --ce-source sets their `source`), --binary-garbage ones
without an id, --content-type sets the Content Type property.
"""

import argparse
import json

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish")
    publish.add_argument("topic")
    publish.add_argument("count", type=int)
    publish.add_argument("--prefix", default="m")
    publish.add_argument("--user")
    publish.add_argument("--password")
    publish.add_argument("--structured", action="store_true")
    publish.add_argument("--garbage", action="store_true")
    publish.add_argument("--bytes", type=int, default=0)
    publish.add_argument("--v5", action="store_true")
    publish.add_argument("--binary-ce", action="store_true")
    publish.add_argument("--binary-garbage", action="store_true")
    publish.add_argument("--content-type")
    publish.add_argument("--ce-source", default="/producers/paho")
    arguments = parser.parse_args()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"producer-{arguments.prefix}",
        protocol=mqtt.MQTTv5 if arguments.v5 else mqtt.MQTTv311,
    )
    if arguments.user:
        client.username_pw_set(arguments.user, arguments.password)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", arguments.port, keepalive=30)
    client.loop_start()
    pending = []
    for number in range(arguments.count):
        name = f"{arguments.prefix}-{number}"
        if arguments.structured:
            payload = json.dumps(
                {
                    "specversion": "1.0",
                    "id": f"ce-{name}",
                    "source": "/producers/paho",
                    "type": "com.example.structured",
                    "datacontenttype": "text/plain",
                    "data": name,
                }
            ).encode()
        elif arguments.garbage:
            payload = json.dumps({"specversion": "0.1", "name": name}).encode()
        else:
            payload = name.encode()
            if arguments.bytes > len(payload):
                payload += b" " * (arguments.bytes - len(payload))
        properties = None
        if arguments.v5:
            properties = Properties(PacketTypes.PUBLISH)
            if arguments.content_type:
                properties.ContentType = arguments.content_type
            if arguments.binary_ce or arguments.binary_garbage:
                properties.ContentType = "text/plain"
                user = [
                    ("specversion", "1.0"),
                    ("source", arguments.ce_source),
                    ("type", "com.example.binary"),
                    ("sensorid", f"s{number % 3}"),
                    ("X-Not-An-Attribute", "kept out"),
                ]
                if arguments.binary_ce:
                    user.append(("id", f"ce-{name}"))
                properties.UserProperty = user
        pending.append(
            client.publish(arguments.topic, payload, qos=1, properties=properties)
        )
    for info in pending:
        info.wait_for_publish(timeout=60)
        if not info.is_published():
            raise SystemExit("a message was not acknowledged by the broker")
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
