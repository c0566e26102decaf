"""pika against a RabbitMQ node, for the AMQP source's tests and benchmark.

    amqp_client.py PORT publish QUEUE COUNT [--prefix P] [--no-message-id]
                   [--header-bytes B] [--garbage] [--binary-mode]
                   [--exchange X --routing-key K] [--raw-body]
    amqp_client.py PORT depth QUEUE      prints the messages ready + unacknowledged
    amqp_client.py PORT exchange NAME    declares a durable topic exchange

`publish` declares QUEUE (durable) and publishes COUNT persistent messages with
publisher confirms, bodies `<prefix>-<n>`, `message_id` `<prefix>-<n>` (unless
--no-message-id), content type `text/plain`, a `tenant` header and a nested one;
--header-bytes adds a header of that many bytes; --garbage marks the bodies as
structured CloudEvents although they are not; --binary-mode sends them in the
CloudEvents AMQP binding's binary mode (`cloudEvents:` application properties).
With --exchange the messages go to that exchange with routing key K (QUEUE is not
declared, and unroutable messages are dropped by the broker); --raw-body sends
bodies that are not UTF-8 (bytes 0xff 0xfe, then `<prefix>-<n>`), content type
application/octet-stream.
"""

import argparse

import pika


def connect(port):
    parameters = pika.ConnectionParameters(
        host="127.0.0.1",
        port=port,
        credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=30,
        blocked_connection_timeout=30,
    )
    return pika.BlockingConnection(parameters)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    commands = parser.add_subparsers(dest="command", required=True)
    publish = commands.add_parser("publish")
    publish.add_argument("queue")
    publish.add_argument("count", type=int)
    publish.add_argument("--prefix", default="m")
    publish.add_argument("--no-message-id", action="store_true")
    publish.add_argument("--header-bytes", type=int, default=0)
    publish.add_argument("--garbage", action="store_true")
    publish.add_argument("--binary-mode", action="store_true")
    publish.add_argument("--exchange", default="")
    publish.add_argument("--routing-key")
    publish.add_argument("--raw-body", action="store_true")
    depth = commands.add_parser("depth")
    depth.add_argument("queue")
    exchange = commands.add_parser("exchange")
    exchange.add_argument("name")
    arguments = parser.parse_args()
    connection = connect(arguments.port)
    channel = connection.channel()
    if arguments.command == "exchange":
        channel.exchange_declare(
            exchange=arguments.name, exchange_type="topic", durable=True
        )
    elif arguments.command == "depth" or not arguments.exchange:
        channel.queue_declare(queue=arguments.queue, durable=True)

    if arguments.command == "publish":
        channel.confirm_delivery()
        for number in range(arguments.count):
            name = f"{arguments.prefix}-{number}"
            headers = {"tenant": "acme", "nested": {"list": [1, "two", {"flag": True}]}}
            if arguments.header_bytes:
                headers["big"] = "x" * arguments.header_bytes
            content_type = "text/plain"
            body = name.encode()
            if arguments.raw_body:
                content_type = "application/octet-stream"
                body = b"\xff\xfe" + body
            if arguments.garbage:
                content_type = "application/cloudevents+json"
            if arguments.binary_mode:
                headers.update(
                    {
                        "cloudEvents:specversion": "1.0",
                        "cloudEvents:id": f"ce-{name}",
                        "cloudEvents:source": "/producers/pika",
                        "cloudEvents:type": "com.example.binary",
                        "cloudEvents:subject": name,
                    }
                )
            properties = pika.BasicProperties(
                content_type=content_type,
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=None if arguments.no_message_id else name,
                headers=headers,
            )
            channel.basic_publish(
                exchange=arguments.exchange,
                routing_key=arguments.routing_key or arguments.queue,
                body=body,
                properties=properties,
                mandatory=not arguments.exchange,
            )
    elif arguments.command == "depth":
        declared = channel.queue_declare(queue=arguments.queue, durable=True, passive=True)
        print(declared.method.message_count)
    connection.close()


if __name__ == "__main__":
    main()
