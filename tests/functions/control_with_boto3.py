"""Calls Lambda's control-plane API with boto3, as a deploy script would, and prints
one JSON line per call: its answer, or the error code and message. Arguments: the
endpoint, then a JSON list of calls `{"op": "create_function", "args": {...}}`; an
argument `ZipFileBase64` becomes `Code={"ZipFile": <bytes>}` (create) or `ZipFile`
(update_function_code)."""

import base64
import json
import sys

import boto3
from botocore.config import Config

endpoint, calls = sys.argv[1], json.loads(sys.argv[2])
client = boto3.client(
    "lambda",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
    config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
)
for call in calls:
    args = dict(call.get("args", {}))
    if "ZipFileBase64" in args:
        zip_bytes = base64.b64decode(args.pop("ZipFileBase64"))
        if call["op"] == "create_function":
            args["Code"] = {"ZipFile": zip_bytes}
        else:
            args["ZipFile"] = zip_bytes
    try:
        answer = getattr(client, call["op"])(**args)
        answer.pop("ResponseMetadata", None)
        if "Payload" in answer:
            answer["Payload"] = json.loads(answer["Payload"].read() or b"null")
        print(json.dumps({"ok": answer}, default=str))
    except client.exceptions.ClientError as error:
        print(
            json.dumps(
                {
                    "error": error.response["Error"]["Code"],
                    "message": error.response["Error"].get("Message", ""),
                    "status": error.response["ResponseMetadata"].get("HTTPStatusCode"),
                }
            )
        )
