"""Invokes one function with boto3 from several threads without pause, as callers of
a function being deployed do, and prints one JSON line per call: whether the call
started after the test said the update finished, and the answer's `version` or the
error. Arguments: endpoint, function, callers, the file whose existence means "the
update finished", and how many calls each caller makes after it before stopping.
Prints `started` on stderr once every caller has had an answer."""

import json
import os
import sys
import threading

import boto3
from botocore.config import Config

endpoint, function, callers, updated_marker, calls_after = sys.argv[1:6]
callers, calls_after = int(callers), int(calls_after)
client = boto3.client(
    "lambda",
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
    config=Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=callers,
        read_timeout=60,
    ),
)
results = [[] for _ in range(callers)]
answered = threading.Barrier(callers + 1)


def caller(index):
    after = 0
    first = True
    while after < calls_after:
        started_after = os.path.exists(updated_marker)
        try:
            answer = client.invoke(FunctionName=function, Payload=b"{}")
            payload = json.loads(answer["Payload"].read() or b"null")
            if "FunctionError" in answer:
                result = {"error": "FunctionError", "detail": payload}
            else:
                result = {"version": payload.get("version"), "pid": payload.get("pid")}
        except Exception as error:  # every failure is a result the test reports
            result = {"error": type(error).__name__, "detail": str(error)}
        result["after_update"] = started_after
        results[index].append(result)
        if first:
            first = False
            answered.wait()
        if started_after:
            after += 1


threads = [threading.Thread(target=caller, args=(index,)) for index in range(callers)]
for thread in threads:
    thread.start()
answered.wait()
print("started", file=sys.stderr, flush=True)
for thread in threads:
    thread.join()
for per_caller in results:
    for result in per_caller:
        print(json.dumps(result))
