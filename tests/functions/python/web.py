"""A handler behind a function URL, written for AWS Lambda: it reads the request with
Powertools' APIGatewayProxyEventV2 (AWS's own parser of payload format 2.0) and
answers by the last segment of the path."""

import base64
import json
import time

from aws_lambda_powertools.utilities.data_classes import APIGatewayProxyEventV2


def handler(event, context):
    request = APIGatewayProxyEventV2(event)
    action = request.raw_path.rstrip("/").rsplit("/", 1)[-1]
    if action == "echo":
        # Text bodies as Powertools decodes them; binary ones (which its
        # decoded_body would read as UTF-8) decoded here and given back in base64.
        if request.is_base64_encoded:
            body = base64.b64encode(base64.b64decode(request.body, validate=True)).decode()
        else:
            body = request.decoded_body
        seen = {
            "version": request.version,
            "route_key": request.route_key,
            "method": request.request_context.http.method,
            "raw_path": request.raw_path,
            "path": request.request_context.http.path,
            "raw_query_string": request.raw_query_string,
            "query": request.query_string_parameters,
            "cookies": request.cookies,
            "headers": dict(request.headers),
            "body": body,
            "is_base64_encoded": request.is_base64_encoded,
            "source_ip": request.request_context.http.source_ip,
            "user_agent": request.request_context.http.user_agent,
            "protocol": request.request_context.http.protocol,
            "domain_name": request.request_context.domain_name,
            "stage": request.request_context.stage,
            "request_id": request.request_context.request_id,
            "time_epoch": request.request_context.time_epoch,
            "aws_request_id": context.aws_request_id,
        }
        return {
            "statusCode": 201,
            "headers": {"content-type": "application/json", "x-handled-by": "web.py"},
            "cookies": ["session=abc; Path=/", "theme=dark; Max-Age=60"],
            "body": json.dumps(seen),
        }
    if action == "plain":
        return {"hello": "world"}
    if action == "binary":
        return {
            "statusCode": 200,
            "headers": {"content-type": "application/octet-stream"},
            "body": base64.b64encode(bytes(range(256))).decode(),
            "isBase64Encoded": True,
        }
    if action == "raise":
        raise ValueError("the handler failed on purpose")
    if action == "garbage":
        return {"statusCode": "not a status"}
    if action == "sleep":
        time.sleep(float(request.query_string_parameters["seconds"]))
        return {"slept": True}
    return {"statusCode": 404, "body": "no such action"}
