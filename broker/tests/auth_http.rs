//! The HTTP gateway with users: 401 without or with wrong credentials, 403
//! when the user's permissions deny it, probes always open.

mod common;
mod http_util;

use std::sync::Arc;

use bytes::Bytes;
use common::test_config;
use http_util::{request, HttpBroker};
use hyper::{Method, StatusCode};
use sockbus_broker::auth::{UserConfig, Users};

fn list(v: &[&str]) -> Option<Vec<String>> {
    Some(v.iter().map(|s| s.to_string()).collect())
}

async fn broker() -> HttpBroker {
    let users = Users::from_config(vec![
        UserConfig {
            name: "orders".into(),
            password: Some("orders-pw".into()),
            publish: list(&["orders.>"]),
            subscribe: list(&["orders.>"]),
            ..Default::default()
        },
        UserConfig {
            name: "prometheus".into(),
            token: Some("scrape".into()),
            ..Default::default()
        },
    ])
    .unwrap();
    HttpBroker::with(sockbus_broker::Config {
        users: Some(Arc::new(users)),
        ..test_config()
    })
    .await
}

/// `orders:orders-pw`, base64.
const ORDERS: &str = "Basic b3JkZXJzOm9yZGVycy1wdw==";

async fn call(b: &HttpBroker, method: Method, path: &str, auth: Option<&str>) -> StatusCode {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    request(b.http, method, path, &headers, Bytes::from_static(b"x"))
        .await
        .status
}

#[tokio::test]
async fn http_needs_credentials_and_checks_permissions() {
    let b = broker().await;
    // No or wrong credentials: 401 on every route but the probes.
    for path in [
        "/v1/publish/orders.new",
        "/metrics",
        "/v1/status",
        "/",
        "/v1/streams",
    ] {
        let m = if path.starts_with("/v1/publish") {
            Method::POST
        } else {
            Method::GET
        };
        assert_eq!(
            call(&b, m.clone(), path, None).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            call(&b, m, path, Some("Bearer wrong")).await,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    let r = request(b.http, Method::GET, "/metrics", &[], Bytes::new()).await;
    assert!(r
        .header("www-authenticate")
        .is_some_and(|h| h.starts_with("Basic")));
    assert_eq!(
        call(&b, Method::GET, "/healthz", None).await,
        StatusCode::OK
    );
    // Allowed and denied publishes and subscriptions.
    assert_eq!(
        call(&b, Method::POST, "/v1/publish/orders.new", Some(ORDERS)).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&b, Method::POST, "/v1/publish/billing.x", Some(ORDERS)).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&b, Method::GET, "/v1/subscribe/billing.%3E", Some(ORDERS)).await,
        StatusCode::FORBIDDEN
    );
    // /metrics shows every user's counters: a restricted user may not see
    // it, a user without lists (a scraper's token) may.
    assert_eq!(
        call(&b, Method::GET, "/metrics", Some(ORDERS)).await,
        StatusCode::FORBIDDEN
    );
    let r = request(
        b.http,
        Method::GET,
        "/metrics",
        &[("authorization", "Bearer scrape")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let text = r.text();
    assert!(
        text.contains("sockbus_permission_denied_publish_total{user=\"orders\"} 1"),
        "{text}"
    );
    assert!(text.contains("sockbus_permission_denied_subscribe_total{user=\"orders\"} 1"));
    assert!(!text.contains("billing"), "no subject names in the labels");
}
