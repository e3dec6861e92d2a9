//! Request dispatch: which route a path is, which methods it takes, and the
//! answers of the small routes. Every error is JSON `{"error": "..."}`.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt::Display;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::auth::User;
use sockbus_protocol::Credentials;

use super::{exposition, monitor, publish, sse, status, streams, ConnCtx, Gateway};

/// A response body: a whole buffer, or an SSE stream.
pub(super) type Body = Either<Full<Bytes>, BoxBody<Bytes, Infallible>>;

const STATUS_PAGE: &str = include_str!("status.html");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    Page,
    Status,
    Publish,
    Subscribe,
    Streams,
    Stream,
    Metrics,
    Healthz,
    Readyz,
    Varz,
    Jsz,
    Unknown,
}

impl Route {
    pub(super) const ALL: [Route; 12] = [
        Route::Page,
        Route::Status,
        Route::Publish,
        Route::Subscribe,
        Route::Streams,
        Route::Stream,
        Route::Metrics,
        Route::Healthz,
        Route::Readyz,
        Route::Varz,
        Route::Jsz,
        Route::Unknown,
    ];

    /// The `route` label of `sockbus_http_requests_total`: the route's
    /// template, never the raw path, so the label set stays small.
    pub(super) fn label(self) -> &'static str {
        match self {
            Route::Page => "/",
            Route::Status => "/v1/status",
            Route::Publish => "/v1/publish/{subject}",
            Route::Subscribe => "/v1/subscribe/{subject}",
            Route::Streams => "/v1/streams",
            Route::Stream => "/v1/streams/{name}",
            Route::Metrics => "/metrics",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Varz => "/varz",
            Route::Jsz => "/jsz",
            Route::Unknown => "unknown",
        }
    }

    fn allow(self) -> &'static str {
        match self {
            Route::Publish => "POST",
            // HEAD would open a subscription that nobody reads.
            Route::Subscribe => "GET",
            _ => "GET, HEAD",
        }
    }

    fn accepts(self, m: &Method) -> bool {
        match self {
            Route::Publish => m == Method::POST,
            Route::Subscribe => m == Method::GET,
            _ => m == Method::GET || m == Method::HEAD,
        }
    }

    /// The route of a path, and the path's variable part (subject or name).
    pub(super) fn of(path: &str) -> (Route, &str) {
        let fixed = match path {
            "/" => Route::Page,
            "/v1/status" => Route::Status,
            "/v1/streams" => Route::Streams,
            "/metrics" => Route::Metrics,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/varz" => Route::Varz,
            "/jsz" => Route::Jsz,
            _ => Route::Unknown,
        };
        if fixed != Route::Unknown {
            return (fixed, "");
        }
        for (prefix, route) in [
            ("/v1/publish/", Route::Publish),
            ("/v1/subscribe/", Route::Subscribe),
            ("/v1/streams/", Route::Stream),
        ] {
            if let Some(rest) = path.strip_prefix(prefix) {
                return (route, rest);
            }
        }
        (Route::Unknown, "")
    }
}

pub(super) async fn handle(
    gw: &Arc<Gateway>,
    ctx: &Arc<ConnCtx>,
    shutdown: &CancellationToken,
    req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let (route, rest) = Route::of(path);
    let resp = if route == Route::Unknown {
        error(
            StatusCode::NOT_FOUND,
            format!("no route for {} {path} (see docs/http.md)", parts.method),
        )
    } else if !route.accepts(&parts.method) {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} is not allowed on {}; allowed: {}",
                parts.method,
                route.label(),
                route.allow()
            ),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(route.allow()));
        r
    } else {
        match authorize(gw, ctx, route, &parts.headers).await {
            Err(r) => r,
            Ok(user) => match route {
                Route::Publish => {
                    publish::publish(gw, ctx, &parts, rest, body, user.as_deref()).await
                }
                Route::Subscribe => {
                    sse::subscribe(gw, ctx, shutdown, rest, parts.uri.query(), user.as_deref())
                }
                Route::Streams => json(StatusCode::OK, &streams::list(&gw.state, user.as_deref())),
                Route::Stream => match decode_path(rest) {
                    Err(e) => error(StatusCode::BAD_REQUEST, e),
                    Ok(name) => match streams::info(&gw.state, user.as_deref(), &name) {
                        Some(v) => json(StatusCode::OK, &v),
                        None => error(StatusCode::NOT_FOUND, format!("no stream named {name:?}")),
                    },
                },
                Route::Metrics => {
                    let mut r =
                        Response::new(Either::Left(Full::new(Bytes::from(exposition::render(gw)))));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    r
                }
                Route::Healthz | Route::Readyz => {
                    let (status, body) = probe(gw, route);
                    json(status, &body)
                }
                Route::Page => {
                    let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(
                        STATUS_PAGE.as_bytes(),
                    ))));
                    let h = r.headers_mut();
                    h.insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/html; charset=utf-8"),
                    );
                    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                    r
                }
                Route::Status => json(StatusCode::OK, &status::snapshot(gw)),
                Route::Varz => json(StatusCode::OK, &monitor::varz(gw)),
                Route::Jsz => match monitor::JszQuery::parse(parts.uri.query()) {
                    Err(e) => error(StatusCode::BAD_REQUEST, e),
                    Ok(q) => {
                        let all: Vec<&crate::account::Account> =
                            gw.state.accounts.all().iter().map(|a| &**a).collect();
                        json(StatusCode::OK, &monitor::jsz(gw, &all, &q))
                    }
                },
                Route::Unknown => unreachable!("handled above"),
            },
        }
    };
    let took = start.elapsed();
    gw.metrics.observe(route, resp.status(), took);
    debug!(conn = ctx.id, method = %parts.method, path, status = resp.status().as_u16(), micros = took.as_micros() as u64, "request");
    resp
}

/// Who makes the request, when the broker has users: every route but the
/// probes needs `Authorization: Basic` (user and password) or `Bearer`
/// (token), or, without the header, a client certificate that names a user
/// (mTLS): 401 without or with wrong credentials. Publish and subscribe
/// then check the user's permissions (403); the observing routes (`/metrics`,
/// the status page, `/v1/status`, `/v1/streams`, `/varz`, `/jsz`) show every
/// subject and stream, so they need a user who may subscribe to `>` (403 otherwise).
async fn authorize(
    gw: &Gateway,
    ctx: &ConnCtx,
    route: Route,
    headers: &hyper::HeaderMap,
) -> Result<Option<Arc<User>>, Response<Body>> {
    let Some(users) = gw.state.users() else {
        return Ok(None);
    };
    let users = &*users;
    if matches!(route, Route::Healthz | Route::Readyz) {
        return Ok(None);
    }
    let unauthorized = |why: &str| {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            format!("authorization failed: {why}"),
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"sockbus\""),
        );
        r
    };
    let value = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let cert_user = match (value, &ctx.cert) {
        // No credentials over mTLS: the certificate names the user.
        (None, Some(names)) => Some(users.authenticate_cert(names)),
        _ => None,
    };
    let user = match cert_user {
        Some(Ok(u)) => u,
        Some(Err(e)) => {
            warn!(route = route.label(), "HTTP request refused: {e}");
            return Err(unauthorized(
                e.to_string().trim_start_matches("authorization failed: "),
            ));
        }
        None => password_user(users, route, value, unauthorized).await?,
    };
    let observer = matches!(
        route,
        Route::Metrics
            | Route::Page
            | Route::Status
            | Route::Streams
            | Route::Stream
            | Route::Varz
            | Route::Jsz
    );
    if observer
        && !user
            .perms
            .as_ref()
            .is_none_or(|p| p.subscribe.allows_pattern(">"))
    {
        return Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "permission denied: {} shows every subject; user {:?} may not subscribe to >",
                route.label(),
                user.name
            ),
        ));
    }
    // `/metrics` and the status page are the whole broker's (every
    // account's figures, the busiest subjects of all of them, the default
    // account's streams): the operator's, in the default account. The
    // stream routes show the user's own account only.
    let broker_wide = matches!(
        route,
        Route::Metrics | Route::Page | Route::Status | Route::Varz | Route::Jsz
    );
    if broker_wide && user.account != crate::auth::DEFAULT_ACCOUNT {
        return Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "permission denied: {} shows every account; user {:?} is in account {:?}, not the default account",
                route.label(),
                user.name,
                user.account
            ),
        ));
    }
    Ok(Some(user))
}

/// The user an `Authorization` header names (401 when it names none).
async fn password_user(
    users: &crate::auth::Users,
    route: Route,
    value: Option<&str>,
    unauthorized: impl Fn(&str) -> Response<Body>,
) -> Result<Arc<User>, Response<Body>> {
    let Some(value) = value else {
        users
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(unauthorized(
            "no credentials (Authorization: Basic or Bearer)",
        ));
    };
    let basic;
    let creds = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
            Credentials::Token(rest.trim().as_bytes())
        }
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("basic") => {
            use base64::Engine;
            basic = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            match basic.as_deref().and_then(|b| b.split_once(':')) {
                Some((user, password)) => Credentials::UserPassword {
                    user,
                    password: password.as_bytes(),
                },
                None => {
                    users
                        .failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(unauthorized("malformed Basic credentials"));
                }
            }
        }
        _ => {
            users
                .failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(unauthorized("use Authorization: Basic or Bearer"));
        }
    };
    match users.authenticate(creds).await {
        Ok(u) => Ok(u),
        Err(e) => {
            warn!(route = route.label(), "HTTP request refused: {e}");
            Err(unauthorized(
                e.to_string().trim_start_matches("authorization failed: "),
            ))
        }
    }
}

/// The answer of a probe route, `/healthz` or `/readyz`; also given to
/// connections over the connection limit (`limit`). Liveness says only
/// that the process is alive and serving: it is always 200.
pub(super) fn probe(gw: &Gateway, route: Route) -> (StatusCode, serde_json::Value) {
    match route {
        Route::Readyz => match status::ready(gw) {
            Ok(()) => (StatusCode::OK, serde_json::json!({"status": "ready"})),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": format!("not ready: {why}") }),
            ),
        },
        _ => (StatusCode::OK, serde_json::json!({"status": "ok"})),
    }
}

/// A JSON error: `{"error": "..."}`.
pub(super) fn error(status: StatusCode, msg: impl Display) -> Response<Body> {
    json(status, &serde_json::json!({ "error": msg.to_string() }))
}

pub(super) fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    body.push(b'\n');
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Percent-decodes a path segment (a subject or stream name). Allocates
/// only when there is something to decode.
pub(super) fn decode_path(s: &str) -> Result<Cow<'_, str>, String> {
    if !s.contains('%') {
        return Ok(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_routes_and_their_variable_part() {
        assert_eq!(Route::of("/v1/publish/a.b"), (Route::Publish, "a.b"));
        assert_eq!(Route::of("/v1/publish/"), (Route::Publish, ""));
        assert_eq!(Route::of("/v1/publish").0, Route::Unknown);
        assert_eq!(Route::of("/v1/subscribe/a.>"), (Route::Subscribe, "a.>"));
        assert_eq!(Route::of("/v1/streams/orders"), (Route::Stream, "orders"));
        assert_eq!(Route::of("/v1/streams").0, Route::Streams);
        assert_eq!(Route::of("/").0, Route::Page);
        assert_eq!(Route::of("/nope").0, Route::Unknown);
    }

    #[test]
    fn percent_decoding_only_allocates_when_needed() {
        assert!(matches!(decode_path("a.b"), Ok(Cow::Borrowed("a.b"))));
        assert_eq!(decode_path("a.%3E").unwrap(), "a.>");
        assert_eq!(decode_path("caf%C3%A9").unwrap(), "café");
        assert!(decode_path("a%2").is_err());
        assert!(decode_path("%FF").is_err());
    }
}
