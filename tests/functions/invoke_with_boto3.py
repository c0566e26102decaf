"""Calls Lambda's Invoke API with boto3, as any existing caller would, and prints
what came back as one JSON line. Arguments: endpoint, function name, invocation
type, payload (JSON text), and optionally `Tail` for the log."""

import base64
import json
import os
import sys

import boto3
from botocore.config import Config

endpoint, function, invocation_type, payload = sys.argv[1:5]
log_type = sys.argv[5] if len(sys.argv) > 5 else "None"
client = boto3.client(
    "lambda",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id=os.environ.get("INVOKE_ACCESS_KEY_ID", "test"),
    aws_secret_access_key=os.environ.get("INVOKE_SECRET_ACCESS_KEY", "test"),
    config=Config(retries={"mode": "standard", "total_max_attempts": 1}),
)
try:
    response = client.invoke(
        FunctionName=function,
        InvocationType=invocation_type,
        LogType=log_type,
        Payload=payload.encode(),
    )
except client.exceptions.ResourceNotFoundException as error:
    print(json.dumps({"error": "ResourceNotFoundException", "message": str(error)}))
    sys.exit(0)
except client.exceptions.ClientError as error:
    print(json.dumps({"error": error.response["Error"]["Code"], "message": str(error)}))
    sys.exit(0)
body = response["Payload"].read()
print(
    json.dumps(
        {
            "StatusCode": response["StatusCode"],
            "FunctionError": response.get("FunctionError"),
            "ExecutedVersion": response.get("ExecutedVersion"),
            "RequestId": response["ResponseMetadata"].get("RequestId"),
            "Payload": json.loads(body) if body else None,
            "Log": base64.b64decode(response["LogResult"]).decode()
            if "LogResult" in response
            else None,
        }
    )
)
