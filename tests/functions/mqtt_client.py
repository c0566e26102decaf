"""paho-mqtt against a mosquitto broker, for the MQTT source's tests and benchmark.

    mqtt_client.py PORT publish TOPIC COUNT [--prefix P] [--user U --password W]
                   [--structured] [--garbage] [--bytes N]

Publishes COUNT QoS 1 messages with payloads `<prefix>-<n>` and waits until the
broker acknowledged each; --structured sends them as structured CloudEvents (id
`ce-<prefix>-<n>`, type com.example.structured), --garbage as JSON objects with a
`specversion` that are not valid CloudEvents, --bytes pads each payload to N bytes.
"""

import argparse
import json

import paho.mqtt.client as mqtt


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
    arguments = parser.parse_args()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"producer-{arguments.prefix}",
        protocol=mqtt.MQTTv311,
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
        pending.append(client.publish(arguments.topic, payload, qos=1))
    for info in pending:
        info.wait_for_publish(timeout=60)
        if not info.is_published():
            raise SystemExit("a message was not acknowledged by the broker")
    client.disconnect()
    client.loop_stop()


if __name__ == "__main__":
    main()
