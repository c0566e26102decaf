"""An S3-triggered handler as written for AWS Lambda: it reads the notification's
records (the key URL-encoded, as S3 writes it). Switchyard runs it unchanged on
uploads to MinIO or any S3-compatible store, with `payload = "aws"`."""

import urllib.parse


def handler(event, context):
    for record in event["Records"]:
        bucket = record["s3"]["bucket"]["name"]
        key = urllib.parse.unquote_plus(record["s3"]["object"]["key"], encoding="utf-8")
        size = record["s3"]["object"].get("size")
        print(f"{record['eventName']}: s3://{bucket}/{key} ({size} bytes)")
        # To read the object, use boto3 as on AWS: with AWS_ENDPOINT_URL_S3 and the
        # store's credentials in the function's environment it reaches the store.
    return {"objects": len(event["Records"])}
