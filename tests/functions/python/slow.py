"""A function whose init never finishes in time: importing it sleeps."""

import time

time.sleep(60)


def handler(event, context):
    return {}
