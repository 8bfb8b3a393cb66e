//! The HTTP API of a node: routing, request decoding and response shapes.
//!
//! One `Api` value per shard (it holds the shard's `Rc`); hyper clones it per connection.
//! Errors answer with Arc's JSON error shape `{"success":false,"error":"..."}`, which InfluxDB
//! clients also read (they look at `error`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::ingest::{decompress, detect_encoding, DecodeError};
use crate::line_protocol::{ParseErrorKind, Precision};
use crate::metrics::{Endpoint, NodeMetrics};
use crate::node::NodeShared;
use crate::query::engine::{Format, QueryError, QueryEvent, QueryRequest};
use crate::shard::{Shard, WriteError};

/// A response body: whole, or streamed from a query worker.
pub enum Body {
    Full(Full<Bytes>),
    Query(Pin<Box<flume::r#async::RecvStream<'static, QueryEvent>>>),
}

impl Body {
    pub fn new(bytes: Bytes) -> Body {
        Body::Full(Full::new(bytes))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        match self.get_mut() {
            Body::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            Body::Query(stream) => loop {
                return match futures_lite::Stream::poll_next(stream.as_mut(), cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(None) => Poll::Ready(Some(Err("query worker stopped".into()))),
                    Poll::Ready(Some(QueryEvent::Head)) => continue,
                    Poll::Ready(Some(QueryEvent::Chunk(bytes))) => {
                        Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes))))
                    }
                    Poll::Ready(Some(QueryEvent::End)) => Poll::Ready(None),
                    // The status line is gone: cutting the response off is the only honest
                    // signal left (the client sees an incomplete body, never a wrong answer).
                    Poll::Ready(Some(QueryEvent::Failed(error))) => {
                        Poll::Ready(Some(Err(error.to_string().into())))
                    }
                };
            },
        }
    }
}

/// The per-shard HTTP service.
#[derive(Clone)]
pub struct Api {
    shard: Rc<Shard>,
    node: Arc<NodeShared>,
}

impl Api {
    pub fn new(shard: Rc<Shard>, node: Arc<NodeShared>) -> Self {
        Api { shard, node }
    }

    async fn route(&self, request: Request<Incoming>) -> (Endpoint, Response<Body>) {
        let path = request.uri().path().to_string();
        match (request.method(), path.as_str()) {
            (
                &Method::POST,
                "/write"
                | "/api/v2/write"
                | "/api/v1/write/line-protocol"
                | "/api/v1/write/msgpack",
            ) => (Endpoint::Write, self.write(request).await),
            (&Method::GET, "/health") => (
                Endpoint::Other,
                json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
            ),
            (&Method::GET, "/ready") => (Endpoint::Other, self.ready()),
            (&Method::GET, "/metrics") => (Endpoint::Other, self.metrics()),
            (&Method::GET, "/api/v1/cluster/files") => (Endpoint::Other, self.files(&request)),
            (&Method::POST, "/api/v1/query") => {
                (Endpoint::Query, self.query(request, Format::Json).await)
            }
            (&Method::POST, "/api/v1/query/arrow") => {
                (Endpoint::Query, self.query(request, Format::Arrow).await)
            }
            (&Method::GET, "/api/v1/databases") => (Endpoint::Other, self.databases()),
            (&Method::GET, p)
                if p.starts_with("/api/v1/databases/") && p.ends_with("/measurements") =>
            {
                let database = &p["/api/v1/databases/".len()..p.len() - "/measurements".len()];
                (
                    Endpoint::Other,
                    self.measurements(&percent_decode(database)),
                )
            }
            (
                _,
                "/write"
                | "/api/v2/write"
                | "/api/v1/write/line-protocol"
                | "/health"
                | "/ready"
                | "/metrics"
                | "/api/v1/cluster/files",
            ) => (
                Endpoint::Other,
                error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("method {} is not allowed on {path}", request.method()),
                ),
            ),
            _ => (
                Endpoint::Other,
                error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
            ),
        }
    }

    async fn write(&self, request: Request<Incoming>) -> Response<Body> {
        let query = query_pairs(request.uri().query());
        let path = request.uri().path().to_string();
        let database = match path.as_str() {
            "/api/v2/write" => query.get("bucket").cloned(),
            "/api/v1/write/line-protocol" | "/api/v1/write/msgpack" => {
                header_value(&request, "x-arc-database").or_else(|| query.get("db").cloned())
            }
            _ => query.get("db").cloned(),
        };
        let Some(database) = database.filter(|d| !d.is_empty()) else {
            let what = match path.as_str() {
                "/api/v2/write" => "the bucket query parameter",
                "/api/v1/write/line-protocol" | "/api/v1/write/msgpack" => {
                    "the x-arc-database header"
                }
                _ => "the db query parameter",
            };
            return error(
                StatusCode::BAD_REQUEST,
                &format!("database name is required: set {what}"),
            );
        };
        let precision = match query.get("precision").map(String::as_str) {
            None | Some("") => Precision::Nanoseconds,
            Some(text) => match Precision::parse(text) {
                Ok(p) => p,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
            },
        };
        let limits = &self.node.config.ingest;
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limits.body_bytes_max as u64) {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!(
                    "request body is larger than body_bytes_max ({} bytes)",
                    limits.body_bytes_max
                ),
            );
        }
        let content_encoding = header_value(&request, "content-encoding");
        let body = match Limited::new(request.into_body(), limits.body_bytes_max)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "request body is larger than body_bytes_max ({} bytes)",
                        limits.body_bytes_max
                    ),
                )
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("read request body: {e}")),
        };
        let decoded = detect_encoding(content_encoding.as_deref(), &body)
            .and_then(|encoding| decompress(encoding, body, limits.decompressed_bytes_max));
        let body = match decoded {
            Ok(body) => body,
            Err(e @ DecodeError::TooLarge { .. }) => {
                return error(StatusCode::PAYLOAD_TOO_LARGE, &e.to_string())
            }
            Err(e @ DecodeError::Unsupported(_)) => {
                return error(StatusCode::UNSUPPORTED_MEDIA_TYPE, &e.to_string())
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let (precision, body) = if path == "/api/v1/write/msgpack" {
            // Arc's MessagePack becomes canonical line protocol (microseconds), so the WAL,
            // replay and buffers have one format to handle.
            let now_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0);
            let mut lines = String::with_capacity(body.len() * 2);
            let limits = crate::msgpack::MsgpackLimits::default();
            if let Err(e) = crate::msgpack::to_line_protocol(&body, now_us, &limits, &mut lines) {
                let status = match e {
                    crate::msgpack::MsgpackError::TooManyRows { .. }
                    | crate::msgpack::MsgpackError::TooManyColumns { .. } => {
                        StatusCode::PAYLOAD_TOO_LARGE
                    }
                    _ => StatusCode::BAD_REQUEST,
                };
                return error(status, &e.to_string());
            }
            // Column names repeat on every line, so the translation can be far larger than
            // the body: it must still fit the WAL record limit.
            let bytes_max = self.node.config.ingest.decompressed_bytes_max;
            if lines.len() > bytes_max {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "body expands to {} bytes of rows, more than ingest.decompressed_bytes_max ({})",
                        lines.len(),
                        bytes_max
                    ),
                );
            }
            (Precision::Microseconds, Bytes::from(lines))
        } else {
            (precision, body)
        };
        match self.shard.write(&database, precision, body).await {
            Ok(_) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::new(Bytes::new()))
                .expect("static response"),
            Err(e) => write_error(e),
        }
    }

    async fn query(&self, request: Request<Incoming>, format: Format) -> Response<Body> {
        if !self.node.is_ready() {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "node is starting: WAL recovery is not finished",
            );
        }
        let default_database = header_value(&request, "x-arc-database").filter(|d| !d.is_empty());
        let limit = self.node.config.query.request_bytes_max;
        let body = match Limited::new(request.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "query request is larger than query.request_bytes_max ({limit} bytes)"
                    ),
                )
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("read request body: {e}")),
        };
        #[derive(serde::Deserialize)]
        struct QueryBody {
            sql: String,
            #[serde(default)]
            database: Option<String>,
        }
        let parsed: QueryBody = match serde_json::from_slice(&body) {
            Ok(parsed) => parsed,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("request body must be JSON like {{\"sql\": \"SELECT ...\"}}: {e}"),
                )
            }
        };
        let request = QueryRequest {
            sql: parsed.sql,
            default_database: parsed.database.or(default_database),
            format,
        };
        let events = match self.node.query.submit(request) {
            Ok(events) => events,
            Err(e) => return query_error(e),
        };
        match events.recv_async().await {
            Ok(QueryEvent::Head) => {}
            Ok(QueryEvent::Failed(e)) => return query_error(e),
            Ok(_) | Err(_) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "query worker ended without an answer",
                )
            }
        }
        let content_type = match format {
            Format::Json => "application/json",
            Format::Arrow => "application/vnd.apache.arrow.stream",
        };
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::Query(Box::pin(events.into_stream())))
            .expect("static response")
    }

    /// Databases are what the manifest knows: tables with files or declared columns.
    fn databases(&self) -> Response<Body> {
        let version = self.node.manifest.current();
        let mut names: Vec<&str> = known_tables(&version).map(|(d, _)| d).collect();
        names.dedup();
        let body = serde_json::json!({ "success": true, "count": names.len(), "databases": names });
        json(StatusCode::OK, body.to_string())
    }

    fn measurements(&self, database: &str) -> Response<Body> {
        let version = self.node.manifest.current();
        let names: Vec<&str> = known_tables(&version)
            .filter(|(d, _)| *d == database)
            .map(|(_, m)| m)
            .collect();
        if names.is_empty() {
            return error(
                StatusCode::NOT_FOUND,
                &format!("database {database} does not exist"),
            );
        }
        let body = serde_json::json!({
            "success": true,
            "database": database,
            "count": names.len(),
            "measurements": names,
        });
        json(StatusCode::OK, body.to_string())
    }

    fn ready(&self) -> Response<Body> {
        if self.node.is_ready() {
            json(StatusCode::OK, r#"{"status":"ready"}"#.into())
        } else {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "WAL recovery is not finished",
            )
        }
    }

    fn metrics(&self) -> Response<Body> {
        self.shard.refresh_wal_metrics();
        let manifest = self.node.manifest.metrics();
        let engine = &self.node.query.metrics;
        let version = self.node.manifest.current();
        let text = NodeMetrics::render(
            &self.node.metrics,
            &[
                (
                    "shale_manifest_applied_index",
                    "Raft log index the manifest reflects.",
                    version.index as f64,
                ),
                (
                    "shale_manifest_files",
                    "Files listed in the manifest.",
                    version.manifest.files().len() as f64,
                ),
                (
                    "shale_manifest_proposals_total",
                    "Commands proposed through Raft by this node.",
                    manifest.commits_total as f64,
                ),
                (
                    "shale_manifest_proposal_errors_total",
                    "Proposals that failed.",
                    manifest.commit_errors_total as f64,
                ),
                (
                    "shale_ready_shards",
                    "Shards that finished WAL recovery.",
                    self.node.ready_shards() as f64,
                ),
                (
                    "shale_queries_total",
                    "Queries run by the DuckDB workers.",
                    engine.queries.get() as f64,
                ),
                (
                    "shale_query_errors_total",
                    "Queries that failed (timeouts included).",
                    engine.query_errors.get() as f64,
                ),
                (
                    "shale_query_timeouts_total",
                    "Queries interrupted at query.timeout_ms.",
                    engine.query_timeouts.get() as f64,
                ),
                (
                    "shale_query_files_read_total",
                    "Parquet files queries read.",
                    engine.files_read.get() as f64,
                ),
                (
                    "shale_query_files_pruned_total",
                    "Files skipped by the manifest's time ranges.",
                    engine.files_pruned.get() as f64,
                ),
                (
                    "shale_query_buffer_pieces_total",
                    "Unflushed buffer pieces queries read.",
                    engine.buffer_pieces.get() as f64,
                ),
            ],
        );
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Body::new(Bytes::from(text)))
            .expect("static response")
    }

    fn files(&self, request: &Request<Incoming>) -> Response<Body> {
        let query = query_pairs(request.uri().query());
        let version = self.node.manifest.current();
        let files: Vec<_> = version
            .manifest
            .files()
            .values()
            .filter(|f| query.get("database").is_none_or(|d| &f.database == d))
            .filter(|f| query.get("measurement").is_none_or(|m| &f.measurement == m))
            .collect();
        let body = serde_json::json!({
            "success": true,
            "manifest_index": version.index,
            "count": files.len(),
            "files": files,
        });
        json(StatusCode::OK, body.to_string())
    }
}

impl hyper::service::Service<Request<Incoming>> for Api {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>>>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let api = self.clone();
        Box::pin(async move {
            let started = Instant::now();
            let (endpoint, response) = api.route(request).await;
            api.shard.metrics.record_request(
                endpoint,
                response.status().as_u16(),
                started.elapsed(),
            );
            Ok(response)
        })
    }
}

/// Every (database, measurement) the manifest knows, sorted, each once.
fn known_tables(
    version: &shale_replication::ManifestVersion,
) -> impl Iterator<Item = (&str, &str)> {
    let manifest = &version.manifest;
    let tables: std::collections::BTreeSet<(&str, &str)> = manifest
        .tables()
        .keys()
        .map(|(d, m)| (d.as_str(), m.as_str()))
        .chain(
            manifest
                .files()
                .values()
                .map(|f| (f.database.as_str(), f.measurement.as_str())),
        )
        .collect();
    tables.into_iter()
}

fn query_error(e: QueryError) -> Response<Body> {
    let status = match &e {
        QueryError::Rejected(_) | QueryError::Sql(_) => StatusCode::BAD_REQUEST,
        QueryError::NotFound(_) => StatusCode::NOT_FOUND,
        QueryError::Busy(_) => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return response;
        }
        QueryError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        QueryError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        QueryError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

fn write_error(e: WriteError) -> Response<Body> {
    let status = match &e {
        WriteError::Parse(p) => match p.kind {
            ParseErrorKind::LineTooLong { .. } | ParseErrorKind::BodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            _ => StatusCode::BAD_REQUEST,
        },
        WriteError::Schema(_) | WriteError::BadRequest(_) => StatusCode::BAD_REQUEST,
        WriteError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        WriteError::Overloaded(_) | WriteError::NotReady => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return response;
        }
        WriteError::Durability(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

fn header_value(request: &Request<Incoming>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Decodes `a=b&c=d` with percent-decoding; later duplicates win.
fn query_pairs(query: Option<&str>) -> HashMap<String, String> {
    let mut pairs = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.insert(percent_decode(key), percent_decode(value));
    }
    pairs
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::new(Bytes::from(body)))
        .expect("static response")
}

pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        serde_json::json!({ "success": false, "error": message }).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checks query-string decoding, including percent escapes and a malformed escape.
    #[test]
    fn query_strings_decode() {
        let pairs = query_pairs(Some("db=my%2Ddb&precision=ms&x=a+b&bad=%zz&t=%4"));
        assert_eq!(pairs["db"], "my-db");
        assert_eq!(pairs["precision"], "ms");
        assert_eq!(pairs["x"], "a b");
        assert_eq!(pairs["bad"], "%zz");
        assert_eq!(pairs["t"], "%4");
    }
}
