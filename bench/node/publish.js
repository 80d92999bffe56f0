// The publish workload's non-Python ceiling (benchmarks.md, 5): node bench/node/publish.js WINDOW N [QUEUE].
//
// amqplib on a confirm channel publishes N persistent messages the size and shape of magne's (the body
// magne's `incr.send()` makes, {"func":"incr","args":[],"id":<32 hex>}, with its content type and message id)
// through the queue's exchange, as magne does, with at most WINDOW unconfirmed at once: 1,000 is the broker's
// confirmed rate on this machine, 1 is one round trip plus fsync per message (the floor of a single sending
// thread). The connection has TCP_NODELAY, as magne's has (amqplib's default leaves Nagle on, and its handshake
// then stalls ~45 ms on delayed acks). Timed from the first publish to the last confirm: the broker's rate,
// without the connection's set-up (connect_s, reported apart; magne's figures include its own connection and
// declarations, a few ms, so the ratios are if anything strict on magne). Prints one JSON line, as
// bench/publish.py does.
"use strict";

const crypto = require("node:crypto");
const amqp = require("amqplib");

const URL = process.env.BENCH_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2F";

function cpuSeconds(since) {
  const u = process.cpuUsage(since);
  return (u.user + u.system) / 1e6;
}

async function main() {
  const window = Number.parseInt(process.argv[2], 10);
  const n = Number.parseInt(process.argv[3], 10);
  const queue = process.argv[4] || "bench-magne";
  if (!(window >= 1 && n >= 1)) throw new Error("usage: publish.js WINDOW N [QUEUE]");

  const tConnect = process.hrtime.bigint();
  const conn = await amqp.connect(URL, { noDelay: true });
  const ch = await conn.createConfirmChannel();
  const c0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();

  await new Promise((resolve, reject) => {
    let sent = 0;
    let confirmed = 0;
    let blocked = false; // the socket's buffer is full: wait for 'drain' before writing more
    const onConfirm = (err) => {
      if (err) {
        reject(new Error(`message nacked: ${err}`));
        return;
      }
      confirmed += 1;
      if (confirmed === n) resolve();
      else if (!blocked) fill();
    };
    const fill = () => {
      while (sent < n && sent - confirmed < window) {
        const id = crypto.randomBytes(16).toString("hex");
        const body = Buffer.from(JSON.stringify({ func: "incr", args: [], id }));
        sent += 1;
        const ok = ch.publish(queue, queue, body,
          { persistent: true, contentType: "application/json", messageId: id }, onConfirm);
        if (!ok) {
          blocked = true;
          ch.once("drain", () => {
            blocked = false;
            fill();
          });
          return;
        }
      }
    };
    ch.on("error", reject);
    fill();
  });

  const elapsed = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpuS = cpuSeconds(c0);
  const out = {
    elapsed,
    cpu_s: cpuS,
    peak_rss_mb: process.resourceUsage().maxRSS / 1024,
    connect_s: Number(t0 - tConnect) / 1e9,
  };
  await conn.close();
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
