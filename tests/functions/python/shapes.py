"""Handlers written for AWS Lambda that read their events with Powertools for AWS
Lambda (AWS's own parsers): each writes what it read, as one JSON line per record, to
$SEEN_FILE, so a test compares it with what was uploaded, produced or requested."""

import base64
import json
import os

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes import (
    APIGatewayProxyEventV2,
    EventBridgeEvent,
    S3Event,
)
from aws_lambda_powertools.utilities.data_classes.kafka_event import KafkaEventRecord
from aws_lambda_powertools.utilities.data_classes.rabbit_mq_event import RabbitMQEvent


def _seen(line):
    with open(os.environ["SEEN_FILE"], "a") as seen:
        seen.write(json.dumps(line) + "\n")


def _b64(data):
    return None if data is None else base64.b64encode(data).decode()


def s3(event, context):
    parsed = S3Event(event)
    for record in parsed.records:
        _seen(
            {
                "bucket": record.s3.bucket.name,
                # What a handler does with a notification's key: Powertools'
                # object_key / unquote_plus of the URL-encoded key.
                "key": S3Event({"Records": [record.raw_event]}).object_key,
                "size": record.s3.get_object.size,
                "etag": record.s3.get_object.etag,
                "event_name": record.event_name,
                "event_source": record.event_source,
                "records_in_event": len(list(parsed.records)),
            }
        )
    return {"ok": True}


_batch_size = 0


def _kafka_record(record: KafkaEventRecord):
    _seen(
        {
            "batch_size": _batch_size,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "timestamp_type": record.timestamp_type,
            "key": _b64(record.decoded_key),
            "value": _b64(record.decoded_value),
            "headers": [
                [name, _b64(bytes(value))]
                for header in record.headers
                for name, value in header.items()
            ],
        }
    )
    if record.decoded_value == b"fail":
        raise ValueError("this record fails")


processor = BatchProcessor(event_type=EventType.Kafka)


def kafka(event, context):
    global _batch_size
    assert event["eventSource"] == "SelfManagedKafka", event
    _batch_size = sum(len(records) for records in event["records"].values())
    return process_partial_response(
        event=event, record_handler=_kafka_record, processor=processor, context=context
    )


def hook(event, context):
    request = APIGatewayProxyEventV2(event)
    _seen(
        {
            "method": request.request_context.http.method,
            "raw_path": request.raw_path,
            "raw_query_string": request.raw_query_string,
            "query": request.query_string_parameters,
            "headers": dict(request.headers),
            "body": request.decoded_body,
            "is_base64_encoded": request.is_base64_encoded,
            "source_ip": request.request_context.http.source_ip,
            "request_id": request.request_context.request_id,
        }
    )
    return {"statusCode": 200}


def scheduled(event, context):
    parsed = EventBridgeEvent(event)
    _seen(
        {
            "id": parsed.get_id,
            "version": parsed.version,
            "account": parsed.account,
            "time": parsed.time,
            "region": parsed.region,
            "resources": parsed.resources,
            "source": parsed.source,
            "detail_type": parsed.detail_type,
            "detail": parsed.detail,
        }
    )


def _sqs_record(record):
    _seen(
        {
            "batch_size": _batch_size,
            "message_id": record.message_id,
            "receipt_handle": record.receipt_handle,
            "body": record.body,
            "receive_count": record.attributes.approximate_receive_count,
            "sent_timestamp": record.attributes.sent_timestamp,
            "group": record.attributes.message_group_id,
            "content_type": record.message_attributes["content-type"].string_value,
            "event_source": record.event_source,
            "event_source_arn": record.event_source_arn,
            "aws_region": record.aws_region,
        }
    )
    if "poison" in record.body:
        raise ValueError("this message fails")


sqs_processor = BatchProcessor(event_type=EventType.SQS)


def sqs(event, context):
    global _batch_size
    _batch_size = len(event["Records"])
    return process_partial_response(
        event=event, record_handler=_sqs_record, processor=sqs_processor, context=context
    )


def rabbitmq(event, context):
    parsed = RabbitMQEvent(event)
    for queue, messages in parsed.rmq_messages_by_queue.items():
        for message in messages:
            properties = message.basic_properties
            _seen(
                {
                    "event_source": parsed.event_source,
                    "event_source_arn": parsed.event_source_arn,
                    "queue": queue,
                    "batch_size": len(messages),
                    "data": message.decoded_data,
                    "redelivered": message.redelivered,
                    "content_type": properties.content_type,
                    "message_id": properties.message_id,
                    "delivery_mode": properties.delivery_mode,
                    "headers": properties.headers,
                    "body_size": properties.body_size,
                }
            )
