"""A function whose init fails: importing it raises. Counts its starts like app.py."""

import os

_starts = os.environ.get("STARTS_FILE")
if _starts:
    with open(_starts, "a") as starts:
        starts.write(f"{os.getpid()}\n")

raise RuntimeError("missing configuration: DATABASE_URL is not set")


def handler(event, context):
    return {}
