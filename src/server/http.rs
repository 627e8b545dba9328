//! The control API (axum): routes under `/v1`, bearer-token auth, JSON errors `{"error": {code, message, hint}}`.

use std::convert::Infallible;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::api;
use crate::server::orchestrator::{OrchestratorError, UpOutcome};
use crate::server::service::{Console, ExecLine, Service, ServiceError, MAX_STREAMS_PER_USER};
use crate::server::store::{HostRow, StoreError, User};

/// What every handler gets: the service layer.
pub type AppState = Service;

/// An API error: status + the JSON body of DESIGN.md.
#[derive(Debug)]
pub struct ApiErr {
    status: StatusCode,
    error: api::ApiError,
}

impl ApiErr {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiErr {
            status,
            error: api::ApiError {
                code: code.to_string(),
                message: message.into(),
                hint: None,
            },
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.error.hint = Some(hint.into());
        self
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            .hint("see the server log; the operation can be retried")
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        (self.status, Json(api::ErrorBody { error: self.error })).into_response()
    }
}

impl From<StoreError> for ApiErr {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Exists(what) => ApiErr::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{what} already exists"),
            ),
            StoreError::NotFound(what) => ApiErr::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            StoreError::NamespacesExhausted => ApiErr::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "exhausted",
                "no free namespace left on this server",
            )
            .hint(
                "ask the operator to remove an engineer who left: `fcdev server user remove NAME` \
                 frees their namespace (deleting clusters does not)",
            ),
            StoreError::Exhausted(what) => {
                ApiErr::new(StatusCode::INSUFFICIENT_STORAGE, "exhausted", what)
                    .hint("free some (`fcdev down`, delete peers) or ask the operator")
            }
            StoreError::Claimed(what) => ApiErr::new(StatusCode::CONFLICT, "conflict", what)
                .hint("two agents cannot share a host name: stop the other one, or give this host its own name (`fcdev server host add NAME`)"),
            StoreError::Unavailable(e) => {
                tracing::warn!("the database is unreachable: {e}");
                ApiErr::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the server cannot reach its database",
                )
                .hint("the operator should check the database (`fcdev server --database`); retry in a moment")
            }
            e @ (StoreError::File { .. }
            | StoreError::Corrupt(_)
            | StoreError::TooNew { .. }
            | StoreError::BadLocation(_)) => ApiErr::internal(e),
            StoreError::Sql(e) => ApiErr::internal(e),
            StoreError::Pg(e) => ApiErr::internal(e),
        }
    }
}

impl From<OrchestratorError> for ApiErr {
    fn from(e: OrchestratorError) -> Self {
        match e {
            OrchestratorError::Store(e) => e.into(),
            OrchestratorError::Image(crate::server::images::ImageError::NotFound(name)) => {
                ApiErr::new(
                    StatusCode::NOT_FOUND,
                    "unknown_image",
                    format!("image `{name}` not found"),
                )
                .hint(if matches!(name.as_str(), "tiny" | "press") {
                    format!(
                        "the server's operator builds it: `sudo fcdev image build {name} && sudo fcdev image snapshot {name}` (`fcdev images` lists what this server has)"
                    )
                } else {
                    "`fcdev images` lists the images this server has".to_string()
                })
            }
            OrchestratorError::Image(e) => ApiErr::internal(e),
            e @ OrchestratorError::ImageMismatch { .. } => {
                ApiErr::new(StatusCode::CONFLICT, "conflict", e.to_string())
                    .hint("pick another name with --name, or `fcdev down` it first")
            }
            OrchestratorError::NotFound(name) => cluster_not_found(&name),
            e @ OrchestratorError::UnknownVm { .. } => {
                ApiErr::new(StatusCode::NOT_FOUND, "unknown_vm", e.to_string())
                    .hint("`fcdev status` lists the cluster's VMs")
            }
            e @ OrchestratorError::Busy { .. } => {
                ApiErr::new(StatusCode::CONFLICT, "busy", e.to_string())
                    .hint("wait for it to finish (`fcdev status`), then try again")
            }
            e @ OrchestratorError::NotRunning { .. } => {
                ApiErr::new(StatusCode::CONFLICT, "conflict", e.to_string()).hint(
                    "`fcdev start` resumes a stopped cluster; `fcdev up` repairs a failed one",
                )
            }
            e @ OrchestratorError::SnapshotNotFound { .. } => {
                ApiErr::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
                    .hint("`fcdev snapshot list` shows the cluster's snapshots")
            }
            e @ OrchestratorError::SnapshotExists { .. } => {
                ApiErr::new(StatusCode::CONFLICT, "conflict", e.to_string())
                    .hint("pick another name, or remove it first: `fcdev snapshot rm NAME`")
            }
            e @ OrchestratorError::Incompatible { .. } => {
                ApiErr::new(StatusCode::CONFLICT, "incompatible", e.to_string()).hint(
                    "the cluster was left as it is; `fcdev snapshot rm NAME` removes the snapshot",
                )
            }
            OrchestratorError::Quota {
                used,
                quota,
                what,
                largest,
            } => {
                let message = OrchestratorError::Quota {
                    used,
                    quota,
                    what,
                    largest: Vec::new(),
                }
                .to_string();
                let hint = if largest.is_empty() {
                    "ask the operator for a larger `fcdev server --snapshot-quota`".to_string()
                } else {
                    format!(
                        "remove snapshots with `fcdev snapshot rm NAME --name CLUSTER`; the largest: {}",
                        largest.join(", ")
                    )
                };
                ApiErr::new(StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded", message)
                    .hint(hint)
            }
            OrchestratorError::SaveFailed(message) => {
                tracing::error!("{message}");
                ApiErr::new(StatusCode::INTERNAL_SERVER_ERROR, "save_failed", message)
                    .hint("no snapshot was kept and the cluster runs on; the server log has details")
            }
        }
    }
}

fn cluster_not_found(name: &str) -> ApiErr {
    ApiErr::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("cluster `{name}` not found"),
    )
    .hint("`fcdev status` lists your clusters; `fcdev up` creates one")
}

type ApiResult<T> = Result<T, ApiErr>;

/// A request body as JSON, with a 400 JSON error (not axum's text) when it is malformed.
pub struct JsonBody<T>(pub T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiErr;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// Query parameters, with a 400 JSON error when they do not parse.
pub struct QueryParams<T>(pub T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(QueryParams(v)),
            Err(r) => Err(
                ApiErr::new(StatusCode::BAD_REQUEST, "bad_request", r.body_text())
                    .hint("see docs/api.md for the query parameters"),
            ),
        }
    }
}

/// A path parameter, with a 400 JSON error when it does not decode (e.g. `%ff`, not UTF-8).
pub struct PathParam<T>(pub T);

impl<S, T> FromRequestParts<S> for PathParam<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(PathParam(v)),
            Err(r) => Err(
                ApiErr::new(StatusCode::BAD_REQUEST, "bad_request", r.body_text())
                    .hint("cluster names are DNS labels and peer ids numbers; see docs/api.md"),
            ),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiErr {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiErr::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "the request body is too large",
        )
        .hint("request bodies are small JSON objects (at most 2 MB); see docs/api.md");
    }
    let status = match &r {
        JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        JsonRejection::JsonDataError(_) => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiErr::new(status, "bad_request", r.body_text())
        .hint("send a JSON body as documented in docs/api.md")
}

/// The authenticated engineer.
pub struct AuthUser(pub User);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiErr;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let unauthorized = |msg: &str| {
            ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
                .hint("log in again with `fcdev login --server URL` and a valid token")
        };
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("missing bearer token"))?;
        // The scheme is case-insensitive (RFC 7235): `bearer TOKEN` is as good as `Bearer TOKEN`.
        let token = header
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| unauthorized("the Authorization header must be `Bearer TOKEN`"))?;
        let user = state.authenticate(token.to_string()).await?;
        user.map(AuthUser)
            .ok_or_else(|| unauthorized("unknown or revoked token"))
    }
}

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/health", get(health))
        .route("/me", get(me))
        .route("/namespace", put(ensure_namespace))
        .route("/images", get(images))
        .route("/clusters", post(create_cluster).get(list_clusters))
        .route("/clusters/{name}", get(get_cluster).delete(delete_cluster))
        .route("/clusters/{name}/events", get(cluster_events))
        .route("/clusters/{name}/reset", post(reset_cluster))
        .route("/clusters/{name}/vms/{vm}/console", get(vm_console))
        .route("/clusters/{name}/vms/{vm}/exec", post(exec_in_vm))
        .route("/clusters/{name}/stop", post(stop_cluster))
        .route("/clusters/{name}/start", post(start_cluster))
        .route(
            "/clusters/{name}/snapshots",
            post(create_snapshot).get(list_snapshots),
        )
        .route(
            "/clusters/{name}/snapshots/{snapshot}",
            delete(delete_snapshot),
        )
        .route(
            "/clusters/{name}/snapshots/{snapshot}/restore",
            post(restore_snapshot),
        )
        .route("/peers", post(create_peer).get(list_peers))
        .route("/peers/{id}", delete(delete_peer))
        .route("/agent/heartbeat", post(agent_heartbeat))
        .route("/agent/jobs", get(agent_jobs))
        .route("/agent/report", post(agent_report))
        .route("/agent/execs", get(agent_execs))
        .route("/agent/execs/{id}", post(agent_exec_output));
    Router::new()
        .nest(api::API_PREFIX, v1)
        .fallback(|| async {
            ApiErr::new(StatusCode::NOT_FOUND, "not_found", "no such route")
                .hint("the API lives under /v1; see docs/api.md")
        })
        .method_not_allowed_fallback(|| async {
            ApiErr::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(axum::middleware::map_response(version_header))
        .with_state(state)
}

/// Every response says which fcdev answered, so a client of another minor version can say so.
async fn version_header(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        api::VERSION_HEADER,
        axum::http::HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
    );
    resp
}

impl From<ServiceError> for ApiErr {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Store(e) => e.into(),
            ServiceError::Orchestrator(e) => e.into(),
            e @ ServiceError::InvalidName { .. } => ApiErr::new(
                StatusCode::BAD_REQUEST,
                "invalid_name",
                e.to_string(),
            )
            .hint("use 1–63 lowercase letters, digits and `-`, not starting or ending with `-` (it becomes a DNS label)"),
            e @ ServiceError::InvalidSshKey(_) => {
                ApiErr::new(StatusCode::BAD_REQUEST, "invalid_ssh_key", e.to_string()).hint(
                    "send `ssh-ed25519 AAAA… comment` lines (ed25519 or ECDSA, at most 256 bytes each)",
                )
            }
            e @ ServiceError::TooManySshKeys => {
                ApiErr::new(StatusCode::BAD_REQUEST, "invalid_ssh_key", e.to_string())
            }
            e @ ServiceError::InvalidPublicKey => {
                ApiErr::new(StatusCode::BAD_REQUEST, "invalid_public_key", e.to_string())
                    .hint("`fcdev tunnel` generates the key pair for you; never send a private key")
            }
            e @ ServiceError::EmptyCommand => {
                ApiErr::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            ServiceError::ClusterNotFound(name) => cluster_not_found(&name),
            e @ ServiceError::BeingDeleted(_) => {
                ApiErr::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            e @ ServiceError::NoSuchVm { .. } => {
                ApiErr::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
                    .hint("`fcdev status` lists your clusters and their VMs")
            }
            e @ ServiceError::NoConsole(_) => {
                ApiErr::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            e @ ServiceError::PeerNotFound(_) => {
                ApiErr::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            ServiceError::DeleteFailed(reason) => ApiErr::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "delete_failed",
                reason,
            )
            .hint("run `fcdev down` again; the server log has details"),
            ServiceError::TooManyStreams => ApiErr::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                format!(
                    "at most {MAX_STREAMS_PER_USER} streams (events and followed logs) may be open at once"
                ),
            )
            .hint("close other streams (`fcdev up`, `fcdev logs -f` in other terminals) and try again"),
            e @ ServiceError::NoLiveHost { .. } => {
                ApiErr::new(StatusCode::SERVICE_UNAVAILABLE, "no_host", e.to_string()).hint(
                    "the operator starts agents (`fcdev server --role agent --control URL`) on hosts \
                     that have the image",
                )
            }
            e @ ServiceError::HostLost { .. } => {
                ApiErr::new(StatusCode::CONFLICT, "host_lost", e.to_string()).hint(
                    "`fcdev up` re-creates the cluster on another host from its image (everything since \
                     the onboarding snapshot is gone)",
                )
            }
            e @ ServiceError::NotOnControl(_) => {
                ApiErr::new(StatusCode::NOT_IMPLEMENTED, "not_supported", e.to_string())
                    .hint("run `fcdev server` with `--role all` for this operation")
            }
            e @ ServiceError::ExecGone(_) => ApiErr::new(StatusCode::GONE, "gone", e.to_string())
                .hint("the agent stops the command"),
            e @ ServiceError::NotYourExec(_) => {
                ApiErr::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            e @ ServiceError::BadExecOutput => {
                ApiErr::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            e @ ServiceError::WrongHost(_) => ApiErr::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                e.to_string(),
            )
            .hint("start the agent with the token `fcdev server host add NAME` printed for its --host-name"),
            ServiceError::Internal(e) => ApiErr::internal(e),
        }
    }
}

async fn health(State(state): State<AppState>) -> Json<api::Health> {
    Json(state.health())
}

async fn me(State(state): State<AppState>, AuthUser(user): AuthUser) -> ApiResult<Json<api::Me>> {
    Ok(Json(state.me(user).await?))
}

async fn ensure_namespace(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> ApiResult<Json<api::Namespace>> {
    Ok(Json(state.ensure_namespace(user).await?))
}

async fn images(
    State(state): State<AppState>,
    AuthUser(_): AuthUser,
) -> ApiResult<Json<Vec<api::ImageInfo>>> {
    Ok(Json(state.images().await?))
}

fn up_status(outcome: UpOutcome) -> StatusCode {
    match outcome {
        UpOutcome::AlreadyReady => StatusCode::OK,
        UpOutcome::Created | UpOutcome::Resumed => StatusCode::ACCEPTED,
    }
}

async fn create_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(req): JsonBody<api::CreateCluster>,
) -> ApiResult<Response> {
    let (view, outcome) = state.up(user, req).await?;
    Ok((up_status(outcome), Json(view)).into_response())
}

async fn list_clusters(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> ApiResult<Json<Vec<api::Cluster>>> {
    Ok(Json(state.clusters(user).await?))
}

async fn get_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Json<api::Cluster>> {
    Ok(Json(state.cluster(user, name).await?))
}

async fn reset_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Response> {
    let view = state.reset(user, name).await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// `POST /clusters/{name}/vms/{vm}/exec {"command": "…"}`: runs the command in the VM through its guest agent;
/// the answer streams NDJSON lines as the output comes: `{"out": "<base64>"}`…, then `{"exit": N}` (or
/// `{"error": "…"}`). A client that goes away stops the command.
async fn exec_in_vm(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam((name, vm)): PathParam<(String, String)>,
    JsonBody(req): JsonBody<api::ExecRequest>,
) -> ApiResult<Response> {
    use base64::Engine;
    let rx = state.exec(user, name, vm, req.command).await?;
    let lines =
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |line| {
            let v = match line {
                ExecLine::Out(bytes) => serde_json::json!({
                    "out": base64::engine::general_purpose::STANDARD.encode(bytes)
                }),
                ExecLine::Exit(code) => serde_json::json!({ "exit": code }),
                ExecLine::Error(e) => serde_json::json!({ "error": e }),
            };
            Ok::<_, Infallible>(v.to_string() + "\n")
        });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(lines))
        .map_err(ApiErr::internal)
}

async fn delete_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Json<serde_json::Value>> {
    state.delete(user, name.clone()).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

async fn stop_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Response> {
    let (view, stopping) = state.stop(user, name).await?;
    let status = if stopping {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

async fn start_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Response> {
    let (view, outcome) = state.start(user, name).await?;
    Ok((up_status(outcome), Json(view)).into_response())
}

async fn create_snapshot(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
    JsonBody(req): JsonBody<api::CreateSnapshot>,
) -> ApiResult<Response> {
    let snap = state.save_snapshot(user, name, req.name).await?;
    Ok((StatusCode::CREATED, Json(snap)).into_response())
}

async fn list_snapshots(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Json<Vec<api::Snapshot>>> {
    Ok(Json(state.snapshots(user, name).await?))
}

async fn delete_snapshot(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam((name, snapshot)): PathParam<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    state.delete_snapshot(user, name, snapshot.clone()).await?;
    Ok(Json(serde_json::json!({ "deleted": snapshot })))
}

async fn restore_snapshot(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam((name, snapshot)): PathParam<(String, String)>,
) -> ApiResult<Response> {
    let view = state.restore_snapshot(user, name, snapshot).await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: i64,
}

/// Server-sent events: every stored event after `?after=SEQ`, then live ones. The stream ends once the cluster is
/// ready, failed or deleted, at once when it already is; a client that goes away ends it at once too.
async fn cluster_events(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
    QueryParams(q): QueryParams<EventsQuery>,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>> {
    let rx = state.events(user, name, q.after).await?;
    let stream = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        |e: api::ClusterEvent| {
            Ok(Event::default()
                .id(e.seq.to_string())
                .json_data(&e)
                .unwrap_or_default())
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default = "default_console_lines")]
    lines: usize,
    #[serde(default)]
    follow: bool,
}

fn default_console_lines() -> usize {
    100
}

/// A VM's console log as `text/plain`: its last `?lines=N` lines (at most 10 000), and with `?follow=true` what is
/// appended after them, until the cluster is deleted or the client goes away. A follow counts as one of the
/// engineer's streams (like an event stream). An unknown VM is a 404 naming the cluster's VMs.
async fn vm_console(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam((name, vm)): PathParam<(String, String)>,
    QueryParams(q): QueryParams<ConsoleQuery>,
) -> ApiResult<Response> {
    let text_plain = [(
        axum::http::header::CONTENT_TYPE,
        "text/plain; charset=utf-8",
    )];
    Ok(
        match state.console(user, name, vm, q.lines, q.follow).await? {
            Console::Text(bytes) => (text_plain, bytes).into_response(),
            Console::Follow(rx) => {
                let body =
                    axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
                (text_plain, body).into_response()
            }
        },
    )
}

async fn create_peer(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(req): JsonBody<api::CreatePeer>,
) -> ApiResult<Response> {
    let config = state.register_peer(user, req).await?;
    Ok((StatusCode::CREATED, Json(config)).into_response())
}

async fn list_peers(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> ApiResult<Json<Vec<api::Peer>>> {
    Ok(Json(state.peers(user).await?))
}

async fn delete_peer(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(id): PathParam<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let id: i64 = id.parse().map_err(|_| {
        ApiErr::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("`{id}` is not a peer id"),
        )
        .hint("`fcdev status` lists your peers with their ids")
    })?;
    state.delete_peer(user, id).await?;
    Ok(Json(serde_json::json!({ "deleted": id })))
}

/// The host of an agent's request (its host token).
pub struct AgentHost(pub HostRow);

impl FromRequestParts<AppState> for AgentHost {
    type Rejection = ApiErr;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let unauthorized = |msg: &str| {
            ApiErr::new(StatusCode::UNAUTHORIZED, "unauthorized", msg).hint(
                "the operator makes a host token with `fcdev server host add NAME`; the agent reads it from \
                 FCDEV_HOST_TOKEN or --host-token-file",
            )
        };
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_string())
            .filter(|token| !token.is_empty())
            .ok_or_else(|| unauthorized("missing bearer host token"))?;
        let host = state.authenticate_host(token).await?;
        host.map(AgentHost)
            .ok_or_else(|| unauthorized("unknown or revoked host token"))
    }
}

/// `POST /v1/agent/heartbeat`: an agent registers (its first heartbeat) and renews its host's lease.
async fn agent_heartbeat(
    State(state): State<AppState>,
    AgentHost(host): AgentHost,
    JsonBody(beat): JsonBody<api::AgentHeartbeat>,
) -> ApiResult<Json<api::AgentLease>> {
    Ok(Json(state.host_heartbeat(host, beat).await?))
}

#[derive(Debug, Deserialize)]
struct JobsQuery {
    /// The version of the work the agent has.
    after: Option<String>,
    /// Seconds to hold the request while nothing changed (at most 30).
    #[serde(default)]
    wait: u64,
}

/// `GET /v1/agent/jobs?after=VERSION&wait=SECS`: what the agent's host must run (a long poll).
async fn agent_jobs(
    State(state): State<AppState>,
    AgentHost(host): AgentHost,
    QueryParams(q): QueryParams<JobsQuery>,
) -> ApiResult<Json<api::AgentWork>> {
    Ok(Json(state.agent_work(host, q.after, q.wait).await?))
}

/// `POST /v1/agent/report`: the state of the clusters the agent runs, with their new events.
async fn agent_report(
    State(state): State<AppState>,
    AgentHost(host): AgentHost,
    JsonBody(report): JsonBody<api::AgentReport>,
) -> ApiResult<StatusCode> {
    state.agent_report(host, report).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct ExecsQuery {
    /// Seconds to hold the request while no session waits (at most 30).
    #[serde(default)]
    wait: u64,
}

/// `GET /v1/agent/execs?wait=SECS`: the `fcdev exec` sessions waiting for the agent's host (a long poll).
async fn agent_execs(
    State(state): State<AppState>,
    AgentHost(host): AgentHost,
    QueryParams(q): QueryParams<ExecsQuery>,
) -> Json<api::AgentExecs> {
    Json(state.agent_execs(host, q.wait).await)
}

/// `POST /v1/agent/execs/{id}`: the next piece of a session's answer (output, then the exit code or an error).
async fn agent_exec_output(
    State(state): State<AppState>,
    AgentHost(host): AgentHost,
    PathParam(id): PathParam<String>,
    JsonBody(piece): JsonBody<api::AgentExecOutput>,
) -> ApiResult<StatusCode> {
    state.agent_exec_output(host, id, piece).await?;
    Ok(StatusCode::NO_CONTENT)
}
