'use strict';
// Benchmark peer: a gateway written the way the project's original design wrote its own
// (Node, Express, axios, a per-request task counter in Redis), so bench/gateway.py can set
// the Tornado gateway beside the stack the design started from. Only what that hot path
// did is here: round robin over the authen instances, INCR before / DECR after on the
// instance's counter in the stack's plain Redis (503 over the limit), the request id
// passed on. No token check, breakers or retries, which the original did not do per
// request either.
//
// Environment: PORT, AUTHEN_UPSTREAMS (host:port,host:port), REDIS_URL,
// TASK_LIMIT_PER_SERVICE (64, as the Tornado gateway), TIMEOUT_MS (2000).

const http = require('node:http');
const crypto = require('node:crypto');
const express = require('express');
const axios = require('axios');
const { createClient } = require('redis');

function intEnv(name, fallback) {
  const value = Number.parseInt(process.env[name] ?? '', 10);
  return Number.isFinite(value) ? value : fallback;
}

const PORT = intEnv('PORT', 8081);
const TASK_LIMIT_PER_SERVICE = intEnv('TASK_LIMIT_PER_SERVICE', 64);
const TIMEOUT_MS = intEnv('TIMEOUT_MS', 2000);
const UPSTREAMS = (process.env.AUTHEN_UPSTREAMS ?? '').split(',').map((s) => s.trim()).filter(Boolean);
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379/0';
// Its own key space, so a bench run never disturbs the Tornado gateway's counters.
const TASK_KEY_PREFIX = 'barber:bench:express:tasks:';
const REQUEST_ID = 'x-request-id';
// Connection-level headers describe one hop; they are never passed on.
const HOP_BY_HOP = new Set([
  'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'te', 'trailer',
  'transfer-encoding', 'upgrade', 'host', 'content-length',
]);

if (UPSTREAMS.length === 0) {
  console.error('AUTHEN_UPSTREAMS is empty: nothing to proxy to');
  process.exit(2);
}

const redis = createClient({ url: REDIS_URL });
// Without a listener an 'error' event would end the process; a request meeting a
// Redis outage answers 503 below instead.
redis.on('error', (err) => console.error('redis:', err.message));

// Keep-alive connections to the instances, as nginx's upstream keepalive and the Tornado
// gateway's client keep them: a new TCP connection per request would measure the kernel.
const agent = new http.Agent({ keepAlive: true, maxSockets: 256, maxFreeSockets: 256 });
const upstream = axios.create({
  httpAgent: agent,
  timeout: TIMEOUT_MS,
  // Bytes in, bytes out: the body goes back exactly as the instance sent it.
  responseType: 'arraybuffer',
  transformResponse: [],
  decompress: false,
  maxRedirects: 0,
  // Every status of the instance is the client's answer, not an exception.
  validateStatus: () => true,
});

let next = 0;
function pickUpstream() {
  const target = UPSTREAMS[next];
  next = (next + 1) % UPSTREAMS.length;
  return target;
}

function forwardHeaders(req, requestId) {
  const headers = {};
  for (const [name, value] of Object.entries(req.headers)) {
    if (!HOP_BY_HOP.has(name)) headers[name] = value;
  }
  headers[REQUEST_ID] = requestId;
  headers['x-forwarded-for'] = req.socket.remoteAddress ?? '';
  return headers;
}

const app = express();
app.disable('x-powered-by');
// The instance's own ETag (if any) is passed on; Express must not compute another.
app.set('etag', false);

app.get('/status', (_req, res) => {
  res.json({ status: 'ok', upstreams: UPSTREAMS.length });
});

app.use('/authen', express.raw({ type: () => true, limit: '1mb' }), async (req, res) => {
  const requestId = req.get(REQUEST_ID) || crypto.randomUUID();
  res.set('X-Request-ID', requestId);
  const target = pickUpstream();
  const taskKey = TASK_KEY_PREFIX + target;
  let counted = false;
  try {
    let inFlight;
    try {
      inFlight = await redis.incr(taskKey);
    } catch (err) {
      res.status(503).json({ detail: `The task counter is unavailable (${err.message}); try again later.` });
      return;
    }
    counted = true;
    if (inFlight > TASK_LIMIT_PER_SERVICE) {
      res.status(503).set('Retry-After', '1')
        .json({ detail: `authen at ${target} is busy (task limit ${TASK_LIMIT_PER_SERVICE} reached); try again later.` });
      return;
    }
    const reply = await upstream.request({
      method: req.method,
      url: `http://${target}${req.url}`,
      headers: forwardHeaders(req, requestId),
      data: Buffer.isBuffer(req.body) && req.body.length > 0 ? req.body : undefined,
    });
    for (const [name, value] of Object.entries(reply.headers)) {
      if (!HOP_BY_HOP.has(name) && name !== REQUEST_ID) res.set(name, value);
    }
    res.status(reply.status).send(Buffer.from(reply.data));
  } catch (err) {
    const timedOut = err.code === 'ECONNABORTED' || err.code === 'ETIMEDOUT';
    res.status(timedOut ? 504 : 502)
      .json({ detail: timedOut ? `authen at ${target} did not answer in ${TIMEOUT_MS} ms.` : `authen at ${target} failed: ${err.message}` });
  } finally {
    if (counted) {
      // The client has its answer already; a failed release only skews the counter.
      redis.decr(taskKey).catch((err) => console.error('redis decr:', err.message));
    }
  }
});

async function main() {
  await redis.connect();
  const server = app.listen(PORT, '127.0.0.1', () => {
    console.log(`express gateway on http://127.0.0.1:${PORT} -> ${UPSTREAMS.join(', ')}`);
  });
  server.keepAliveTimeout = 65_000;
  const shutdown = () => {
    server.close(() => {
      redis.close().finally(() => process.exit(0));
    });
    server.closeIdleConnections();
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

main().catch((err) => {
  console.error('express gateway failed to start:', err);
  process.exit(1);
});
