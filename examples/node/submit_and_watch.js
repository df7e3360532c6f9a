#!/usr/bin/env node
// Submit a batchq job and watch it to the end: a client in Node.js (amqplib).
//
//     node submit_and_watch.js JOBSPEC.json
//
// Publishes the JobSpec to {ns}.jobs (routing key "submit": persistent, content type JSON,
// messageId the job id, on a confirm channel, waiting for the broker's confirm), then follows
// the job's JobStatus messages on {ns}.status through a private queue bound to
// "job.{job_id}.*" until one is terminal.
//
// Progress goes to stderr; stdout gets the final JobStatus as one line of JSON. Exit status:
// 0 when the job succeeded, 1 when it ended otherwise, 2 on an error.
//
// Settings (environment): AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f; a
// comma-separated list is tried in turn), BATCHQ_NAMESPACE (default batchq),
// WATCH_TIMEOUT_S (default 600).
//
// Needs amqplib: `npm ci` in this folder.
'use strict';

const fs = require('node:fs');
const crypto = require('node:crypto');
const amqp = require('amqplib');

const TERMINAL = new Set(['succeeded', 'failed', 'cancelled', 'rejected']);

function log(message) {
  process.stderr.write(`${message}\n`);
}

async function connect(urls) {
  const problems = [];
  for (const url of urls.split(',').map((u) => u.trim()).filter(Boolean)) {
    try {
      return await amqp.connect(url);
    } catch (e) {
      problems.push(`${url.split('@').pop()}: ${e.message}`);
    }
  }
  throw new Error(`cannot reach the broker: ${problems.join('; ')}`);
}

async function main() {
  if (process.argv.length !== 3) {
    throw new Error('usage: node submit_and_watch.js JOBSPEC.json');
  }
  const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  // The job id is the idempotency key: publishing the same JobSpec again is harmless.
  spec.job_id ??= crypto.randomUUID();
  const jobId = spec.job_id;
  const ns = process.env.BATCHQ_NAMESPACE || 'batchq';
  const timeoutMs = 1000 * Number(process.env.WATCH_TIMEOUT_S || 600);

  const connection = await connect(
    process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f',
  );
  try {
    const channel = await connection.createConfirmChannel();
    // Listen before submitting, so that no status is missed.
    const { queue } = await channel.assertQueue('', { exclusive: true, autoDelete: true });
    await channel.bindQueue(queue, `${ns}.status`, `job.${jobId}.*`);
    const ended = watch(channel, queue, jobId, timeoutMs);

    let unroutable = null;
    channel.on('return', () => {
      unroutable = new Error(`no queue took the JobSpec on ${ns}.jobs: has batchq run in namespace ${ns}?`);
    });
    channel.publish(`${ns}.jobs`, 'submit', Buffer.from(JSON.stringify(spec)), {
      persistent: true,
      contentType: 'application/json',
      messageId: jobId,
      mandatory: true,
    });
    // Rejects when the broker nacks the message.
    await channel.waitForConfirms();
    if (unroutable) throw unroutable;
    log(`submitted ${jobId}`);

    const status = await ended;
    log(
      `${jobId}: ${status.state}, ${status.ops_succeeded} succeeded and ` +
        `${status.ops_failed} failed of ${status.ops_total}` +
        (status.error ? `: ${status.error}` : ''),
    );
    process.stdout.write(`${JSON.stringify(status)}\n`);
    return status.state === 'succeeded' ? 0 : 1;
  } finally {
    await connection.close();
  }
}

// Resolves with the first terminal status of the job.
function watch(channel, queue, jobId, timeoutMs) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`job ${jobId} did not end within ${timeoutMs / 1000} s`)),
      timeoutMs,
    );
    let latest = null;
    channel
      .consume(
        queue,
        (message) => {
          if (message === null) {
            reject(new Error('the status subscription was cancelled'));
            return;
          }
          const status = JSON.parse(message.content.toString('utf8'));
          // A status of a later redrive supersedes every earlier one.
          if (latest && (status.redrives ?? 0) < (latest.redrives ?? 0)) return;
          latest = status;
          log(
            `${status.state}: ${status.ops_succeeded + status.ops_failed}/${status.ops_total} ` +
              `done, ${status.ops_failed} failed`,
          );
          if (TERMINAL.has(status.state)) {
            clearTimeout(timer);
            resolve(status);
          }
        },
        { noAck: true },
      )
      .catch(reject);
  });
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    log(`submit_and_watch: ${e.message}`);
    process.exitCode = 2;
  },
);
