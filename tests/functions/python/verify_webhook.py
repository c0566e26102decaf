"""Verifies one request the way a function would, with the Standard Webhooks
library: reads {"secret", "headers": {name: value}, "body": base64} on stdin, prints
"verified" and exits 0, or prints why not and exits 1."""

import base64
import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

request = json.load(sys.stdin)
body = base64.b64decode(request["body"])
try:
    Webhook(request["secret"]).verify(body, request["headers"], json_parse=False)
except WebhookVerificationError as error:
    print(f"not verified: {error}")
    sys.exit(1)
print("verified")
