//! Request/reply through a broker with SDK clients, shared by the benches.

use std::time::{Duration, Instant};

/// `n` round trips (after 1,000 of warm-up) from a requester to an echo
/// replier through the broker at `url`, `size`-byte payloads. The requester
/// is a task of its own, as in a service (a runtime's `block_on` future is
/// only polled after the runtime looked for I/O once more). `at_start` runs
/// once, when the warm-up is over; its result comes back with the latencies.
pub async fn sdk_round_trips<T: Send + 'static>(
    url: &str,
    size: usize,
    n: usize,
    at_start: impl FnOnce() -> T + Send + 'static,
) -> (Vec<Duration>, T) {
    let svc = sockbus_client::connect(url).await.unwrap();
    let mut reqs = svc.subscribe("bench.rr").await.unwrap();
    svc.flush().await.unwrap();
    let replier = tokio::spawn(async move {
        while let Some(m) = reqs.next().await {
            if let Some(r) = m.reply() {
                let _ = svc.publish(r, &m.payload).await;
            }
        }
    });
    let c = sockbus_client::connect(url).await.unwrap();
    let r = tokio::spawn(async move {
        let body = vec![0u8; size];
        for _ in 0..1000 {
            c.request("bench.rr", &body).await.unwrap();
        }
        let started = at_start();
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            c.request("bench.rr", &body).await.unwrap();
            lat.push(t.elapsed());
        }
        (lat, started)
    })
    .await
    .unwrap();
    replier.abort();
    r
}
