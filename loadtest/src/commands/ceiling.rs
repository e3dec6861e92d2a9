//! `sockbus-loadtest hyper-ceiling`: the smallest useful HTTP server (hyper,
//! HTTP/1.1, keep-alive), reading each POST body and answering 204. Whatever
//! `hey` measures against it is the ceiling of this machine for an HTTP
//! publish route, so the broker's gateway can be judged against it.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

#[derive(Args, Debug)]
pub struct CeilingArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7481")]
    pub listen: SocketAddr,
}

pub async fn execute(args: CeilingArgs) -> anyhow::Result<()> {
    let socket = if args.listen.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // A deep accept queue: hey opens 10,000 connections at once.
    let listener = socket.listen(65_535)?;
    eprintln!(
        "hyper-ceiling: listening on http://{} (204 to every POST)",
        listener.local_addr()?
    );
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(handle))
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, hyper::Error> {
    let status = if req.method() == Method::POST {
        // Read the body like a real handler would.
        req.into_body().collect().await?;
        StatusCode::NO_CONTENT
    } else {
        StatusCode::METHOD_NOT_ALLOWED
    };
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = status;
    Ok(resp)
}
