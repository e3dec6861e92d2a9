//! Three brokers in a full mesh on distinct loopback addresses (127.0.0.2–4):
//! fanout, queue groups, request/reply across nodes, a node killed and
//! restarted, a route cut and healed: exact counts, no duplicates, no loops.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{nothing, recv, TestBroker};
use sockbus_broker::metrics::Metrics;
use tokio::net::{TcpListener, TcpStream};

fn free(ip: &str) -> SocketAddr {
    std::net::TcpListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Node {
    name: String,
    client: SocketAddr,
    route: SocketAddr,
    peers: Vec<String>,
}

impl Node {
    fn new(name: &str, ip: &str) -> Node {
        Node {
            name: name.into(),
            client: free(ip),
            route: free(ip),
            peers: Vec::new(),
        }
    }

    async fn start(&self) -> TestBroker {
        self.start_with_secret(None).await
    }

    /// Started with a NATS port too (for JetStream's API).
    async fn start_with_nats(&self) -> TestBroker {
        let mut cfg = common::test_config();
        cfg.node_id = self.name.clone();
        cfg.listen = self.client;
        cfg.cluster = Some(self.route);
        cfg.peers = self.peers.clone();
        cfg.nats = Some(free("127.0.0.1"));
        cfg.lame_duck_grace = Duration::ZERO;
        TestBroker::with(cfg).await
    }

    async fn start_with_secret(&self, secret: Option<&str>) -> TestBroker {
        let mut cfg = common::test_config();
        cfg.node_id = self.name.clone();
        cfg.listen = self.client;
        cfg.cluster = Some(self.route);
        cfg.peers = self.peers.clone();
        cfg.cluster_secret = secret.map(|s| sockbus_broker::config::Secret(s.into()));
        TestBroker::with(cfg).await
    }
}

/// Three nodes, each listing all three route addresses (itself included, as
/// a StatefulSet's static peer list does).
fn mesh() -> Vec<Node> {
    let mut nodes = vec![
        Node::new("a", "127.0.0.2"),
        Node::new("b", "127.0.0.3"),
        Node::new("c", "127.0.0.4"),
    ];
    let all: Vec<String> = nodes
        .iter()
        .map(|n| format!("sockbus-route://{}", n.route))
        .collect();
    for n in &mut nodes {
        n.peers = all.clone();
    }
    nodes
}

/// Waits until `b`'s router holds at least `n` subscriptions (local + peers' interest).
async fn wait_subs(b: &TestBroker, n: usize) {
    for _ in 0..500 {
        if b.state.subscriptions() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "interest did not propagate: {} subscriptions, wanted {n}",
        b.state.subscriptions()
    );
}

/// Publishes `k.probe` through `pa` until every subscriber gets the latest
/// probe: core pub/sub is at most once while interest spreads over the
/// routes (a count of subscriptions on the publisher's node is not yet a
/// path to each subscriber: CI once lost every message after a restarted
/// node's interest was counted). Earlier probes are read and dropped.
async fn settled(pa: &sockbus_client::Client, subs: &mut [&mut sockbus_client::Subscriber]) {
    for n in 0..100 {
        let probe = format!("probe-{n}");
        pa.publish("k.probe", probe.as_str()).await.unwrap();
        pa.flush().await.unwrap();
        let mut all = true;
        for s in subs.iter_mut() {
            let mut got = false;
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), s.next()).await
            {
                assert_eq!(
                    m.subject(),
                    "k.probe",
                    "only probes before the test's messages"
                );
                if m.payload.as_ref() == probe.as_bytes() {
                    got = true;
                    break;
                }
            }
            all &= got;
        }
        if all {
            return;
        }
    }
    panic!("a subscriber never got a probe");
}

async fn wait_routes(brokers: &[&TestBroker], each: u64) {
    for _ in 0..500 {
        if brokers
            .iter()
            .all(|b| Metrics::get(&b.state.metrics().routes) == each)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("routes did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_reaches_every_node_exactly_once_per_subscriber() {
    let nodes = mesh();
    let (a, b, c) = (
        nodes[0].start().await,
        nodes[1].start().await,
        nodes[2].start().await,
    );
    wait_routes(&[&a, &b, &c], 2).await;
    let cb = sockbus_client::connect(&b.url).await.unwrap();
    let cc = sockbus_client::connect(&c.url).await.unwrap();
    // Two overlapping subscriptions on B: still one copy per message on the route.
    let mut b_lit = cb.subscribe("fan.x").await.unwrap();
    let mut b_wild = cb.subscribe("fan.>").await.unwrap();
    let mut c_sub = cc.subscribe("fan.*").await.unwrap();
    cb.flush().await.unwrap();
    cc.flush().await.unwrap();
    wait_subs(&a, 3).await;
    let pa = sockbus_client::connect(&a.url).await.unwrap();
    const N: u32 = 2000;
    for i in 0..N {
        pa.publish("fan.x", i.to_le_bytes()).await.unwrap();
    }
    pa.flush().await.unwrap();
    for sub in [&mut b_lit, &mut b_wild, &mut c_sub] {
        for i in 0..N {
            assert_eq!(
                recv(sub).await.payload.as_ref(),
                i.to_le_bytes(),
                "in order, no gaps"
            );
        }
        nothing(sub).await;
    }
    assert_eq!(
        Metrics::get(&b.state.metrics().route_msgs_in),
        N as u64,
        "each message crossed A→B once"
    );
    assert_eq!(
        Metrics::get(&c.state.metrics().route_msgs_in),
        N as u64,
        "each message crossed A→C once"
    );
    assert_eq!(
        Metrics::get(&a.state.metrics().route_msgs_in),
        0,
        "nothing looped back to A"
    );
    // The same figures reach /metrics and the status page.
    let src = b
        .state
        .metrics()
        .sources
        .all()
        .into_iter()
        .find(|s| s.name() == "cluster")
        .unwrap();
    let mut text = String::new();
    src.prometheus(&mut text);
    assert!(text.contains("sockbus_cluster_routes 2"), "{text}");
    assert!(
        text.contains(&format!("sockbus_cluster_messages_in_total {N}")),
        "{text}"
    );
    let status = src.status();
    let mut peers: Vec<String> = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect();
    peers.sort();
    assert_eq!(peers, ["a", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_spans_nodes_exactly_once_and_prefers_local_members() {
    let nodes = mesh();
    let (a, b, c) = (
        nodes[0].start().await,
        nodes[1].start().await,
        nodes[2].start().await,
    );
    wait_routes(&[&a, &b, &c], 2).await;
    let cb = sockbus_client::connect(&b.url).await.unwrap();
    let cc = sockbus_client::connect(&c.url).await.unwrap();
    let mut qb = cb.queue_subscribe("jobs", "w").await.unwrap();
    let mut qc = cc.queue_subscribe("jobs", "w").await.unwrap();
    cb.flush().await.unwrap();
    cc.flush().await.unwrap();
    wait_subs(&a, 2).await;
    let pa = sockbus_client::connect(&a.url).await.unwrap();
    const N: u32 = 1000;
    for i in 0..N {
        pa.publish("jobs", i.to_string()).await.unwrap();
    }
    pa.flush().await.unwrap();
    let mut seen = HashSet::new();
    let mut per = [0u32; 2];
    for (k, q) in [&mut qb, &mut qc].into_iter().enumerate() {
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), q.next()).await {
            assert!(seen.insert(m.payload.clone()), "duplicate across nodes");
            per[k] += 1;
        }
    }
    assert_eq!(
        seen.len(),
        N as usize,
        "every job handled exactly once cluster-wide"
    );
    assert!(
        per[0] > 0 && per[1] > 0,
        "both remote nodes' members served: {per:?}"
    );

    // A local member on A takes everything published on A.
    let ca = sockbus_client::connect(&a.url).await.unwrap();
    let mut qa = ca.queue_subscribe("jobs", "w").await.unwrap();
    ca.flush().await.unwrap();
    for i in 0..100 {
        pa.publish("jobs", format!("local-{i}")).await.unwrap();
    }
    pa.flush().await.unwrap();
    for _ in 0..100 {
        assert!(recv(&mut qa).await.payload.starts_with(b"local-"));
    }
    nothing(&mut qb).await;
    nothing(&mut qc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_works_across_nodes() {
    let nodes = mesh();
    let (a, b, c) = (
        nodes[0].start().await,
        nodes[1].start().await,
        nodes[2].start().await,
    );
    wait_routes(&[&a, &b, &c], 2).await;
    let cc = sockbus_client::connect(&c.url).await.unwrap();
    let mut svc = cc.subscribe("svc.add").await.unwrap();
    cc.flush().await.unwrap();
    let c2 = cc.clone();
    tokio::spawn(async move {
        while let Some(m) = svc.next().await {
            let n: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            c2.publish(m.reply().unwrap(), (n + 1).to_string())
                .await
                .unwrap();
        }
    });
    wait_subs(&a, 1).await;
    let ca = sockbus_client::connect(&a.url).await.unwrap();
    // The requester's inbox interest must reach C before the first request.
    ca.request_timeout("svc.none", "0", Duration::from_millis(50))
        .await
        .ok();
    wait_subs(&c, 2).await;
    for i in 0..50u64 {
        let r = ca.request("svc.add", i.to_string()).await.unwrap();
        assert_eq!(r.payload.as_ref(), (i + 1).to_string().as_bytes());
    }
    let e = ca.request("svc.nobody", "x").await.unwrap_err();
    assert!(matches!(e, sockbus_client::Error::NoResponders), "{e}");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_rejoins_and_its_clients_fail_over_and_back() {
    let nodes = mesh();
    let (a, b, c) = (
        nodes[0].start().await,
        nodes[1].start().await,
        nodes[2].start().await,
    );
    wait_routes(&[&a, &b, &c], 2).await;
    // A client of B that also knows C.
    let cb = sockbus_client::ConnectOptions::new()
        .max_reconnect_delay(Duration::from_millis(100))
        .connect(&format!("{},{}", b.url, c.url))
        .await
        .unwrap();
    let mut sub = cb.subscribe("k.>").await.unwrap();
    cb.flush().await.unwrap();
    wait_subs(&a, 1).await;
    let pa = sockbus_client::connect(&a.url).await.unwrap();
    pa.publish("k.before", "1").await.unwrap();
    pa.flush().await.unwrap();
    assert_eq!(recv(&mut sub).await.payload.as_ref(), b"1");

    b.stop().await;
    // The client fails over to C and restores its subscription there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !(cb.is_connected() && cb.server().unwrap().1 == c.addr) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "client did not fail over to C"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cb.flush().await.unwrap();
    wait_routes(&[&a, &c], 1).await;
    wait_subs(&a, 1).await;
    for i in 0..100 {
        pa.publish("k.during", i.to_string()).await.unwrap();
    }
    pa.flush().await.unwrap();
    for i in 0..100 {
        assert_eq!(
            recv(&mut sub).await.payload.as_ref(),
            i.to_string().as_bytes()
        );
    }

    // B comes back on the same addresses; the mesh heals.
    let b2 = nodes[1].start().await;
    wait_routes(&[&a, &b2, &c], 2).await;
    let cb2 = sockbus_client::connect(&b2.url).await.unwrap();
    let mut sub_b = cb2.subscribe("k.>").await.unwrap();
    cb2.flush().await.unwrap();
    wait_subs(&a, 2).await;
    settled(&pa, &mut [&mut sub, &mut sub_b]).await;
    for i in 0..100 {
        pa.publish("k.after", i.to_string()).await.unwrap();
    }
    pa.flush().await.unwrap();
    for s in [&mut sub, &mut sub_b] {
        for i in 0..100 {
            assert_eq!(recv(s).await.payload.as_ref(), i.to_string().as_bytes());
        }
        nothing(s).await;
    }
}

/// A TCP proxy whose connections can be cut and that refuses new ones while cut.
async fn proxy(
    target: SocketAddr,
    listen: SocketAddr,
    cut: Arc<AtomicBool>,
    kill: Arc<tokio::sync::Notify>,
) {
    let l = TcpListener::bind(listen).await.unwrap();
    loop {
        let Ok((mut inbound, _)) = l.accept().await else {
            return;
        };
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        let kill = kill.clone();
        tokio::spawn(async move {
            let Ok(mut out) = TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut out) => {}
                _ = kill.notified() => {}
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_route_heals_without_duplicates() {
    let mut nodes = [Node::new("a", "127.0.0.2"), Node::new("b", "127.0.0.3")];
    // The only route: A dials B through a proxy we can cut.
    let via = free("127.0.0.5");
    nodes[0].peers = vec![format!("sockbus-route://{via}")];
    let cut = Arc::new(AtomicBool::new(false));
    let kill = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(proxy(nodes[1].route, via, cut.clone(), kill.clone()));
    let (a, b) = (nodes[0].start().await, nodes[1].start().await);
    wait_routes(&[&a, &b], 1).await;
    // A's subscriber gets B's messages over that route.
    let ca = sockbus_client::connect(&a.url).await.unwrap();
    let mut sub = ca.subscribe("cut.>").await.unwrap();
    ca.flush().await.unwrap();
    wait_subs(&b, 1).await;
    let pb = sockbus_client::connect(&b.url).await.unwrap();
    pb.publish("cut.x", "before").await.unwrap();
    pb.flush().await.unwrap();
    assert_eq!(recv(&mut sub).await.payload.as_ref(), b"before");

    cut.store(true, Ordering::SeqCst);
    kill.notify_waiters();
    for _ in 0..500 {
        if b.state.subscriptions() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        (b.state.subscriptions() == 0),
        "B dropped the interest of the cut route"
    );
    pb.publish("cut.x", "while cut").await.unwrap();
    pb.flush().await.unwrap();
    nothing(&mut sub).await;

    cut.store(false, Ordering::SeqCst);
    wait_routes(&[&a, &b], 1).await;
    wait_subs(&b, 1).await;
    for i in 0..500 {
        pb.publish("cut.x", i.to_string()).await.unwrap();
    }
    pb.flush().await.unwrap();
    for i in 0..500 {
        assert_eq!(
            recv(&mut sub).await.payload.as_ref(),
            i.to_string().as_bytes()
        );
    }
    nothing(&mut sub).await;
    assert_eq!(
        b.state.subscriptions(),
        1,
        "exactly one copy of A's interest after healing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_missing_from_the_others_peer_lists_joins_through_its_own_routes() {
    // A and B know each other; C, added later (as when a StatefulSet scales
    // up), lists all three while A and B still list only themselves.
    let mut nodes = [
        Node::new("a", "127.0.0.2"),
        Node::new("b", "127.0.0.3"),
        Node::new("c", "127.0.0.4"),
    ];
    let ab: Vec<String> = nodes[..2]
        .iter()
        .map(|n| format!("sockbus-route://{}", n.route))
        .collect();
    let abc: Vec<String> = nodes
        .iter()
        .map(|n| format!("sockbus-route://{}", n.route))
        .collect();
    nodes[0].peers = ab.clone();
    nodes[1].peers = ab;
    nodes[2].peers = abc;
    let (a, b) = (nodes[0].start().await, nodes[1].start().await);
    wait_routes(&[&a, &b], 1).await;
    let c = nodes[2].start().await;
    // One route per pair, whoever dialed.
    wait_routes(&[&a, &b, &c], 2).await;
    let ca = sockbus_client::connect(&a.url).await.unwrap();
    let cc = sockbus_client::connect(&c.url).await.unwrap();
    let mut on_a = ca.subscribe("grow.>").await.unwrap();
    let mut on_c = cc.subscribe("grow.>").await.unwrap();
    ca.flush().await.unwrap();
    cc.flush().await.unwrap();
    wait_subs(&b, 2).await;
    wait_subs(&a, 2).await;
    wait_subs(&c, 2).await;
    let pb = sockbus_client::connect(&b.url).await.unwrap();
    let pc = sockbus_client::connect(&c.url).await.unwrap();
    for i in 0..200 {
        pb.publish("grow.b", i.to_string()).await.unwrap();
        pc.publish("grow.c", i.to_string()).await.unwrap();
    }
    pb.flush().await.unwrap();
    pc.flush().await.unwrap();
    for sub in [&mut on_a, &mut on_c] {
        let (mut from_b, mut from_c) = (0, 0);
        for _ in 0..400 {
            let m = recv(sub).await;
            match m.subject() {
                "grow.b" => {
                    assert_eq!(m.payload.as_ref(), from_b.to_string().as_bytes());
                    from_b += 1;
                }
                _ => {
                    assert_eq!(m.payload.as_ref(), from_c.to_string().as_bytes());
                    from_c += 1;
                }
            }
        }
        assert_eq!((from_b, from_c), (200, 200));
        nothing(sub).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_publish_on_one_node_is_stored_by_the_stream_on_another_and_acked() {
    let nodes = mesh();
    let (a, b, c) = (
        nodes[0].start().await,
        nodes[1].start().await,
        nodes[2].start().await,
    );
    wait_routes(&[&a, &b, &c], 2).await;
    // The stream lives on B only.
    let cb = sockbus_client::connect(&b.url).await.unwrap();
    cb.stream_add(&sockbus_client::streams::StreamConfig::new(
        "ORDERS",
        ["orders.>"],
    ))
    .await
    .unwrap();
    wait_subs(&a, 1).await;
    let ca = sockbus_client::connect(&a.url).await.unwrap();
    // The requester's inbox interest must reach B before the first ack.
    ca.request_timeout("warmup.none", "0", Duration::from_millis(50))
        .await
        .ok();
    wait_subs(&b, 1).await;
    for i in 1..=20u64 {
        let ack = ca
            .publish_durable("orders.eu", format!("o{i}"))
            .await
            .unwrap();
        assert_eq!((ack.stream.as_str(), ack.seq), ("ORDERS", i));
    }
    let info = cb.stream_info("ORDERS").await.unwrap();
    assert_eq!(info.state.messages, 20, "stored once each, on B");
    // Nothing was stored on A or C: they have no streams.
    assert!(a.state.streams().is_empty() && c.state.streams().is_empty());
}

/// Publishes durably on `c` until the stream answers (true) or, with
/// `stored` false, until nothing does any more; interest takes a moment to
/// cross the routes.
async fn until_durable(c: &sockbus_client::Client, subject: &str, stored: bool) -> Option<u64> {
    let t = std::time::Instant::now();
    loop {
        match c.publish_durable(subject, "x").await {
            Ok(a) if stored => return Some(a.seq),
            Err(_) if !stored => return None,
            _ => {}
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "a durable publish to {subject} still {}",
            if stored { "fails" } else { "is stored" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stream_update_moves_the_interest_other_nodes_forward_publishes_on() {
    let nodes = mesh();
    let (a, b) = (nodes[0].start().await, nodes[1].start_with_nats().await);
    wait_routes(&[&a, &b], 1).await;
    let nc = async_nats::connect(format!("nats://{}", b.state.config().nats.unwrap()))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(nc);
    let orders = async_nats::jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    };
    js.create_stream(orders.clone()).await.unwrap();
    let ca = sockbus_client::connect(&a.url).await.unwrap();
    assert_eq!(until_durable(&ca, "orders.eu", true).await, Some(1));
    // B's stream takes `returns.*` too, and then only it.
    js.update_stream(async_nats::jetstream::stream::Config {
        subjects: vec!["orders.>".into(), "returns.*".into()],
        ..orders.clone()
    })
    .await
    .unwrap();
    assert_eq!(until_durable(&ca, "returns.r", true).await, Some(2));
    js.update_stream(async_nats::jetstream::stream::Config {
        subjects: vec!["returns.*".into()],
        ..orders
    })
    .await
    .unwrap();
    assert_eq!(until_durable(&ca, "orders.eu", false).await, None);
    assert_eq!(until_durable(&ca, "returns.r", true).await, Some(3));
}

/// A peer that dials `b`'s cluster port and sends the route handshake
/// (CONNECT with the route flag); the test decides what it does next.
async fn fake_route_peer(b: &TestBroker) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    // The port the broker bound (it chose it).
    let route = b.route.expect("a cluster port");
    let mut s = TcpStream::connect(route).await.unwrap();
    let mut hello = bytes::BytesMut::new();
    sockbus_protocol::frame::encode_connect(
        &mut hello,
        sockbus_protocol::frame::CONNECT_ROUTE,
        0,
        "fake",
        b"",
    )
    .unwrap();
    s.write_all(&hello).await.unwrap();
    s
}

async fn wait_metric(b: &TestBroker, what: &str, m: impl Fn(&Metrics) -> u64) {
    let t = std::time::Instant::now();
    while m(b.state.metrics()) == 0 {
        assert!(t.elapsed() < Duration::from_secs(15), "no {what} counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads what the broker sends until it closes the socket (None if it
/// does not within 10 s): the frames it sent.
async fn until_closed(s: &mut TcpStream) -> Option<Vec<sockbus_protocol::Frame>> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
    let mut frames = Vec::new();
    let mut at = &buf[..];
    while let Ok(Some((f, len))) = sockbus_protocol::frame::decode(at, u32::MAX) {
        frames.push(sockbus_protocol::Frame::from(f));
        at = &at[len..];
    }
    Some(frames)
}

/// Routes follow the client rules: a peer that completes the route
/// handshake and then goes silent is PINGed and closed as stale.
#[tokio::test]
async fn a_route_peer_that_goes_silent_is_closed_as_stale() {
    let mut cfg = common::test_config();
    cfg.cluster = Some("127.0.0.1:0".parse().unwrap());
    cfg.ping_interval = Duration::from_secs(1);
    cfg.max_pings_out = 2;
    let b = TestBroker::with(cfg).await;
    let mut peer = fake_route_peer(&b).await;
    // Silent: nothing is sent; what arrives is read only to see the close,
    // after the broker gave up on the PINGs.
    wait_metric(&b, "stale route", |m| Metrics::get(&m.stale_connections)).await;
    let frames = until_closed(&mut peer).await.expect("the route was closed");
    let pings = frames
        .iter()
        .filter(|f| matches!(f, sockbus_protocol::Frame::Ping(_)))
        .count();
    assert_eq!(pings, 2, "{frames:?}");
    assert!(
        matches!(frames.last(), Some(sockbus_protocol::Frame::Err { code, .. })
            if *code == sockbus_protocol::frame::code::STALE_CONNECTION),
        "{frames:?}"
    );
    assert_eq!(Metrics::get(&b.state.metrics().routes), 0);
}

/// Routes follow the client rules: a peer that floods PINGs and never reads
/// the PONGs is cut off at the `--max-pending` budget as a slow consumer.
#[tokio::test]
async fn a_route_peer_that_never_reads_is_cut_off_at_the_budget() {
    use tokio::io::AsyncWriteExt;
    let mut cfg = common::test_config();
    cfg.cluster = Some("127.0.0.1:0".parse().unwrap());
    cfg.max_pending = 4 << 20;
    let b = TestBroker::with(cfg).await;
    let mut peer = fake_route_peer(&b).await;
    let mut pings = bytes::BytesMut::new();
    for i in 0..4096 {
        sockbus_protocol::frame::encode_ping(&mut pings, i);
    }
    let flood = async {
        // Far more PONGs than the budget holds; the broker closes first.
        for _ in 0..1024 {
            if peer.write_all(&pings).await.is_err() {
                return true;
            }
        }
        false
    };
    let cut = tokio::time::timeout(Duration::from_secs(15), flood).await;
    assert_eq!(cut, Ok(true), "the flooding route was closed");
    assert_eq!(Metrics::get(&b.state.metrics().slow_consumers), 1);
}

/// A route token as docs/protocol.md ("Cluster routes") specifies it, made
/// here independently of the broker's code.
fn route_token(secret: &str, node: &str, ms: u64, nonce: &str) -> String {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(format!("sockbus-route-v1\n{node}\n{ms}\n{nonce}").as_bytes());
    let tag: String = m
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1:{ms}:{nonce}:{tag}")
}

/// Dials `b`'s cluster port with a route CONNECT carrying `token`.
async fn route_connect(b: &TestBroker, node: &str, token: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let route = b.state.config().cluster.expect("a cluster port");
    let mut s = TcpStream::connect(route).await.unwrap();
    let mut hello = bytes::BytesMut::new();
    sockbus_protocol::frame::encode_connect(
        &mut hello,
        sockbus_protocol::frame::CONNECT_ROUTE,
        0,
        node,
        token.as_bytes(),
    )
    .unwrap();
    s.write_all(&hello).await.unwrap();
    s
}

/// Brokers sharing `--cluster-secret` form their cluster as before; a broker
/// with another secret, or none, that dials in is refused, logged and
/// counted, and no message crosses to or from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_need_the_cluster_secret_and_a_broker_without_it_is_refused() {
    let mut nodes = vec![
        Node::new("a", "127.0.0.2"),
        Node::new("b", "127.0.0.3"),
        Node::new("rogue", "127.0.0.4"),
        Node::new("open", "127.0.0.5"),
    ];
    let ab: Vec<String> = nodes[..2]
        .iter()
        .map(|n| format!("sockbus-route://{}", n.route))
        .collect();
    for n in &mut nodes {
        n.peers = ab.clone();
    }
    let a = nodes[0].start_with_secret(Some("s3cret-1")).await;
    let b = nodes[1].start_with_secret(Some("s3cret-1")).await;
    let rogue = nodes[2].start_with_secret(Some("guessed")).await;
    let open = nodes[3].start().await;
    wait_routes(&[&a, &b], 1).await;
    for x in [&a, &b] {
        wait_metric(x, "refused route", |m| {
            Metrics::get(&m.route_auth_failures).min(1)
        })
        .await;
    }
    // Both intruders keep being refused while they redial: still one route each.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(Metrics::get(&a.state.metrics().routes), 1);
    assert_eq!(Metrics::get(&b.state.metrics().routes), 1);
    assert_eq!(Metrics::get(&rogue.state.metrics().routes), 0);
    assert_eq!(Metrics::get(&open.state.metrics().routes), 0);
    assert!(
        Metrics::get(&a.state.metrics().route_auth_failures) >= 2,
        "both intruders counted"
    );

    // A message crosses between a and b, never to the intruders.
    let cb = sockbus_client::connect(&b.url).await.unwrap();
    let mut sb = cb.subscribe("orders.>").await.unwrap();
    cb.flush().await.unwrap();
    let cr = sockbus_client::connect(&rogue.url).await.unwrap();
    let mut sr = cr.subscribe("orders.>").await.unwrap();
    cr.flush().await.unwrap();
    wait_subs(&a, 1).await;
    let ca = sockbus_client::connect(&a.url).await.unwrap();
    ca.publish("orders.eu", "o1").await.unwrap();
    ca.flush().await.unwrap();
    assert_eq!(recv(&mut sb).await.payload.as_ref(), b"o1");
    nothing(&mut sr).await;
    // And the rogue's publishes do not reach a's or b's subscribers.
    cr.publish("orders.eu", "forged").await.unwrap();
    cr.flush().await.unwrap();
    nothing(&mut sb).await;
    drop((open, rogue));
}

/// A route handshake recorded off the wire cannot be played again, and one
/// made with the right secret for another node name, or too old, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_route_handshake_cannot_be_replayed() {
    let n = Node::new("a", "127.0.0.2");
    let a = n.start_with_secret(Some("s3cret-2")).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let nonce = "0123456789abcdef0123456789abcdef";
    let good = route_token("s3cret-2", "peer", now, nonce);

    let mut first = route_connect(&a, "peer", &good).await;
    let mut buf = bytes::BytesMut::new();
    let info = loop {
        use tokio::io::AsyncReadExt;
        if let Ok(Some((f, _))) = sockbus_protocol::frame::decode(&buf, u32::MAX) {
            break sockbus_protocol::Frame::from(f);
        }
        let r = tokio::time::timeout(Duration::from_secs(5), first.read_buf(&mut buf))
            .await
            .expect("an answer");
        assert!(r.unwrap() > 0, "closed");
    };
    assert!(
        matches!(info, sockbus_protocol::Frame::Info { .. }),
        "the right secret is accepted: {info:?}"
    );
    let refused = |frames: Option<Vec<sockbus_protocol::Frame>>| {
        let frames = frames.expect("closed");
        assert!(
            frames.iter().any(|f| matches!(f, sockbus_protocol::Frame::Err { text, .. } if text.contains("cluster secret"))),
            "{frames:?}"
        );
    };
    // The same bytes again: replayed.
    refused(until_closed(&mut route_connect(&a, "peer", &good).await).await);
    // The right secret bound to another name.
    refused(until_closed(&mut route_connect(&a, "other", &good).await).await);
    // Two minutes old.
    let old = route_token(
        "s3cret-2",
        "peer",
        now - 120_000,
        "fedcba9876543210fedcba9876543210",
    );
    refused(until_closed(&mut route_connect(&a, "peer", &old).await).await);
    // No token at all.
    refused(until_closed(&mut fake_route_peer(&a).await).await);
    assert_eq!(Metrics::get(&a.state.metrics().route_auth_failures), 4);
    drop(first);
}
