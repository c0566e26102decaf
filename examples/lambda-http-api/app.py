"""A handler written for an AWS Lambda function URL (or API Gateway's HTTP API):
it reads the request in payload format 2.0 and answers with a status, headers,
cookies and a body. Switchyard serves it at a route, unchanged."""

import json


def handler(event, context):
    method = event["requestContext"]["http"]["method"]
    query = event.get("queryStringParameters") or {}
    if method == "GET":
        name = query.get("name", "world")
        return {
            "statusCode": 200,
            "headers": {"content-type": "application/json"},
            "body": json.dumps({"hello": name, "path": event["rawPath"]}),
        }
    if method == "POST":
        try:
            order = json.loads(event.get("body") or "{}")
        except json.JSONDecodeError:
            return {"statusCode": 400, "body": "the body is not JSON"}
        if "order" not in order:
            return {"statusCode": 422, "body": "no `order` in the body"}
        print(f"order {order['order']} (request {event['requestContext']['requestId']})")
        return {
            "statusCode": 201,
            "headers": {"content-type": "application/json", "location": f"/api/orders/{order['order']}"},
            "cookies": ["last-order=" + str(order["order"]) + "; Path=/; Max-Age=3600"],
            "body": json.dumps({"accepted": order["order"], "request_id": context.aws_request_id}),
        }
    return {"statusCode": 405, "headers": {"allow": "GET, POST"}, "body": ""}
