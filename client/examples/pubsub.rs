//! Subscribe to a wildcard, publish a few events, print what arrives.
//! Run a broker first (`cargo run -p sockbus-broker`), then:
//! `cargo run -p sockbus-client --example pubsub`

#[tokio::main]
async fn main() -> Result<(), sockbus_client::Error> {
    let url = std::env::var("SOCKBUS_URL").unwrap_or_else(|_| sockbus_client::DEFAULT_URL.into());
    let client = sockbus_client::connect(&url).await?;
    let mut sub = client.subscribe("orders.*.created").await?;
    for region in ["eu", "us", "apac"] {
        client
            .publish(
                &format!("orders.{region}.created"),
                format!("order from {region}"),
            )
            .await?;
    }
    client.flush().await?;
    for _ in 0..3 {
        if let Some(m) = sub.next().await {
            println!("{}: {}", m.subject(), String::from_utf8_lossy(&m.payload));
        }
    }
    client.drain().await
}
