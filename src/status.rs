//! `shoal node --status-addr HOST:PORT`: the node's metrics and health over
//! plain HTTP/1.1, for Prometheus and for load balancers or orchestrators.
//!
//! - `GET /metrics`: every series the libraries record through the
//!   `metrics` facade, rendered by `metrics-exporter-prometheus` in the
//!   Prometheus text format (the names are listed in the README,
//!   "Metrics and health", and documented where they are recorded:
//!   `shoal_engine::metrics`, `shoal_net::metrics`,
//!   `shoal_shard::node::telemetry`).
//! - `GET /health`: 200 while the process is up.
//! - `GET /ready`: 200 when the node can serve
//!   ([`crate::cluster::Readiness`]: the engine is open and every group it
//!   hosts knows its leader), 503 otherwise; the body says why.
//!
//! The server runs as the service beside the node
//! ([`crate::cluster::run_node_with`]): started before the engine opens,
//! stopped (its connections aborted) once the node has shut down. It only
//! reads: readiness comes from what the runner publishes, the metrics from
//! the recorder's atomics, rendered on the blocking pool, so a scrape never
//! holds up the node's event loop or a runtime worker. It is bounded: at
//! most [`CONNECTIONS_MAX`] connections (more are closed at once), request
//! heads of at most [`REQUEST_BUFFER_BYTES_MAX`], [`HEADER_READ_TIMEOUT_MS`]
//! to send one, and [`CONNECTION_MS_MAX`] for a whole connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::cluster::NodeProbe;

/// Most connections served at once; one more is closed as soon as it is
/// accepted (a scraper and a few probes need a handful).
pub const CONNECTIONS_MAX: usize = 16;
/// Most bytes hyper buffers for one connection's request head (the
/// smallest it allows): the endpoints take no body and short paths.
pub const REQUEST_BUFFER_BYTES_MAX: usize = 8 << 10;
/// How long a client may take to send a request's head.
pub const HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// How long one connection may stay open, keep-alive included, so an idle
/// client cannot hold one of the [`CONNECTIONS_MAX`] for good.
pub const CONNECTION_MS_MAX: u64 = 60_000;
/// How often recorded histogram samples are folded into their buckets
/// between scrapes (samples are buffered until then; this bounds the
/// buffer).
pub const UPKEEP_INTERVAL_MS: u64 = 5_000;
/// Bucket bounds of every `_seconds` histogram: 50 µs (a fast SSD's
/// synced write) to 10 s (a client request at its deadline).
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// The Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Installs the process-wide Prometheus recorder, with the libraries'
/// series described (their `# HELP` lines). Call it before the node
/// starts: handles registered before it record nothing.
pub fn install_recorder() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS_SECONDS)
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    shoal_engine::metrics::describe();
    shoal_net::metrics::describe();
    shoal_shard::node::telemetry::describe();
    handle.run_upkeep();
    Ok(handle)
}

/// Binds the status endpoint's TCP listener (before the node starts, so a
/// taken port fails `shoal node` at once).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the status address {addr}"))?;
    listener
        .set_nonblocking(true)
        .context("making the status listener non-blocking")?;
    Ok(listener)
}

/// What every request handler reads.
struct State {
    metrics: PrometheusHandle,
    probe: NodeProbe,
}

/// Serves `/metrics`, `/health` and `/ready` on `listener` until the node
/// has stopped (see the module docs). Errors are logged, never fatal to
/// the node.
pub async fn serve(listener: std::net::TcpListener, metrics: PrometheusHandle, probe: NodeProbe) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "the status endpoint cannot use its listener");
            return;
        }
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "status endpoint: /metrics, /health, /ready");
    }
    let mut stop = probe.clone();
    let state = Arc::new(State { metrics, probe });
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut connections = JoinSet::new();
    let mut upkeep = tokio::time::interval(Duration::from_millis(UPKEEP_INTERVAL_MS));
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.stopped() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = upkeep.tick() => {
                let metrics = state.metrics.clone();
                // Folding samples is CPU work: off the runtime's workers.
                let _ = tokio::task::spawn_blocking(move || metrics.run_upkeep()).await;
            }
            accepted = listener.accept() => {
                let (stream, remote) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a
                        // little rather than spin.
                        tracing::warn!(error = %e, "status endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::debug!(%remote, "status endpoint: too many connections; closed");
                    continue;
                };
                let state = state.clone();
                connections.spawn(async move {
                    let service = service_fn(move |request| respond(request, state.clone()));
                    let mut builder = http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS))
                        .max_buf_size(REQUEST_BUFFER_BYTES_MAX);
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    match tokio::time::timeout(Duration::from_millis(CONNECTION_MS_MAX), connection).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "status endpoint: connection failed"),
                        Err(_) => tracing::debug!(%remote, "status endpoint: connection open too long; closed"),
                    }
                    drop(permit);
                });
            }
        }
    }
    // The node is gone: nothing left to report.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// Answers one request.
async fn respond(
    request: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/health" | "/ready") {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: the status endpoint serves /metrics, /health and /ready\n".into(),
        ));
    }
    if request.method() != Method::GET {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served\n".into(),
        ));
    }
    Ok(match path {
        "/metrics" => {
            let metrics = state.metrics.clone();
            // Rendering walks every series: off the runtime's workers.
            match tokio::task::spawn_blocking(move || metrics.render()).await {
                Ok(body) => response(StatusCode::OK, METRICS_CONTENT_TYPE, body),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("rendering the metrics failed: {e}\n"),
                ),
            }
        }
        "/health" => text(StatusCode::OK, "ok\n".into()),
        _ => {
            let readiness = state.probe.readiness();
            let status = if readiness.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, format!("{readiness}\n"))
        }
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, TEXT_CONTENT_TYPE, body)
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
