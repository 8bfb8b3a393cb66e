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
use crate::shard::{Shard, WriteError};

pub type Body = Full<Bytes>;

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
            (&Method::POST, "/write" | "/api/v2/write" | "/api/v1/write/line-protocol") => {
                (Endpoint::Write, self.write(request).await)
            }
            (&Method::GET, "/health") => (
                Endpoint::Other,
                json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
            ),
            (&Method::GET, "/ready") => (Endpoint::Other, self.ready()),
            (&Method::GET, "/metrics") => (Endpoint::Other, self.metrics()),
            (&Method::GET, "/api/v1/cluster/files") => (Endpoint::Other, self.files(&request)),
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
        let path = request.uri().path();
        let database = match path {
            "/api/v2/write" => query.get("bucket").cloned(),
            "/api/v1/write/line-protocol" => {
                header_value(&request, "x-arc-database").or_else(|| query.get("db").cloned())
            }
            _ => query.get("db").cloned(),
        };
        let Some(database) = database.filter(|d| !d.is_empty()) else {
            let what = match path {
                "/api/v2/write" => "the bucket query parameter",
                "/api/v1/write/line-protocol" => "the x-arc-database header",
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
        match self.shard.write(&database, precision, body).await {
            Ok(_) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::new(Bytes::new()))
                .expect("static response"),
            Err(e) => write_error(e),
        }
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
