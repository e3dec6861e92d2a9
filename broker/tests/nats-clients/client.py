"""sockbus's NATS port driven by nats-py (a client nobody here wrote).

Run by broker/tests/nats_clients.rs, which starts the brokers and a native
sockbus client on the other side. Environment: NATS_URL (the broker),
NATS_AUTH_URL (a broker with users: py/py-pw may publish only py.>),
MAX_PAYLOAD. Prints `ok <step>` per step; `WAIT <tag>` asks the Rust side to
act (it answers with a line on stdin); `ALL OK` at the end. Every wait is
generous and polls a condition: the machine may be loaded.
"""

import asyncio
import os
import sys

import nats
from nats.errors import MaxPayloadError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

T = 20.0  # seconds for any single condition


def say(*a):
    print(*a, flush=True)


async def ask(tag):
    say("WAIT", tag)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    assert line.strip() == "done", f"the test answered {line!r} to {tag}"


async def connect(url, **kw):
    """Connects, retrying: a loaded machine may be slow to accept."""
    last = None
    for _ in range(20):
        try:
            return await nats.connect(
                url,
                connect_timeout=T,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                **kw,
            )
        except Exception as e:  # noqa: BLE001
            last = e
            await asyncio.sleep(0.5)
    raise AssertionError(f"cannot connect to {url}: {last!r}")


async def fetch_n(psub, n):
    """Fetches until n messages came (a loaded machine may split them)."""
    got = []
    for _ in range(int(T)):
        if len(got) >= n:
            break
        try:
            got += await psub.fetch(n - len(got), timeout=2.0)
        except NatsTimeout:
            pass
    assert len(got) == n, (len(got), n)
    return got


async def retry(f):
    """f(), retried while the client reconnects after a broker restart."""
    last = None
    for _ in range(int(T * 2)):
        try:
            return await f()
        except Exception as e:  # noqa: BLE001
            last = e
            await asyncio.sleep(0.5)
    raise AssertionError(f"still failing: {last!r}")


async def main():
    url = os.environ["NATS_URL"]
    auth_url = os.environ["NATS_AUTH_URL"]
    max_payload = int(os.environ["MAX_PAYLOAD"])

    nc = await connect(url, name="nats-py")
    assert nc.max_payload == max_payload, nc.max_payload
    assert nc._server_info.get("headers") is True
    say("ok connect")

    # Wildcards.
    star = await nc.subscribe("py.*.x")
    gt = await nc.subscribe("py.>")
    await nc.flush(timeout=T)
    await nc.publish("py.a.x", b"1")
    await nc.publish("py.a.b.c", b"2")
    m = await star.next_msg(timeout=T)
    assert (m.subject, m.data) == ("py.a.x", b"1"), m
    got = {(await gt.next_msg(timeout=T)).subject for _ in range(2)}
    assert got == {"py.a.x", "py.a.b.c"}, got
    say("ok wildcards")

    # Headers on a message to itself.
    h = await nc.subscribe("hdr.py")
    await nc.flush(timeout=T)
    await nc.publish("hdr.py", b"h", headers={"Trace-Id": "py-1"})
    m = await h.next_msg(timeout=T)
    assert m.headers and m.headers.get("Trace-Id") == "py-1", m.headers
    say("ok headers")

    # To and from the native client the test runs.
    r = await nc.request("native.svc", b"hi", timeout=T, headers={"K": "from-py"})
    assert r.data == b"native:hi", r.data
    assert r.headers and r.headers.get("K") == "from-py", r.headers
    say("ok request to a native service")

    async def serve(msg):
        await nc.publish(msg.reply, b"py:" + msg.data, headers={"Served-By": "nats-py"})

    await nc.subscribe("py.svc", cb=serve)
    await nc.flush(timeout=T)
    await ask("serving")
    say("ok served a native request")

    # A queue group across two connections.
    other = await connect(url, name="nats-py-2")
    counts = [0, 0]
    seen = set()

    def member(i):
        async def cb(msg):
            assert msg.subject not in seen, f"twice: {msg.subject}"
            seen.add(msg.subject)
            counts[i] += 1

        return cb

    await nc.subscribe("py.q.*", queue="g", cb=member(0))
    await other.subscribe("py.q.*", queue="g", cb=member(1))
    await nc.flush(timeout=T)
    await other.flush(timeout=T)
    n = 100
    for i in range(n):
        await other.publish(f"py.q.{i}", b"")
    await other.flush(timeout=T)
    for _ in range(int(T * 10)):
        if len(seen) == n:
            break
        await asyncio.sleep(0.1)
    assert len(seen) == n and sum(counts) == n, (len(seen), counts)
    say("ok queue group", counts)
    await other.drain()

    # No responders: at once, not after the timeout.
    try:
        await nc.request("nobody.home", b"", timeout=T)
        raise AssertionError("a reply from nobody")
    except NoRespondersError:
        pass
    say("ok no responders")

    # The client enforces INFO's max_payload.
    try:
        await nc.publish("py.big", b"x" * (max_payload + 1))
        raise AssertionError("an oversized publish was accepted")
    except MaxPayloadError:
        pass
    say("ok max payload")

    # Wrong credentials are refused, right ones work, a denied publish is
    # reported and the connection stays.
    refused = None
    for _ in range(5):
        try:
            bad = await nats.connect(
                auth_url,
                user="py",
                password="wrong",
                connect_timeout=T,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
            await bad.close()
        except Exception as e:  # noqa: BLE001
            refused = e
            break
    assert refused is not None, "wrong password accepted"
    say("ok auth failure:", type(refused).__name__)

    errors = []

    async def on_error(e):
        errors.append(str(e))

    good = await connect(auth_url, user="py", password="py-pw", error_cb=on_error)
    mine = await good.subscribe("py.allowed")
    await good.flush(timeout=T)
    await good.publish("not.allowed", b"x")
    await good.publish("py.allowed", b"y")
    m = await mine.next_msg(timeout=T)
    assert m.data == b"y"
    for _ in range(int(T * 10)):
        if any("permissions violation" in e.lower() for e in errors):
            break
        await asyncio.sleep(0.1)
    # nats-py lowercases the server's text.
    assert any("permissions violation" in e.lower() for e in errors), errors
    await good.flush(timeout=T)
    assert good.is_connected
    say("ok permissions")
    await good.close()

    # JetStream: a stream, publishes acked once stored (a Nats-Msg-Id
    # stored once), a durable pull consumer fetching and acking.
    js = nc.jetstream(timeout=T)
    await js.add_stream(name="PYJS", subjects=["pyjs.>"])
    for i in range(1, 5):
        ack = await js.publish("pyjs.a", f"m{i}".encode())
        assert (ack.stream, ack.seq) == ("PYJS", i), ack
    for dup in (False, True):
        ack = await js.publish("pyjs.a", b"m5", headers={"Nats-Msg-Id": "py-5"})
        assert (ack.seq, bool(ack.duplicate)) == (5, dup), ack
    info = await js.stream_info("PYJS")
    assert info.state.messages == 5, info.state
    say("ok jetstream publish")
    psub = await js.pull_subscribe("pyjs.>", durable="pyw", stream="PYJS")
    msgs = await fetch_n(psub, 2)
    assert [m.data for m in msgs] == [b"m1", b"m2"], [m.data for m in msgs]
    for m in msgs:
        await m.ack_sync(timeout=T)
    say("ok jetstream fetch and ack")

    # Reconnect after the broker restarts, subscriptions restored.
    again = await nc.subscribe("py.restart")
    await nc.flush(timeout=T)
    await ask("restart")
    back = False
    for _ in range(120):
        try:
            await nc.publish("py.restart", b"again")
            await again.next_msg(timeout=1.0)
            back = True
            break
        except Exception:  # noqa: BLE001
            await asyncio.sleep(0.5)
    assert back, "no message after the restart"
    say("ok reconnect")

    # The durable consumer resumes after the acked messages.
    psub = await retry(lambda: js.pull_subscribe("pyjs.>", durable="pyw", stream="PYJS"))
    msgs = await fetch_n(psub, 3)
    assert [m.data for m in msgs] == [b"m3", b"m4", b"m5"], [m.data for m in msgs]
    for m in msgs:
        await m.ack()
    say("ok jetstream durable resume")

    # close, not drain: some subscriptions here hold messages nobody reads.
    await nc.close()
    say("ALL OK")


asyncio.run(main())
