//! A tiny service answering requests, and a caller.
//! `cargo run -p sockbus-client --example request_reply`

#[tokio::main]
async fn main() -> Result<(), sockbus_client::Error> {
    let url = std::env::var("SOCKBUS_URL").unwrap_or_else(|_| sockbus_client::DEFAULT_URL.into());
    let client = sockbus_client::connect(&url).await?;

    // The service: a queue group, so running several copies shares the load.
    let mut requests = client.queue_subscribe("greet", "greeters").await?;
    let svc = client.clone();
    tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            if let Some(reply) = m.reply() {
                let name = String::from_utf8_lossy(&m.payload);
                let _ = svc.publish(reply, format!("hello, {name}")).await;
            }
        }
    });
    client.flush().await?;

    let answer = client.request("greet", "sockbus").await?;
    println!("{}", String::from_utf8_lossy(&answer.payload));

    match client.request("nobody.listens", "hi").await {
        Err(sockbus_client::Error::NoResponders) => println!("no responders, as expected"),
        other => println!("unexpected: {other:?}"),
    }
    client.close().await
}
