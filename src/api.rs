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
use std::time::{Duration, Instant};

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
        let (route, parameter) = match find_route(request.method(), request.uri().path()) {
            RouteMatch::Found { route, parameter } => (route, parameter),
            RouteMatch::WrongMethod { allowed } => {
                let allow = allowed
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", ");
                let mut response = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!(
                        "method {} is not allowed on {}; allowed: {allow}",
                        request.method(),
                        request.uri().path()
                    ),
                );
                if let Ok(value) = header::HeaderValue::from_str(&allow) {
                    response.headers_mut().insert(header::ALLOW, value);
                }
                return (Endpoint::Other, response);
            }
            RouteMatch::NotFound => {
                let message = format!("no such endpoint: {}", request.uri().path());
                return (Endpoint::Other, error(StatusCode::NOT_FOUND, &message));
            }
        };
        if route.pattern.starts_with("/api/v1/cluster") {
            if let Err(response) = self.authorize_admin(&request, route) {
                return (Endpoint::Other, response);
            }
        }
        match route.handler {
            Handler::Write(flavor) => (Endpoint::Write, self.write(request, flavor).await),
            Handler::Query(format) => (Endpoint::Query, self.query(request, format).await),
            Handler::Health => (Endpoint::Other, self.health()),
            Handler::Ready => (Endpoint::Other, self.ready()),
            Handler::Metrics => (Endpoint::Other, self.metrics()),
            Handler::Ping => (Endpoint::Other, ping(&request)),
            Handler::Files => (Endpoint::Other, self.files(&request)),
            Handler::Databases => (Endpoint::Other, self.databases()),
            Handler::Cluster => (
                Endpoint::Other,
                json(
                    StatusCode::OK,
                    crate::cluster_api::cluster(&self.node).to_string(),
                ),
            ),
            Handler::ClusterNodes => (Endpoint::Other, self.cluster_nodes(&request)),
            Handler::ClusterPositions => {
                let me = self.node.manifest.node_id();
                let positions: Vec<serde_json::Value> = (0..self.shard.shard_count() as u32)
                    .map(|shard| {
                        serde_json::json!({
                            "origin": me,
                            "shard": shard,
                            "durable_lsn": self.node.positions.get(me, shard),
                        })
                    })
                    .collect();
                (
                    Endpoint::Other,
                    json(
                        StatusCode::OK,
                        serde_json::json!({ "success": true, "positions": positions }).to_string(),
                    ),
                )
            }
            Handler::ClusterLocal => {
                let all = crate::cluster_api::cluster(&self.node);
                let mut local = all["nodes"]
                    .as_array()
                    .and_then(|nodes| nodes.iter().find(|n| n["is_local"] == true).cloned());
                if let Some(serde_json::Value::Object(fields)) = local.as_mut() {
                    if let serde_json::Value::Object(extras) =
                        crate::cluster_api::local_extras(&self.node)
                    {
                        fields.extend(extras);
                    }
                }
                let body = serde_json::json!({ "success": true, "node": local, "cluster": all });
                (Endpoint::Other, json(StatusCode::OK, body.to_string()))
            }
            Handler::AddPeer => (Endpoint::Other, self.add_peer(request).await),
            Handler::RemovePeer => (
                Endpoint::Other,
                self.remove_peer(parameter.as_deref().unwrap_or_default())
                    .await,
            ),
            Handler::TransferLeader => (Endpoint::Other, self.transfer_leader(request).await),
            Handler::Stepdown => (Endpoint::Other, self.stepdown(request).await),
            Handler::Elect => (Endpoint::Other, self.elect().await),
            Handler::Leave => (
                Endpoint::Other,
                self.run_op(crate::cluster_ops::leave_local).await,
            ),
            Handler::ClusterNode => (
                Endpoint::Other,
                self.cluster_node(parameter.as_deref().unwrap_or_default()),
            ),
            Handler::ClusterHealth => (Endpoint::Other, self.cluster_health()),
            Handler::DrainNode | Handler::ActivateNode => {
                let id = parameter.as_deref().unwrap_or_default().to_string();
                (
                    Endpoint::Other,
                    self.set_node_state(request, &id, route.handler == Handler::DrainNode)
                        .await,
                )
            }
            Handler::Measurements => (
                Endpoint::Other,
                self.measurements(parameter.as_deref().unwrap_or_default()),
            ),
            Handler::AntiEntropy | Handler::AntiEntropyPause | Handler::AntiEntropyResume => {
                (Endpoint::Other, self.antientropy(route.handler))
            }
            Handler::Verify => (
                Endpoint::Other,
                self.verify(&request, parameter.as_deref().unwrap_or_default())
                    .await,
            ),
        }
    }

    /// `GET /api/v1/cluster/antientropy` (the walker's status) and `POST .../pause|resume`.
    fn antientropy(&self, handler: Handler) -> Response<Body> {
        let Some(walker) = self.node.cluster.as_ref().and_then(|view| view.walker()) else {
            return error(
                StatusCode::CONFLICT,
                "the anti-entropy walker runs on cluster nodes only (cluster.enabled = false here)",
            );
        };
        match handler {
            Handler::AntiEntropyPause => walker.pause(),
            Handler::AntiEntropyResume => walker.resume(),
            _ => {}
        }
        let body = serde_json::json!({
            "success": true,
            "antientropy": serde_json::to_value(walker.status()).unwrap_or_default(),
        });
        json(StatusCode::OK, body.to_string())
    }

    async fn write(&self, request: Request<Incoming>, flavor: WriteFlavor) -> Response<Body> {
        if self.node.config.cluster.enabled
            && self.node.config.cluster.role != crate::config::NodeRole::Writer
        {
            return self.not_a_writer();
        }
        if self.node.config.cluster.enabled {
            if let Some(state) =
                crate::cluster_ops::own_state(&self.node).filter(|s| s.is_draining())
            {
                return self.draining_refusal(state);
            }
        }
        let query = query_pairs(request.uri().query());
        let database = match flavor {
            WriteFlavor::Influx1 => query.get("db").cloned(),
            WriteFlavor::Influx2 => query.get("bucket").cloned(),
            WriteFlavor::ArcLineProtocol | WriteFlavor::ArcMsgpack => {
                header_value(&request, "x-arc-database").or_else(|| query.get("db").cloned())
            }
        };
        let Some(database) = database.filter(|d| !d.is_empty()) else {
            let what = match flavor {
                WriteFlavor::Influx1 => "the db query parameter",
                WriteFlavor::Influx2 => "the bucket query parameter",
                WriteFlavor::ArcLineProtocol | WriteFlavor::ArcMsgpack => {
                    "the x-arc-database header"
                }
            };
            return error(
                StatusCode::BAD_REQUEST,
                &format!("database name is required: set {what}"),
            );
        };
        let key = header_value(&request, "idempotency-key");
        if let Some(key) = &key {
            if let Err(reason) = crate::idempotency::check_key(key) {
                return error(StatusCode::BAD_REQUEST, &reason);
            }
        }
        let ack_text = query
            .get("ack")
            .cloned()
            .or_else(|| header_value(&request, "x-shale-ack"));
        let ack = match ack_text.as_deref().map(str::trim) {
            None | Some("") => self.node.config.cluster.ack,
            Some(text) => match crate::config::AckLevel::parse(text) {
                Some(level) => level,
                None => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("ack {text:?} is not one of local, majority, all"),
                    )
                }
            },
        };
        let precision = match query.get("precision").map(String::as_str) {
            None | Some("") => Precision::Nanoseconds,
            Some(text) => match Precision::parse(text) {
                Ok(p) => p,
                Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
            },
        };
        let limits = &self.node.config.ingest;
        let content_encoding = header_value(&request, "content-encoding");
        let body = match self
            .read_body(request, limits.body_bytes_max, "ingest.body_bytes_max")
            .await
        {
            Ok(body) => body,
            Err(response) => return response,
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
        let (precision, body) = if flavor == WriteFlavor::ArcMsgpack {
            // Arc's MessagePack becomes canonical line protocol (microseconds), so the WAL,
            // replay and buffers have one format to handle.
            let now_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0);
            // Column names repeat on every line, so the translation can be far larger than
            // the body: it stops while writing once it passes the WAL record's payload limit.
            let bytes_max = self.node.config.ingest.decompressed_bytes_max;
            let mut lines = String::with_capacity(body.len().saturating_mul(2).min(bytes_max));
            let limits = crate::msgpack::MsgpackLimits {
                output_bytes_max: bytes_max,
                ..crate::msgpack::MsgpackLimits::default()
            };
            if let Err(e) = crate::msgpack::to_line_protocol(&body, now_us, &limits, &mut lines) {
                let status = match e {
                    crate::msgpack::MsgpackError::TooManyRows { .. }
                    | crate::msgpack::MsgpackError::TooManyColumns { .. }
                    | crate::msgpack::MsgpackError::TooLarge { .. } => {
                        StatusCode::PAYLOAD_TOO_LARGE
                    }
                    _ => StatusCode::BAD_REQUEST,
                };
                return error(status, &e.to_string());
            }
            (Precision::Microseconds, Bytes::from(lines))
        } else {
            (precision, body)
        };
        if let Some(key) = key.as_deref() {
            if self.node.config.cluster.enabled && self.node.positions.keys.get(key).is_none() {
                // The key may belong to a write another node stored a moment ago (a retry
                // after a timeout, or after that node died): first hold everything the live
                // peers hold durably, so its record, if any, has arrived here.
                let timeout =
                    std::time::Duration::from_millis(self.node.config.cluster.ack_timeout_ms);
                if let Err(reason) = self.catch_up_with_peers(timeout).await {
                    tracing::debug!(%reason, "idempotency check could not reach every peer");
                }
            }
        }
        match self
            .shard
            .write(&database, precision, body, ack, key.as_deref())
            .await
        {
            Ok(written) => {
                let mut response = Response::builder()
                    .status(StatusCode::NO_CONTENT)
                    .header(WRITE_TOKEN_HEADER, written.token());
                if written.replayed {
                    response = response.header("x-shale-idempotent-replay", "true");
                }
                response
                    .body(Body::new(Bytes::new()))
                    .expect("static response")
            }
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
        let linearizable = match header_value(&request, "x-shale-read-consistency")
            .as_deref()
            .map(str::trim)
        {
            None | Some("") | Some("eventual") | Some("read_your_writes") => false,
            Some("linearizable") => true,
            Some(other) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "X-Shale-Read-Consistency {other:?} is not one of eventual, \
                         read_your_writes, linearizable"
                    ),
                )
            }
        };
        let mut tokens = Vec::new();
        for value in request.headers().get_all("x-shale-read-after") {
            let Ok(text) = value.to_str() else {
                return error(StatusCode::BAD_REQUEST, "X-Shale-Read-After is not text");
            };
            for token in text.split(',').filter(|t| !t.trim().is_empty()) {
                match parse_token(token) {
                    Some(parsed) => tokens.push(parsed),
                    None => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            &format!(
                                "X-Shale-Read-After token {token:?} is not origin:shard:lsn \
                                 (the X-Shale-Write-Token a write answered)"
                            ),
                        )
                    }
                }
            }
        }
        if let Err(response) = self.wait_for_tokens(&tokens).await {
            return response;
        }
        if linearizable && self.node.config.cluster.enabled {
            // Everything committed before the read (a Raft barrier applied here) and every
            // write any live node acknowledged before it (their durable positions, held here).
            if let Err(e) = self
                .node
                .manifest
                .propose(shale_replication::ManifestCommand::Barrier {
                    node_id: self.node.manifest.node_id(),
                })
                .await
            {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("linearizable read: the manifest barrier did not commit: {e}"),
                );
            }
            let timeout = std::time::Duration::from_millis(self.node.config.query.timeout_ms);
            if let Err(reason) = self.catch_up_with_peers(timeout).await {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("linearizable read: {reason}"),
                );
            }
        }
        let limit = self.node.config.query.request_bytes_max;
        let body = match self
            .read_body(request, limit, "query.request_bytes_max")
            .await
        {
            Ok(body) => body,
            Err(response) => return response,
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

    /// Asks every live peer for its shards' durable LSNs and waits (within `timeout`) until
    /// this node holds them all. Fails naming a peer that did not answer or a position that
    /// did not arrive.
    async fn catch_up_with_peers(&self, timeout: std::time::Duration) -> Result<(), String> {
        let node = self.node.clone();
        let positions =
            crate::cluster_ops::off_shard(move || crate::cluster_ops::peer_positions(&node))
                .await
                .map_err(|e| e.to_string())
                .and_then(|answer| answer)?;
        self.wait_for_positions(&positions, timeout)
            .await
            .map_err(|(origin, shard, lsn, held)| {
                format!("node {origin} shard {shard} is durable through lsn {lsn}; this node holds {held}")
            })
    }

    /// Waits until this node's queries see every write the tokens name (its own WAL's durable
    /// rows, or a replica log's applied rows), within `query.timeout_ms`.
    async fn wait_for_tokens(&self, tokens: &[(u64, u32, u64)]) -> Result<(), Response<Body>> {
        if tokens.is_empty() {
            return Ok(());
        }
        let timeout = std::time::Duration::from_millis(self.node.config.query.timeout_ms);
        self.wait_for_positions(tokens, timeout)
            .await
            .map_err(|(origin, shard, lsn, held)| {
                let mut response = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!(
                        "this node holds node {origin} shard {shard} through lsn {held} and the \
                         read asked for lsn {lsn}; it did not arrive within query.timeout_ms \
                         ({} ms)",
                        timeout.as_millis()
                    ),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                response
            })
    }

    /// Waits until this node holds every (origin, shard) through its LSN, within `timeout`;
    /// fails with the first one behind: (origin, shard, wanted, held).
    async fn wait_for_positions(
        &self,
        wanted: &[(u64, u32, u64)],
        timeout: std::time::Duration,
    ) -> Result<(), (u64, u32, u64, u64)> {
        let positions = self.shard.positions();
        let started = std::time::Instant::now();
        loop {
            let behind = wanted
                .iter()
                .find(|(origin, shard, lsn)| positions.get(*origin, *shard) < *lsn);
            let Some(&(origin, shard, lsn)) = behind else {
                return Ok(());
            };
            if started.elapsed() >= timeout {
                return Err((origin, shard, lsn, positions.get(origin, shard)));
            }
            glommio::timer::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Reads a whole request body of at most `limit` bytes (`limit_name` is the setting named
    /// in the 413) within `http.body_read_timeout_ms`. A body that arrives too slowly answers
    /// 408 and closes the connection, so trickling clients hold no slot or buffer for long.
    async fn read_body(
        &self,
        request: Request<Incoming>,
        limit: usize,
        limit_name: &str,
    ) -> Result<Bytes, Response<Body>> {
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body is larger than {limit_name} ({limit} bytes)"),
            )
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(close_connection(too_large()));
        }
        let collect = Limited::new(request.into_body(), limit).collect();
        let timeout_ms = self.node.config.http.body_read_timeout_ms;
        let collected = if timeout_ms == 0 {
            Some(collect.await)
        } else {
            futures_lite::future::or(async { Some(collect.await) }, async {
                glommio::timer::sleep(Duration::from_millis(timeout_ms)).await;
                None
            })
            .await
        };
        match collected {
            Some(Ok(collected)) => Ok(collected.to_bytes()),
            Some(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Err(close_connection(too_large()))
            }
            Some(Err(e)) => Err(error(
                StatusCode::BAD_REQUEST,
                &format!("read request body: {e}"),
            )),
            None => {
                self.shard.metrics.body_read_timeouts.increment();
                Err(close_connection(error(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!(
                        "request body did not arrive within http.body_read_timeout_ms ({timeout_ms} ms)"
                    ),
                )))
            }
        }
    }

    /// The cluster API wants `Authorization: Bearer|Token <cluster.admin_token>`. Without a
    /// configured token, reads are open (a standalone node's operators and tests use them) and
    /// changes are refused.
    #[allow(clippy::result_large_err)]
    fn authorize_admin(
        &self,
        request: &Request<Incoming>,
        route: &Route,
    ) -> Result<(), Response<Body>> {
        let token = &self.node.config.cluster.admin_token;
        if token.is_empty() {
            if route.methods.contains(&Method::GET) {
                return Ok(());
            }
            return Err(error(
                StatusCode::FORBIDDEN,
                "cluster changes need an admin token: set cluster.admin_token",
            ));
        }
        let presented = header_value(request, "authorization").and_then(|value| {
            let (scheme, credential) = value.split_once(' ')?;
            matches!(scheme, "Bearer" | "Token").then(|| credential.trim().to_string())
        });
        match presented {
            Some(credential)
                if constant_time_eq(credential.as_bytes(), token.expose().as_bytes()) =>
            {
                Ok(())
            }
            Some(_) => Err(error(StatusCode::FORBIDDEN, "the admin token is not valid")),
            None => {
                let mut response = error(
                    StatusCode::UNAUTHORIZED,
                    "the cluster API needs Authorization: Bearer <cluster.admin_token>",
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                Err(response)
            }
        }
    }

    /// `GET /api/v1/cluster/nodes[?role=voter|learner&state=...]`; `state` matches the
    /// committed state (joining, active, draining, leaving, dead) or this node's health view
    /// of the member (healthy, unhealthy).
    fn cluster_nodes(&self, request: &Request<Incoming>) -> Response<Body> {
        let query = query_pairs(request.uri().query());
        let all = crate::cluster_api::cluster(&self.node);
        let nodes: Vec<&serde_json::Value> = all["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter(|n| {
                        query
                            .get("role")
                            .is_none_or(|r| n["raft_role"] == r.as_str())
                    })
                    .filter(|n| {
                        query
                            .get("state")
                            .is_none_or(|s| n["state"] == s.as_str() || n["health"] == s.as_str())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let body = serde_json::json!({ "success": true, "count": nodes.len(), "nodes": nodes });
        json(StatusCode::OK, body.to_string())
    }

    /// `POST /api/v1/cluster/peer {"id", "name", "quic_addr", "http_addr", "role"}`: adds a node
    /// as a learner, waits until it has the log, then makes it a voter (unless replica-only).
    /// Only the leader changes the membership; elsewhere the answer is 421 naming the leader.
    async fn add_peer(&self, request: Request<Incoming>) -> Response<Body> {
        let body = match self
            .read_body(request, 64 * 1024, "the peer request limit")
            .await
        {
            Ok(body) => body,
            Err(response) => return response,
        };
        #[derive(serde::Deserialize)]
        struct PeerRequest {
            id: u64,
            #[serde(default)]
            name: String,
            quic_addr: String,
            http_addr: String,
            #[serde(default)]
            role: String,
        }
        let peer: PeerRequest = match serde_json::from_slice(&body) {
            Ok(peer) => peer,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("body must be {{\"id\", \"quic_addr\", \"http_addr\", \"name\", \"role\"}}: {e}"),
                )
            }
        };
        if peer.id == 0
            || !matches!(
                peer.role.as_str(),
                "" | "writer" | "reader" | "replica-only"
            )
        {
            return error(
                StatusCode::BAD_REQUEST,
                "id must be > 0 and role one of writer, reader, replica-only",
            );
        }
        let node = shale_replication::raft_types::ClusterNode {
            name: if peer.name.is_empty() {
                format!("node-{}", peer.id)
            } else {
                peer.name
            },
            quic_addr: peer.quic_addr,
            http_addr: peer.http_addr,
            role: peer.role,
        };
        let voter = node.role != "replica-only";
        let manifest = &self.node.manifest;
        let me = manifest.node_id();
        let (leading, known) = manifest
            .raft_metrics()
            .map(|m| {
                (
                    m.current_leader == Some(me),
                    m.membership_config
                        .membership()
                        .get_node(&peer.id)
                        .is_some(),
                )
            })
            .unwrap_or((false, false));
        // A new member is `joining` until it votes (or, replica-only, has caught up); the
        // leader's health loop repairs the state if this request stops half way.
        let set_state = |state| {
            manifest.propose(shale_replication::ManifestCommand::SetNodeState {
                node_id: peer.id,
                state,
            })
        };
        if leading && !known {
            if let Err(e) = set_state(shale_replication::NodeState::Joining).await {
                return self.membership_error(e);
            }
        }
        if let Err(e) = manifest.add_learner(peer.id, node).await {
            return self.membership_error(e);
        }
        if voter {
            let add = std::collections::BTreeSet::from([peer.id]);
            if let Err(e) = manifest.change_voters(add, Default::default()).await {
                return self.membership_error(e);
            }
        }
        let state = manifest.current().manifest.node_state(peer.id);
        if matches!(
            state,
            None | Some(shale_replication::NodeState::Joining | shale_replication::NodeState::Dead)
        ) {
            if let Err(e) = set_state(shale_replication::NodeState::Active).await {
                return self.membership_error(e);
            }
        }
        json(
            StatusCode::OK,
            crate::cluster_api::cluster(&self.node).to_string(),
        )
    }

    /// `DELETE /api/v1/cluster/peer/{id}`: removes a node from the membership.
    async fn remove_peer(&self, id: &str) -> Response<Body> {
        let Ok(id) = id.parse::<u64>() else {
            return error(StatusCode::BAD_REQUEST, "the peer id must be a number");
        };
        match self.node.manifest.remove_node(id).await {
            Ok(()) => json(
                StatusCode::OK,
                crate::cluster_api::cluster(&self.node).to_string(),
            ),
            Err(e) => self.membership_error(e),
        }
    }

    /// `POST /api/v1/cluster/leader {"id": N}` (ArcadeDB's `{"peerId": N}` too): makes node N
    /// the leader and answers once it leads, with the time the transfer took. Any node takes
    /// it and forwards it to the leader; without an id the leader steps down to the best voter.
    async fn transfer_leader(&self, request: Request<Incoming>) -> Response<Body> {
        let (forwarded, path, body) = match self.admin_request(request).await {
            Ok(parts) => parts,
            Err(response) => return response,
        };
        let target = match requested_node(&body, &["id", "peerId"]) {
            Ok(target) => target,
            Err(response) => return response,
        };
        self.on_leader(forwarded, path, body, move |node| {
            crate::cluster_ops::stepdown(node, target).map(|report| report.to_json())
        })
        .await
    }

    /// `POST /api/v1/cluster/stepdown [{"preferred": N}]`: the leader hands over to the most
    /// up-to-date healthy active voter (or to N). Any node takes it and forwards it.
    async fn stepdown(&self, request: Request<Incoming>) -> Response<Body> {
        let (forwarded, path, body) = match self.admin_request(request).await {
            Ok(parts) => parts,
            Err(response) => return response,
        };
        let preferred = match requested_node(&body, &["preferred", "id"]) {
            Ok(preferred) => preferred,
            Err(response) => return response,
        };
        self.on_leader(forwarded, path, body, move |node| {
            crate::cluster_ops::stepdown(node, preferred).map(|report| report.to_json())
        })
        .await
    }

    /// `POST /api/v1/cluster/elect`: this node starts an election now. The leader sends it to
    /// the target of a transfer once the target holds the whole log; operators use
    /// `/api/v1/cluster/leader`.
    async fn elect(&self) -> Response<Body> {
        let manifest = &self.node.manifest;
        let me = manifest.node_id();
        let Some(metrics) = manifest.raft_metrics() else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "Raft has not started");
        };
        if metrics.current_leader == Some(me) {
            return json(
                StatusCode::OK,
                serde_json::json!({ "success": true, "leader_id": me }).to_string(),
            );
        }
        if !metrics
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me)
        {
            return error(
                StatusCode::CONFLICT,
                &format!("node {me} is not a voter: only voters can lead"),
            );
        }
        match manifest.trigger_election().await {
            Ok(()) => json(
                StatusCode::OK,
                r#"{"success":true,"election":"started"}"#.into(),
            ),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        }
    }

    /// `POST /api/v1/cluster/nodes/{id}/drain` and `/activate`: any node takes them and sends
    /// them to node `id`, which drains itself (hands the leadership over if it leads, commits
    /// `draining`, flushes every buffer and answers once none holds a row) or becomes active.
    async fn set_node_state(
        &self,
        request: Request<Incoming>,
        id: &str,
        drain: bool,
    ) -> Response<Body> {
        let Ok(id) = id.parse::<u64>() else {
            return error(StatusCode::BAD_REQUEST, "the node id must be a number");
        };
        let (forwarded, path, body) = match self.admin_request(request).await {
            Ok(parts) => parts,
            Err(response) => return response,
        };
        let job = if drain {
            crate::cluster_ops::drain_local
        } else {
            crate::cluster_ops::activate_local
        };
        if id == self.node.manifest.node_id() {
            return self.run_op(job).await;
        }
        let member = self.node.manifest.raft_metrics().and_then(|m| {
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.http_addr.clone())
        });
        match member {
            None => error(StatusCode::NOT_FOUND, &format!("node {id} is not a member")),
            Some(_) if forwarded => error(
                StatusCode::MISDIRECTED_REQUEST,
                &format!("this is not node {id}"),
            ),
            Some(http_addr) => self.forward(http_addr, "POST", path, body).await,
        }
    }

    /// Reads an admin request's small JSON body; returns whether another node forwarded it,
    /// its path and query, and the body.
    async fn admin_request(
        &self,
        request: Request<Incoming>,
    ) -> Result<(bool, String, Bytes), Response<Body>> {
        let forwarded = header_value(&request, crate::cluster_ops::FORWARDED_HEADER).is_some();
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let body = self
            .read_body(request, 4096, "the cluster request limit")
            .await?;
        Ok((forwarded, path, body))
    }

    /// Runs `job` here when this node leads; otherwise forwards the request to the leader
    /// once (a forwarded request that finds no leader here answers 421 naming the leader).
    async fn on_leader(
        &self,
        forwarded: bool,
        path: String,
        body: Bytes,
        job: impl FnOnce(&NodeShared) -> Result<serde_json::Value, crate::cluster_ops::OpError>
            + Send
            + 'static,
    ) -> Response<Body> {
        let me = self.node.manifest.node_id();
        let metrics = self.node.manifest.raft_metrics();
        let leader = metrics.as_ref().and_then(|m| m.current_leader);
        if leader == Some(me) {
            return self.run_op(job).await;
        }
        let leader_http = self.leader_http(leader);
        match leader_http {
            Some(http_addr) if !forwarded => self.forward(http_addr, "POST", path, body).await,
            _ => self.not_leader(leader, leader_http),
        }
    }

    /// Runs a lifecycle operation off the shard and answers with its JSON or its error.
    async fn run_op(
        &self,
        job: impl FnOnce(&NodeShared) -> Result<serde_json::Value, crate::cluster_ops::OpError>
            + Send
            + 'static,
    ) -> Response<Body> {
        let node = self.node.clone();
        match crate::cluster_ops::off_shard(move || job(&node))
            .await
            .and_then(|result| result)
        {
            Ok(value) => json(StatusCode::OK, value.to_string()),
            Err(e) => self.op_error(e),
        }
    }

    /// Sends the request on to another node and relays its answer.
    async fn forward(
        &self,
        http_addr: String,
        method: &'static str,
        path: String,
        body: Bytes,
    ) -> Response<Body> {
        let node = self.node.clone();
        let target = http_addr.clone();
        let answer = crate::cluster_ops::off_shard(move || {
            crate::cluster_ops::call_node(&node, &target, method, &path, &body)
        })
        .await;
        match answer {
            Ok(Ok((status, value))) => json(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                value.to_string(),
            ),
            Ok(Err(e)) => error(
                StatusCode::BAD_GATEWAY,
                &format!("forward to {http_addr}: {e:#}"),
            ),
            Err(e) => self.op_error(e),
        }
    }

    fn op_error(&self, e: crate::cluster_ops::OpError) -> Response<Body> {
        if let crate::cluster_ops::OpError::NotLeader {
            leader,
            leader_http,
        } = e
        {
            return self.not_leader(leader, leader_http);
        }
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        error(status, &e.to_string())
    }

    fn leader_http(&self, leader: Option<u64>) -> Option<String> {
        let id = leader?;
        let metrics = self.node.manifest.raft_metrics()?;
        let node = metrics
            .membership_config
            .membership()
            .get_node(&id)?
            .clone();
        Some(node.http_addr)
    }

    /// 421 naming the leader and its HTTP address (also in `Location`).
    fn not_leader(&self, leader: Option<u64>, leader_http: Option<String>) -> Response<Body> {
        let body = serde_json::json!({
            "success": false,
            "error": format!("this node is not the leader (leader: {leader:?})"),
            "leader_id": leader,
            "leader_http_addr": leader_http,
        });
        let mut response = json(StatusCode::MISDIRECTED_REQUEST, body.to_string());
        if let Some(Ok(value)) =
            leader_http.map(|h| header::HeaderValue::from_str(&format!("http://{h}")))
        {
            response.headers_mut().insert(header::LOCATION, value);
        }
        response
    }

    /// `POST /api/v1/cluster/verify/{database}[?deep=true]`: compares every member's copies of
    /// the database's files with the manifest and with each other (`shale_replication::verify`)
    /// and answers the report, 200 whatever its verdict. The coordinator runs on the control
    /// thread; this shard only awaits its answer.
    async fn verify(&self, request: &Request<Incoming>, database: &str) -> Response<Body> {
        use shale_replication::verify::service::VerifyError;
        let query = query_pairs(request.uri().query());
        let deep = match query.get("deep").map(String::as_str) {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") | Some("") => true,
            Some(other) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("deep must be true or false, not {other:?}"),
                )
            }
        };
        let Some(handle) = self.node.cluster.as_ref().and_then(|c| c.verify()) else {
            // A standalone node keeps no presence index and has no peers to compare with.
            return error(
                StatusCode::CONFLICT,
                "verify compares the copies of cluster peers; this node runs standalone \
                 (set cluster.enabled)",
            );
        };
        match handle.verify(database, deep).await {
            Ok(report) => {
                let mut body = serde_json::to_value(&report).unwrap_or_default();
                if let serde_json::Value::Object(fields) = &mut body {
                    fields.insert("success".into(), true.into());
                }
                json(StatusCode::OK, body.to_string())
            }
            Err(e @ VerifyError::UnknownDatabase(_)) => {
                error(StatusCode::NOT_FOUND, &e.to_string())
            }
            Err(e @ VerifyError::Busy) | Err(e @ VerifyError::Stopped) => {
                error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string())
            }
        }
    }

    /// `GET /api/v1/cluster/nodes/{id}`: one member as `/api/v1/cluster/nodes` lists it.
    fn cluster_node(&self, id: &str) -> Response<Body> {
        let Ok(id) = id.parse::<u64>() else {
            return error(StatusCode::BAD_REQUEST, "the node id must be a number");
        };
        let all = crate::cluster_api::cluster(&self.node);
        let node = all["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == id).cloned());
        match node {
            Some(node) => json(
                StatusCode::OK,
                serde_json::json!({ "success": true, "node": node }).to_string(),
            ),
            None => error(StatusCode::NOT_FOUND, &format!("node {id} is not a member")),
        }
    }

    /// `GET /api/v1/cluster/health`: healthy, degraded (a member unhealthy in this node's view,
    /// dead, or not active) or unavailable (no leader; 503).
    fn cluster_health(&self) -> Response<Body> {
        let health = crate::cluster_api::health(&self.node);
        let status = if health["status"] == "unavailable" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        json(status, health.to_string())
    }

    /// A failed membership change: not the leader answers 421 naming the leader's HTTP address.
    fn membership_error(&self, e: shale_replication::ManifestError) -> Response<Body> {
        if let shale_replication::ManifestError::NotLeader { leader } = &e {
            return self.not_leader(*leader, self.leader_http(*leader));
        }
        error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
    }

    /// The HTTP addresses of the members that take writes now (writers that are not draining,
    /// leaving or dead), this node excluded.
    fn writable_nodes(&self) -> Vec<String> {
        let me = self.node.manifest.node_id();
        let version = self.node.manifest.current();
        self.node
            .manifest
            .raft_metrics()
            .map(|metrics| {
                metrics
                    .membership_config
                    .membership()
                    .nodes()
                    .filter(|(id, node)| {
                        **id != me
                            && node.is_writer()
                            && !version.manifest.node_state(**id).is_some_and(|s| {
                                s.is_draining() || s == shale_replication::NodeState::Dead
                            })
                    })
                    .map(|(_, node)| format!("http://{}", node.http_addr))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A draining or leaving node refuses writes with 503 + Retry-After, naming the nodes that
    /// take them (the first also in `X-Shale-Writer`).
    fn draining_refusal(&self, state: shale_replication::NodeState) -> Response<Body> {
        let writers = self.writable_nodes();
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "this node is {} and takes no writes; write to: {}",
                state.as_str(),
                if writers.is_empty() {
                    "(no other writable node known)".to_string()
                } else {
                    writers.join(", ")
                }
            ),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        if let Some(Ok(value)) = writers.first().map(|w| header::HeaderValue::from_str(w)) {
            response.headers_mut().insert("x-shale-writer", value);
        }
        response
    }

    /// A reader or replica-only node refuses writes and names the nodes that take them.
    fn not_a_writer(&self) -> Response<Body> {
        let writers: Vec<String> = self
            .node
            .manifest
            .raft_metrics()
            .map(|metrics| {
                metrics
                    .membership_config
                    .membership()
                    .nodes()
                    .filter(|(_, node)| node.is_writer())
                    .map(|(_, node)| format!("http://{}", node.http_addr))
                    .collect()
            })
            .unwrap_or_default();
        let role = match self.node.config.cluster.role {
            crate::config::NodeRole::Reader => "a reader",
            _ => "replica-only",
        };
        let mut response = error(
            StatusCode::FORBIDDEN,
            &format!(
                "this node is {role} and takes no writes; write to: {}",
                if writers.is_empty() {
                    "(no writer known)".to_string()
                } else {
                    writers.join(", ")
                }
            ),
        );
        if let Some(first) = writers.first() {
            if let Ok(value) = header::HeaderValue::from_str(first) {
                response.headers_mut().insert("x-shale-writer", value);
            }
        }
        response
    }

    /// Liveness: 200 while every shard's heartbeat is recent and the manifest service runs;
    /// otherwise 503 naming what is stuck.
    fn health(&self) -> Response<Body> {
        match self.node.health() {
            Ok(()) => json(StatusCode::OK, r#"{"status":"ok"}"#.into()),
            Err(problem) => error(StatusCode::SERVICE_UNAVAILABLE, &problem),
        }
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
        if let Err(problem) = self.node.health() {
            return error(StatusCode::SERVICE_UNAVAILABLE, &problem);
        }
        // A draining node still answers queries and serves files, but load balancers must
        // stop sending it writes.
        if self.node.config.cluster.enabled {
            if let Some(state) =
                crate::cluster_ops::own_state(&self.node).filter(|s| s.is_draining())
            {
                let body = serde_json::json!({
                    "success": false,
                    "status": state.as_str(),
                    "error": format!("node is {}: it takes no writes", state.as_str()),
                });
                return json(StatusCode::SERVICE_UNAVAILABLE, body.to_string());
            }
        }
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
                    "shale_query_files_absent_total",
                    "Manifest files a query skipped because this node has not fetched them yet.",
                    engine.files_absent.get() as f64,
                ),
                (
                    "shale_query_files_unavailable_total",
                    "Queries failed because a file they needed is damaged here (lost, or not repaired before their deadline).",
                    engine.files_unavailable.get() as f64,
                ),
                (
                    "shale_query_buffer_pieces_total",
                    "Unflushed buffer pieces queries read.",
                    engine.buffer_pieces.get() as f64,
                ),
            ],
        );
        let mut text = text;
        crate::cluster_api::render_wal_metrics(&self.node, &mut text);
        crate::cluster_api::render_antientropy_metrics(&self.node, &mut text);
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
            if crate::failpoint::armed("request-header") {
                inject_request_fault(&request);
            }
            let (endpoint, mut response) = api.route(request).await;
            api.shard.metrics.record_request(
                endpoint,
                response.status().as_u16(),
                started.elapsed(),
            );
            // Which shard answered: operators and tests can see connections spread over
            // shards (and tests can pin a connection to each shard).
            response.headers_mut().insert(
                "x-shale-shard",
                header::HeaderValue::from(api.shard.shard_id),
            );
            Ok(response)
        })
    }
}

/// The `request-header` failpoint (tests only): `x-shale-failpoint: panic` panics this shard,
/// `stall-ms=N` blocks its thread for N ms, as a bug or a blocking call would.
fn inject_request_fault(request: &Request<Incoming>) {
    let Some(fault) = header_value(request, "x-shale-failpoint") else {
        return;
    };
    if fault == "panic" {
        panic!("failpoint: request panic");
    }
    if let Some(ms) = fault
        .strip_prefix("stall-ms=")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
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
        QueryError::Internal(_) | QueryError::Replan => StatusCode::INTERNAL_SERVER_ERROR,
        QueryError::Unavailable(_) => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            return response;
        }
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
        WriteError::InProgress(_) => StatusCode::CONFLICT,
        WriteError::Overloaded(_) | WriteError::NotReady => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return response;
        }
        WriteError::Durability(_) => StatusCode::INTERNAL_SERVER_ERROR,
        WriteError::NotReplicated { written, .. } => {
            let token = written.token();
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            headers.insert("x-shale-stored", header::HeaderValue::from_static("local"));
            if let Ok(value) = header::HeaderValue::from_str(&token) {
                headers.insert(WRITE_TOKEN_HEADER, value);
            }
            return response;
        }
    };
    error(status, &e.to_string())
}

/// Names a write's place in its origin's WAL: `origin:shard:lsn`.
const WRITE_TOKEN_HEADER: &str = "x-shale-write-token";

/// Parses one `X-Shale-Read-After` token (`origin:shard:lsn`).
fn parse_token(text: &str) -> Option<(u64, u32, u64)> {
    let mut parts = text.trim().split(':');
    let origin = parts.next()?.parse().ok()?;
    let shard = parts.next()?.parse().ok()?;
    let lsn = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((origin, shard, lsn))
}

/// The node id a cluster request's JSON body names under one of `keys` (a number or a string
/// of digits, as ArcadeDB's `peerId`); `None` for an empty body or no such key.
#[allow(clippy::result_large_err)]
fn requested_node(body: &[u8], keys: &[&str]) -> Result<Option<u64>, Response<Body>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let bad = || {
        error(
            StatusCode::BAD_REQUEST,
            &format!("body must be JSON like {{\"{}\": <node id>}}", keys[0]),
        )
    };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| bad())?;
    for key in keys {
        match &value[*key] {
            serde_json::Value::Null => continue,
            serde_json::Value::Number(n) => return n.as_u64().map(Some).ok_or_else(bad),
            serde_json::Value::String(s) => return s.parse().map(Some).map_err(|_| bad()),
            _ => return Err(bad()),
        }
    }
    Ok(None)
}

fn header_value(request: &Request<Incoming>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Decodes `a=b&c=d` (`application/x-www-form-urlencoded`, as URLs carry it); later duplicates
/// win. Malformed escapes stay as they are, invalid UTF-8 becomes U+FFFD: never an error.
fn query_pairs(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

/// What a route does; `Api::route` dispatches on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    Write(WriteFlavor),
    Query(Format),
    Health,
    Ready,
    Metrics,
    Ping,
    Files,
    Databases,
    Measurements,
    Cluster,
    ClusterNodes,
    ClusterLocal,
    ClusterPositions,
    AddPeer,
    RemovePeer,
    TransferLeader,
    Stepdown,
    Elect,
    Leave,
    ClusterNode,
    ClusterHealth,
    DrainNode,
    ActivateNode,
    AntiEntropy,
    AntiEntropyPause,
    AntiEntropyResume,
    Verify,
}

/// The write endpoints differ in where the database name comes from and in body format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteFlavor {
    Influx1,
    Influx2,
    ArcLineProtocol,
    ArcMsgpack,
}

/// One endpoint: a path pattern (a `{}` segment matches one non-empty path segment, handed to
/// the handler percent-decoded), the methods it answers, and its handler.
struct Route {
    pattern: &'static str,
    methods: &'static [Method],
    handler: Handler,
}

/// Every endpoint of the node, in one place: matching, 405s and the `Allow` header all come
/// from this table.
static ROUTES: [Route; 31] = [
    Route {
        pattern: "/write",
        methods: &[Method::POST],
        handler: Handler::Write(WriteFlavor::Influx1),
    },
    Route {
        pattern: "/api/v2/write",
        methods: &[Method::POST],
        handler: Handler::Write(WriteFlavor::Influx2),
    },
    Route {
        pattern: "/api/v1/write/line-protocol",
        methods: &[Method::POST],
        handler: Handler::Write(WriteFlavor::ArcLineProtocol),
    },
    Route {
        pattern: "/api/v1/write/msgpack",
        methods: &[Method::POST],
        handler: Handler::Write(WriteFlavor::ArcMsgpack),
    },
    Route {
        pattern: "/api/v1/query",
        methods: &[Method::POST],
        handler: Handler::Query(Format::Json),
    },
    Route {
        pattern: "/api/v1/query/arrow",
        methods: &[Method::POST],
        handler: Handler::Query(Format::Arrow),
    },
    Route {
        pattern: "/health",
        methods: &[Method::GET],
        handler: Handler::Health,
    },
    Route {
        pattern: "/ready",
        methods: &[Method::GET],
        handler: Handler::Ready,
    },
    Route {
        pattern: "/metrics",
        methods: &[Method::GET],
        handler: Handler::Metrics,
    },
    Route {
        pattern: "/ping",
        methods: &[Method::GET, Method::HEAD],
        handler: Handler::Ping,
    },
    Route {
        pattern: "/api/v1/cluster/files",
        methods: &[Method::GET],
        handler: Handler::Files,
    },
    Route {
        pattern: "/api/v1/cluster",
        methods: &[Method::GET],
        handler: Handler::Cluster,
    },
    Route {
        pattern: "/api/v1/cluster/nodes",
        methods: &[Method::GET],
        handler: Handler::ClusterNodes,
    },
    Route {
        pattern: "/api/v1/cluster/local",
        methods: &[Method::GET],
        handler: Handler::ClusterLocal,
    },
    Route {
        pattern: "/api/v1/cluster/positions",
        methods: &[Method::GET],
        handler: Handler::ClusterPositions,
    },
    Route {
        pattern: "/api/v1/cluster/peer",
        methods: &[Method::POST],
        handler: Handler::AddPeer,
    },
    Route {
        pattern: "/api/v1/cluster/peer/{}",
        methods: &[Method::DELETE],
        handler: Handler::RemovePeer,
    },
    Route {
        pattern: "/api/v1/cluster/leader",
        methods: &[Method::POST],
        handler: Handler::TransferLeader,
    },
    Route {
        pattern: "/api/v1/cluster/stepdown",
        methods: &[Method::POST],
        handler: Handler::Stepdown,
    },
    Route {
        pattern: "/api/v1/cluster/elect",
        methods: &[Method::POST],
        handler: Handler::Elect,
    },
    Route {
        pattern: "/api/v1/cluster/leave",
        methods: &[Method::POST],
        handler: Handler::Leave,
    },
    Route {
        pattern: "/api/v1/cluster/health",
        methods: &[Method::GET],
        handler: Handler::ClusterHealth,
    },
    Route {
        pattern: "/api/v1/cluster/nodes/{}",
        methods: &[Method::GET],
        handler: Handler::ClusterNode,
    },
    Route {
        pattern: "/api/v1/cluster/nodes/{}/drain",
        methods: &[Method::POST],
        handler: Handler::DrainNode,
    },
    Route {
        pattern: "/api/v1/cluster/nodes/{}/activate",
        methods: &[Method::POST],
        handler: Handler::ActivateNode,
    },
    Route {
        pattern: "/api/v1/cluster/antientropy",
        methods: &[Method::GET],
        handler: Handler::AntiEntropy,
    },
    Route {
        pattern: "/api/v1/cluster/antientropy/pause",
        methods: &[Method::POST],
        handler: Handler::AntiEntropyPause,
    },
    Route {
        pattern: "/api/v1/cluster/antientropy/resume",
        methods: &[Method::POST],
        handler: Handler::AntiEntropyResume,
    },
    Route {
        pattern: "/api/v1/cluster/verify/{}",
        methods: &[Method::POST],
        handler: Handler::Verify,
    },
    Route {
        pattern: "/api/v1/databases",
        methods: &[Method::GET],
        handler: Handler::Databases,
    },
    Route {
        pattern: "/api/v1/databases/{}/measurements",
        methods: &[Method::GET],
        handler: Handler::Measurements,
    },
];

#[derive(Debug)]
enum RouteMatch {
    Found {
        route: &'static Route,
        /// The `{}` segment, percent-decoded, when the pattern has one.
        parameter: Option<String>,
    },
    WrongMethod {
        allowed: Vec<Method>,
    },
    NotFound,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.pattern)
    }
}

/// Finds the route for a request. Pure and total: any method and path give an answer.
fn find_route(method: &Method, path: &str) -> RouteMatch {
    let mut allowed = Vec::new();
    for route in &ROUTES {
        let Some(parameter) = match_pattern(route.pattern, path) else {
            continue;
        };
        if route.methods.contains(method) {
            return RouteMatch::Found { route, parameter };
        }
        allowed.extend(route.methods.iter().cloned());
    }
    if allowed.is_empty() {
        RouteMatch::NotFound
    } else {
        RouteMatch::WrongMethod { allowed }
    }
}

/// `Some(parameter)` when `path` matches `pattern` segment by segment.
fn match_pattern(pattern: &str, path: &str) -> Option<Option<String>> {
    let mut parameter = None;
    let mut segments = path.split('/');
    for expected in pattern.split('/') {
        let segment = segments.next()?;
        if expected == "{}" {
            let decoded = percent_encoding::percent_decode_str(segment)
                .decode_utf8_lossy()
                .into_owned();
            if decoded.is_empty() {
                return None;
            }
            parameter = Some(decoded);
        } else if expected != segment {
            return None;
        }
    }
    match segments.next() {
        None => Some(parameter),
        Some(_) => None,
    }
}

/// `GET|HEAD /ping`: the health check InfluxDB clients and Telegraf send before writing.
fn ping(request: &Request<Incoming>) -> Response<Body> {
    let verbose = query_pairs(request.uri().query())
        .get("verbose")
        .is_some_and(|v| v == "true");
    let (status, body) = if verbose && request.method() == Method::GET {
        let version = format!(r#"{{"version":"{INFLUXDB_COMPATIBLE_VERSION}"}}"#);
        (StatusCode::OK, Bytes::from(version))
    } else {
        (StatusCode::NO_CONTENT, Bytes::new())
    };
    Response::builder()
        .status(status)
        .header("X-Influxdb-Version", INFLUXDB_COMPATIBLE_VERSION)
        .header("X-Influxdb-Build", "OSS")
        .header("X-Shale-Version", env!("CARGO_PKG_VERSION"))
        .body(Body::new(body))
        .expect("static response")
}

/// The InfluxDB 1.x version whose write API shale answers like; clients read it from `/ping`.
const INFLUXDB_COMPATIBLE_VERSION: &str = "1.8.10";

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Asks hyper to close the connection after this response (the request body was not read).
fn close_connection(mut response: Response<Body>) -> Response<Body> {
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
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
    use proptest::prelude::*;

    // Checks query-string decoding, including percent escapes and malformed escapes, which
    // stay as sent rather than failing the request.
    #[test]
    fn query_strings_decode() {
        let pairs = query_pairs(Some("db=my%2Ddb&precision=ms&x=a+b&bad=%zz&t=%4&u=%ff"));
        assert_eq!(pairs["db"], "my-db");
        assert_eq!(pairs["precision"], "ms");
        assert_eq!(pairs["x"], "a b");
        assert_eq!(pairs["bad"], "%zz");
        assert_eq!(pairs["t"], "%4");
        assert_eq!(pairs["u"], "\u{fffd}");
    }

    // Checks the route table: every route is found by its own method, other methods get a 405
    // with the route's methods, and the paths that used to panic (a database segment
    // overlapping the prefix and suffix) are plain 404s.
    #[test]
    fn routes_match_methods_and_paths() {
        for route in &ROUTES {
            let path = route.pattern.replace("{}", "db%201");
            match find_route(&route.methods[0], &path) {
                RouteMatch::Found {
                    route: found,
                    parameter,
                } => {
                    assert_eq!(found.pattern, route.pattern);
                    assert_eq!(parameter.is_some(), route.pattern.contains("{}"));
                }
                other => panic!("{path}: {other:?}"),
            }
            match find_route(&Method::PATCH, &path) {
                RouteMatch::WrongMethod { allowed } => assert_eq!(allowed, route.methods),
                other => panic!("{path}: {other:?}"),
            }
        }
        match find_route(&Method::GET, "/api/v1/databases/db%201/measurements") {
            RouteMatch::Found { parameter, .. } => assert_eq!(parameter.as_deref(), Some("db 1")),
            other => panic!("{other:?}"),
        }
        for path in [
            "/api/v1/databases/measurements",
            "/api/v1/databases//measurements",
            "/api/v1/databases/a/b/measurements",
            "/write/",
            "",
            "//",
            "/nope",
        ] {
            assert!(
                matches!(find_route(&Method::GET, path), RouteMatch::NotFound),
                "{path}"
            );
        }
        assert!(matches!(
            find_route(&Method::HEAD, "/ping"),
            RouteMatch::Found { .. }
        ));
    }

    proptest! {
        // Drives routing and query-string decoding with arbitrary paths, methods and query
        // strings: both are total (no panic), and a match really fits its pattern.
        #[test]
        fn routing_and_decoding_never_panic(
            path in "(/[a-z0-9%/.{}]{0,12}){0,6}",
            raw in proptest::collection::vec(any::<u8>(), 0..64),
            method in "[A-Z]{1,8}",
            query in ".{0,40}",
        ) {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let raw_path = String::from_utf8_lossy(&raw).into_owned();
            for candidate in [path.as_str(), raw_path.as_str()] {
                if let RouteMatch::Found { route, parameter } = find_route(&method, candidate) {
                    prop_assert!(route.methods.contains(&method));
                    prop_assert_eq!(
                        candidate.split('/').count(),
                        route.pattern.split('/').count()
                    );
                    prop_assert_eq!(parameter.is_some(), route.pattern.contains("{}"));
                }
            }
            let _ = query_pairs(Some(&query));
            let _ = query_pairs(Some(&raw_path));
        }
    }
}
