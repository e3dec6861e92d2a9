// sockbus's NATS port driven by nats.js (npm `nats`, a client nobody here
// wrote). Run by broker/tests/nats_clients.rs with NODE_PATH pointing at the
// pinned install; same environment and line protocol as client.py:
// `ok <step>`, `WAIT <tag>` (answered with a line on stdin), `ALL OK`.
// Every wait is generous and polls a condition: the machine may be loaded.
"use strict";

const { connect, headers, ErrorCode, StringCodec } = require("nats");
const readline = require("readline");

const T = 20000; // ms for any single condition
const sc = StringCodec();
const say = (...a) => console.log(...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function ask(tag) {
  say("WAIT", tag);
  const { value } = await lines.next();
  if ((value || "").trim() !== "done") throw new Error(`the test answered ${value} to ${tag}`);
}

function assert(cond, what) {
  if (!cond) throw new Error(`assertion failed: ${what}`);
}

/** The next message of a subscription, or an error after T. */
function reader(sub) {
  const it = sub[Symbol.asyncIterator]();
  return async (ms = T) => {
    let timer;
    const timeout = new Promise((_, rej) => {
      timer = setTimeout(() => rej(new Error(`no message on ${sub.getSubject()} in ${ms} ms`)), ms);
    });
    try {
      const { value, done } = await Promise.race([it.next(), timeout]);
      assert(!done, `subscription ${sub.getSubject()} ended`);
      return value;
    } finally {
      clearTimeout(timer);
    }
  };
}

async function connectRetrying(opts) {
  let last;
  for (let i = 0; i < 20; i++) {
    try {
      return await connect({ timeout: T, maxReconnectAttempts: -1, reconnectTimeWait: 200, ...opts });
    } catch (e) {
      last = e;
      await sleep(500);
    }
  }
  throw new Error(`cannot connect: ${last}`);
}

/** Fetches until n messages came (a loaded machine may split them). */
async function fetchN(c, n) {
  const got = [];
  for (let i = 0; i < T / 1000 && got.length < n; i++) {
    const msgs = await c.fetch({ max_messages: n - got.length, expires: 2000 });
    for await (const m of msgs) got.push(m);
  }
  assert(got.length === n, `${got.length} of ${n} messages`);
  return got;
}

/** f(), retried while the client reconnects after a broker restart. */
async function retry(f) {
  let last;
  for (let i = 0; i < (T / 500) * 2; i++) {
    try {
      return await f();
    } catch (e) {
      last = e;
      await sleep(500);
    }
  }
  throw new Error(`still failing: ${last}`);
}

async function main() {
  const url = process.env.NATS_URL;
  const authUrl = process.env.NATS_AUTH_URL;
  const maxPayload = Number(process.env.MAX_PAYLOAD);

  const nc = await connectRetrying({ servers: url, name: "nats.js" });
  assert(nc.info.max_payload === maxPayload, `max_payload ${nc.info.max_payload}`);
  assert(nc.info.headers === true, "headers in INFO");
  say("ok connect");

  // Wildcards.
  const star = reader(nc.subscribe("js.*.x"));
  const gtSub = nc.subscribe("js.>");
  const gt = reader(gtSub);
  await nc.flush();
  nc.publish("js.a.x", sc.encode("1"));
  nc.publish("js.a.b.c", sc.encode("2"));
  const m1 = await star();
  assert(m1.subject === "js.a.x" && sc.decode(m1.data) === "1", m1.subject);
  const got = new Set([(await gt()).subject, (await gt()).subject]);
  assert(got.has("js.a.x") && got.has("js.a.b.c"), [...got]);
  say("ok wildcards");

  // Headers on a message to itself.
  const hdr = reader(nc.subscribe("hdr.js"));
  await nc.flush();
  const h = headers();
  h.set("Trace-Id", "js-1");
  nc.publish("hdr.js", sc.encode("h"), { headers: h });
  const hm = await hdr();
  assert(hm.headers && hm.headers.get("Trace-Id") === "js-1", "header back");
  say("ok headers");

  // To and from the native client the test runs.
  const rh = headers();
  rh.set("K", "from-js");
  const r = await nc.request("native.svc", sc.encode("hi"), { timeout: T, headers: rh });
  assert(sc.decode(r.data) === "native:hi", sc.decode(r.data));
  assert(r.headers && r.headers.get("K") === "from-js", "reply header");
  say("ok request to a native service");

  nc.subscribe("js.svc", {
    callback: (err, m) => {
      if (err) return;
      const sh = headers();
      sh.set("Served-By", "nats.js");
      m.respond(sc.encode("js:" + sc.decode(m.data)), { headers: sh });
    },
  });
  await nc.flush();
  await ask("serving");
  say("ok served a native request");

  // A queue group across two connections.
  const other = await connectRetrying({ servers: url, name: "nats.js-2" });
  const counts = [0, 0];
  const seen = new Set();
  const member = (i) => (err, m) => {
    if (err) return;
    assert(!seen.has(m.subject), `twice: ${m.subject}`);
    seen.add(m.subject);
    counts[i]++;
  };
  nc.subscribe("js.q.*", { queue: "g", callback: member(0) });
  other.subscribe("js.q.*", { queue: "g", callback: member(1) });
  await nc.flush();
  await other.flush();
  const n = 100;
  for (let i = 0; i < n; i++) other.publish(`js.q.${i}`);
  await other.flush();
  for (let i = 0; i < T / 100 && seen.size < n; i++) await sleep(100);
  assert(seen.size === n && counts[0] + counts[1] === n, `${seen.size} ${counts}`);
  say("ok queue group", counts);
  await other.drain();

  // No responders: at once, not after the timeout.
  try {
    await nc.request("nobody.home", sc.encode(""), { timeout: T });
    throw new Error("a reply from nobody");
  } catch (e) {
    assert(e.code === ErrorCode.NoResponders, `no responders, got ${e.code} ${e}`);
  }
  say("ok no responders");

  // The client enforces INFO's max_payload.
  try {
    nc.publish("js.big", new Uint8Array(maxPayload + 1));
    throw new Error("an oversized publish was accepted");
  } catch (e) {
    assert(e.code === ErrorCode.MaxPayloadExceeded, `max payload, got ${e.code} ${e}`);
  }
  say("ok max payload");

  // Wrong credentials are refused, right ones work, a denied publish is
  // reported and the connection stays.
  let refused = null;
  for (let i = 0; i < 5 && !refused; i++) {
    try {
      const bad = await connect({ servers: authUrl, user: "js", pass: "wrong", timeout: T, reconnect: false });
      await bad.close();
    } catch (e) {
      refused = e;
    }
  }
  assert(refused && refused.code === ErrorCode.AuthorizationViolation, `auth failure, got ${refused && refused.code}`);
  say("ok auth failure:", refused.code);

  const good = await connectRetrying({ servers: authUrl, user: "js", pass: "js-pw" });
  const errors = [];
  (async () => {
    for await (const s of good.status()) if (s.type === "error") errors.push(String(s.data));
  })();
  const mine = reader(good.subscribe("js.allowed"));
  await good.flush();
  good.publish("not.allowed", sc.encode("x"));
  good.publish("js.allowed", sc.encode("y"));
  assert(sc.decode((await mine()).data) === "y", "allowed publish");
  for (let i = 0; i < T / 100 && errors.length === 0; i++) await sleep(100);
  assert(errors.some((e) => e.includes("PERMISSIONS_VIOLATION")), errors);
  await good.flush();
  assert(!good.isClosed(), "still connected");
  say("ok permissions");
  await good.close();

  // JetStream: a stream, publishes acked once stored (a msgID stored
  // once), a durable pull consumer fetching and acking.
  const jsm = await nc.jetstreamManager({ timeout: T });
  await jsm.streams.add({ name: "JSJS", subjects: ["jsjs.>"] });
  const js = nc.jetstream({ timeout: T });
  for (let i = 1; i <= 4; i++) {
    const pa = await js.publish("jsjs.a", sc.encode(`m${i}`));
    assert(pa.stream === "JSJS" && pa.seq === i, JSON.stringify(pa));
  }
  for (const dup of [false, true]) {
    const pa = await js.publish("jsjs.a", sc.encode("m5"), { msgID: "js-5" });
    assert(pa.seq === 5 && Boolean(pa.duplicate) === dup, JSON.stringify(pa));
  }
  const si = await jsm.streams.info("JSJS");
  assert(si.state.messages === 5, JSON.stringify(si.state));
  say("ok jetstream publish");
  await jsm.consumers.add("JSJS", { durable_name: "jsw", ack_policy: "explicit" });
  const c = await js.consumers.get("JSJS", "jsw");
  const first = await fetchN(c, 2);
  assert(first.map((m) => sc.decode(m.data)).join() === "m1,m2", first.map((m) => sc.decode(m.data)));
  for (const m of first) assert(await m.ackAck({ timeout: T }), "ack confirmed");
  say("ok jetstream fetch and ack");

  // Reconnect after the broker restarts, subscriptions restored.
  // A callback, not an iterator with timeouts: messages published while
  // disconnected may be lost (at most once), and must not shift later waits.
  let back = false;
  nc.subscribe("js.restart", { callback: (err) => { if (!err) back = true; } });
  await nc.flush();
  await ask("restart");
  for (let i = 0; i < 240 && !back; i++) {
    nc.publish("js.restart", sc.encode("again"));
    await sleep(500);
  }
  assert(back, "no message after the restart");
  say("ok reconnect");

  // The durable consumer resumes after the acked messages.
  const again = await retry(() => js.consumers.get("JSJS", "jsw"));
  const rest = await fetchN(again, 3);
  assert(rest.map((m) => sc.decode(m.data)).join() === "m3,m4,m5", rest.map((m) => sc.decode(m.data)));
  for (const m of rest) m.ack();
  await nc.flush();
  say("ok jetstream durable resume");

  await nc.close();
  say("ALL OK");
  process.exit(0);
}

main().catch((e) => {
  console.error("FAILED:", e && e.stack ? e.stack : e);
  process.exit(1);
});
