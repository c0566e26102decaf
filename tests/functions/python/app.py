"""Handlers of the managed-function tests, written for AWS Lambda (awslambdaric runs
them unchanged). Each instance appends its pid to $STARTS_FILE when it starts, so a
test counts cold starts."""

import json
import os
import subprocess
import time

_starts = os.environ.get("STARTS_FILE")
if _starts:
    with open(_starts, "a") as starts:
        starts.write(f"{os.getpid()}\n")


def _data(event):
    data = event.get("data")
    return data if isinstance(data, dict) else {}


def handler(event, context):
    entered_us = time.time_ns() // 1000
    data = _data(event)
    action = data.get("action", "echo")
    if action == "echo":
        print(f"echoing {event.get('id')}")
        return {
            "echo": data,
            "event_id": event.get("id"),
            "function": context.function_name,
            "memory": context.memory_limit_in_mb,
            "arn": context.invoked_function_arn,
            "request_id": context.aws_request_id,
            "pid": os.getpid(),
            "entered_us": entered_us,
        }
    if action == "spam":
        # Prints as fast as it can (the noisy neighbour of the function-log tests).
        for number in range(int(data["lines"])):
            print(f"spam {event.get('id')} {number} " + "x" * 100)
        return {"printed": data["lines"]}
    if action == "fail_once":
        # Prints the trace header Lambda passes (_X_AMZN_TRACE_ID); the first attempt
        # fails, the retry answers.
        print(f"trace {os.environ.get('_X_AMZN_TRACE_ID')}")
        marker = data["marker"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("failing once")
        return {"trace": os.environ.get("_X_AMZN_TRACE_ID")}
    if action == "print_rate":
        # Prints `rate` lines a second (100 at a time) for `seconds`.
        rate, seconds = int(data["rate"]), float(data["seconds"])
        started = time.monotonic()
        printed = 0
        while time.monotonic() - started < seconds:
            due = int((time.monotonic() - started) * rate)
            while printed < due:
                for _ in range(min(100, due - printed)):
                    print(f"noise {event.get('id')} {printed} " + "x" * 100)
                    printed += 1
            time.sleep(0.005)
        while printed < int(rate * seconds):
            print(f"noise {event.get('id')} {printed} " + "x" * 100)
            printed += 1
        return {"printed": printed}
    if action == "raise":
        raise ValueError(f"bad input: {data.get('value')}")
    if action == "sleep":
        time.sleep(float(data["seconds"]))
        return {"slept": data["seconds"], "pid": os.getpid()}
    if action == "exit_once":
        # The first attempt kills its own runtime; the retry answers.
        marker = data["marker"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        return {"survived": True, "pid": os.getpid()}
    if action == "hang_once":
        # The first attempt starts a child that outlives nothing, then hangs past the
        # deadline; the retry answers.
        marker = data["marker"]
        if not os.path.exists(marker):
            child = subprocess.Popen(["sleep", "600"])
            with open(marker, "w") as out:
                out.write(str(child.pid))
            time.sleep(600)
        return {"recovered": True, "pid": os.getpid()}
    if action == "spawn_then_sleep":
        # Starts a child once (its pid in the marker), then works for a while.
        marker = data["marker"]
        if not os.path.exists(marker):
            child = subprocess.Popen(["sleep", "600"])
            with open(marker, "w") as out:
                out.write(str(child.pid))
        time.sleep(float(data["seconds"]))
        return {"slept": data["seconds"], "pid": os.getpid()}
    if action == "spawn_family":
        # Starts `sleep 600` children every way a program can (all but the first
        # without the owner mark in their environment: nothing finds them by it),
        # writes their pids and its own to `pids`, then works for `seconds`.
        clean = {
            name: value
            for name, value in os.environ.items()
            if name != "SWITCHYARD_INSTANCE_OWNER"
        }
        pids = [os.getpid()]
        # In the instance's process group.
        pids.append(subprocess.Popen(["sleep", "600"]).pid)
        # In a session (and process group) of its own.
        pids.append(subprocess.Popen(["sleep", "600"], start_new_session=True, env=clean).pid)
        # Double-forked (the shell between exits at once): an orphan in the instance's
        # process group, and one in a session of its own.
        for command in ["sleep 600", "setsid sleep 600"]:
            shell = subprocess.run(
                ["sh", "-c", f"{command} >/dev/null 2>&1 </dev/null & echo $!"],
                env=clean,
                capture_output=True,
                text=True,
                check=True,
            )
            pids.append(int(shell.stdout.strip()))
        partial = data["pids"] + ".partial"
        with open(partial, "w") as out:
            out.write("".join(f"{pid}\n" for pid in pids))
        os.rename(partial, data["pids"])
        time.sleep(float(data["seconds"]))
        return {"slept": data["seconds"], "pid": os.getpid()}
    if action == "allocate":
        # Touches every page, so the memory is really used.
        block = bytearray(int(data["mb"]) * 1024 * 1024)
        for index in range(0, len(block), 4096):
            block[index] = 1
        return {"allocated": data["mb"]}
    if action == "meet":
        # Waits (at most 30s) until `count` invocations are in here at once: only
        # concurrent invocations get past it quickly.
        directory = data["dir"]
        with open(os.path.join(directory, f"{os.getpid()}-{event['id']}"), "w"):
            pass
        deadline = time.monotonic() + 30
        while len(os.listdir(directory)) < int(data["count"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"met": len(os.listdir(directory)), "pid": os.getpid()}
    raise RuntimeError(f"unknown action {action}")
