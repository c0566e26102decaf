"""A handler written for AWS Lambda's Python runtime. Switchyard runs it unchanged
through AWS's runtime interface client (`python3 -m awslambdaric app.handler`), the
same way Lambda's own Python images do."""

import json


def handler(event, context):
    # The event is the CloudEvent, as structured JSON; a webhook's JSON body is its
    # `data`.
    order = (event.get("data") or {}).get("order")
    print(f"order {order} from {event['source']} (event {event['id']})")
    if order is None:
        raise ValueError("the webhook body has no `order`")
    return {
        "accepted": order,
        "function": context.function_name,
        "request_id": context.aws_request_id,
        "remaining_ms": context.get_remaining_time_in_millis(),
    }
