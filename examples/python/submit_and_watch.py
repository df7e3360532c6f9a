#!/usr/bin/env python3
"""Submit a batchq job, watch it to the end, and fetch its results: a client in Python.

    python3 submit_and_watch.py JOBSPEC.json

Publishes the JobSpec to {ns}.jobs (routing key "submit": persistent, content type JSON,
message_id the job id, with a publisher confirm), follows the job's JobStatus messages on
{ns}.status through a private queue bound to "job.{job_id}.*", and once the job has ended
fetches its results from the HTTP API of `batchctl ui`.

Progress goes to stderr; stdout gets the results as JSON Lines, exactly as `batchctl results`
prints them. Exit status: 0 when the job succeeded, 1 when it ended otherwise, 2 on an error.

Settings (environment):
  AMQP_URL            the broker (default amqp://guest:guest@127.0.0.1:5672/%2f; a
                      comma-separated list is tried in turn)
  BATCHQ_NAMESPACE    the deployment's namespace (default batchq)
  BATCHQ_UI_URL       the console serving the API (default http://127.0.0.1:8080)
  BATCHQ_UI_TOKEN     its token, when it has one (sent as Authorization: Bearer)
  WATCH_TIMEOUT_S     how long to wait for the job to end (default 600)

Needs pika (Debian: apt-get install python3-pika; else pip install pika).
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

import pika

TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}


def log(message):
    print(message, file=sys.stderr, flush=True)


def fail(message):
    log(f"submit_and_watch: {message}")
    sys.exit(2)


def connect(urls):
    """A connection to the first broker of the comma-separated list that answers."""
    problems = []
    for url in (u.strip() for u in urls.split(",") if u.strip()):
        try:
            return pika.BlockingConnection(pika.URLParameters(url))
        except pika.exceptions.AMQPError as e:
            problems.append(f"{url.split('@')[-1]}: {e!r}")
    fail(f"cannot reach the broker: {'; '.join(problems)}")


def api_get(path):
    """GET path on the console's HTTP API: the response, or None for a 404."""
    base = os.environ.get("BATCHQ_UI_URL", "http://127.0.0.1:8080").rstrip("/")
    request = urllib.request.Request(base + path)
    token = os.environ.get("BATCHQ_UI_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        return urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        error = json.loads(e.read() or b"{}").get("error", e.reason)
        fail(f"GET {path}: {e.code} {error}")


def main():
    if len(sys.argv) != 2:
        fail(f"usage: {sys.argv[0]} JOBSPEC.json")
    with open(sys.argv[1], "rb") as f:
        spec = json.load(f)
    # The job id is the idempotency key: publishing the same JobSpec again is harmless.
    spec.setdefault("job_id", str(uuid.uuid4()))
    job_id = spec["job_id"]
    ns = os.environ.get("BATCHQ_NAMESPACE", "batchq")
    timeout = float(os.environ.get("WATCH_TIMEOUT_S", "600"))

    connection = connect(os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    channel = connection.channel()

    # Listen before submitting, so that no status is missed.
    statuses = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    try:
        channel.queue_bind(queue=statuses, exchange=f"{ns}.status", routing_key=f"job.{job_id}.*")
    except pika.exceptions.ChannelClosedByBroker as e:
        fail(f"{e.reply_text}: has batchq (or batchctl) run in namespace {ns!r}?")

    channel.confirm_delivery()
    # With confirms on, basic_publish raises if the broker refuses the message or, being
    # mandatory, no queue takes it.
    try:
        channel.basic_publish(
            exchange=f"{ns}.jobs",
            routing_key="submit",
            body=json.dumps(spec).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=job_id,
            ),
            mandatory=True,
        )
    except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as e:
        fail(f"the broker did not take the JobSpec: {e!r}")
    log(f"submitted {job_id}")

    status = watch(channel, statuses, job_id, timeout)
    connection.close()
    log(
        f"{job_id}: {status['state']}, {status['ops_succeeded']} succeeded and "
        f"{status['ops_failed']} failed of {status['ops_total']}"
        + (f": {status['error']}" if status.get("error") else "")
    )
    if status["state"] != "rejected":
        results = api_get(f"/api/v1/jobs/{job_id}/results")
        if results is None:
            fail(f"the console does not know job {job_id}")
        for line in results:
            sys.stdout.write(line.decode())
        sys.stdout.flush()
    return 0 if status["state"] == "succeeded" else 1


def watch(channel, queue, job_id, timeout):
    """Follows the job's statuses until one is terminal, and returns it."""
    deadline = time.monotonic() + timeout
    latest = None
    quiet_since = time.monotonic()
    for _method, _properties, body in channel.consume(queue, auto_ack=True, inactivity_timeout=1):
        now = time.monotonic()
        if now > deadline:
            fail(f"job {job_id} did not end within {timeout:.0f} s")
        if body is None:
            # No status for a while: the job may have ended before we listened (its job id
            # was already known). Ask the API.
            if now - quiet_since > 5:
                quiet_since = now
                answer = api_get(f"/api/v1/jobs/{job_id}")
                current = json.load(answer) if answer else None
                if current and current["state"] in TERMINAL:
                    return current
            continue
        quiet_since = now
        status = json.loads(body)
        # A status of a later redrive supersedes every earlier one.
        if latest and status.get("redrives", 0) < latest.get("redrives", 0):
            continue
        latest = status
        log(
            f"{status['state']}: {status['ops_succeeded'] + status['ops_failed']}"
            f"/{status['ops_total']} done, {status['ops_failed']} failed"
        )
        if status["state"] in TERMINAL:
            return status
    fail("the status subscription ended")


if __name__ == "__main__":
    sys.exit(main())
