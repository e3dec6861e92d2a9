//! Three workers in one queue group: each job is handled by exactly one.
//! `cargo run -p sockbus-client --example queue_group`

use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), sockbus_client::Error> {
    let url = std::env::var("SOCKBUS_URL").unwrap_or_else(|_| sockbus_client::DEFAULT_URL.into());
    let client = sockbus_client::connect(&url).await?;
    let mut workers = Vec::new();
    for w in 0..3 {
        let mut sub = client.queue_subscribe("jobs.>", "workers").await?;
        workers.push(tokio::spawn(async move {
            let mut done = 0;
            while let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(500), sub.next()).await
            {
                let _ = m;
                done += 1;
            }
            println!("worker {w} handled {done} jobs");
        }));
    }
    client.flush().await?;
    for i in 0..30 {
        client.publish("jobs.resize", format!("job {i}")).await?;
    }
    client.flush().await?;
    for w in workers {
        let _ = w.await;
    }
    client.close().await
}
