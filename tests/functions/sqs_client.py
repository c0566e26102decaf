"""boto3 against an SQS-compatible server, for the SQS source's tests and benchmark.

    sqs_client.py ENDPOINT create NAME [--fifo] [--visibility SECONDS]   prints the URL
    sqs_client.py ENDPOINT send URL COUNT [--prefix P] [--groups N] [--attributes N]
                                      [--attribute-bytes B] [--cloudevent-garbage]
    sqs_client.py ENDPOINT depth URL     prints visible + in-flight messages
    sqs_client.py ENDPOINT visible URL   prints visible messages (not in flight)

`send` sends COUNT messages in batches of 10 with bodies `<prefix>-<n>`; with
--groups (a FIFO queue) message n is in group `g<n % groups>`; every message has a
`content-type` attribute `text/plain`, plus --attributes String attributes of
--attribute-bytes each; --cloudevent-garbage marks the bodies as structured
CloudEvents although they are not. Prints the message ids, one per line.
"""

import argparse

import boto3


def client(endpoint):
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create")
    create.add_argument("name")
    create.add_argument("--fifo", action="store_true")
    create.add_argument("--visibility", type=int, default=30)
    send = commands.add_parser("send")
    send.add_argument("url")
    send.add_argument("count", type=int)
    send.add_argument("--prefix", default="m")
    send.add_argument("--groups", type=int, default=0)
    send.add_argument("--attributes", type=int, default=0)
    send.add_argument("--attribute-bytes", type=int, default=16)
    send.add_argument("--cloudevent-garbage", action="store_true")
    depth = commands.add_parser("depth")
    depth.add_argument("url")
    visible = commands.add_parser("visible")
    visible.add_argument("url")
    arguments = parser.parse_args()
    sqs = client(arguments.endpoint)

    if arguments.command == "create":
        attributes = {"VisibilityTimeout": str(arguments.visibility)}
        name = arguments.name
        if arguments.fifo:
            name += ".fifo"
            attributes["FifoQueue"] = "true"
            attributes["ContentBasedDeduplication"] = "true"
        print(sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])
    elif arguments.command == "send":
        content_type = (
            "application/cloudevents+json" if arguments.cloudevent_garbage else "text/plain"
        )
        for start in range(0, arguments.count, 10):
            entries = []
            for number in range(start, min(start + 10, arguments.count)):
                attributes = {
                    "content-type": {"DataType": "String", "StringValue": content_type}
                }
                for index in range(arguments.attributes):
                    attributes[f"big{index}"] = {
                        "DataType": "String",
                        "StringValue": "x" * arguments.attribute_bytes,
                    }
                entry = {
                    "Id": str(number - start),
                    "MessageBody": f"{arguments.prefix}-{number}",
                    "MessageAttributes": attributes,
                }
                if arguments.groups:
                    entry["MessageGroupId"] = f"g{number % arguments.groups}"
                entries.append(entry)
            answer = sqs.send_message_batch(QueueUrl=arguments.url, Entries=entries)
            if answer.get("Failed"):
                raise SystemExit(f"send failed: {answer['Failed']}")
            for sent in answer["Successful"]:
                print(sent["MessageId"])
    elif arguments.command == "depth":
        attributes = sqs.get_queue_attributes(
            QueueUrl=arguments.url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
            ],
        )["Attributes"]
        print(
            int(attributes["ApproximateNumberOfMessages"])
            + int(attributes["ApproximateNumberOfMessagesNotVisible"])
        )
    elif arguments.command == "visible":
        attributes = sqs.get_queue_attributes(
            QueueUrl=arguments.url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]
        print(int(attributes["ApproximateNumberOfMessages"]))


if __name__ == "__main__":
    main()
