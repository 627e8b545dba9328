//! The control API (axum): routes under `/v1`, bearer-token auth, JSON errors `{"error": {code, message, hint}}`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

use crate::api::{self, ClusterState};
use crate::names;
use crate::server::hub_control::{HubControl, HubPeerEntry, HubPeerError};
use crate::server::orchestrator::{hostname, Orchestrator, OrchestratorError, UpOutcome};
use crate::server::store::{NamespaceRow, Store, StoreError, User};

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<Store>,
    pub orchestrator: Arc<Orchestrator>,
    pub hub: Arc<dyn HubControl>,
}

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
        let store = state.store.clone();
        let token = token.to_string();
        let user = tokio::task::spawn_blocking(move || store.user_by_token(&token))
            .await
            .map_err(ApiErr::internal)??;
        user.map(AuthUser)
            .ok_or_else(|| unauthorized("unknown or revoked token"))
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiErr::internal)
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
        .layer(axum::Extension(Arc::new(StreamLimits::default())));
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

async fn health(State(state): State<AppState>) -> Json<api::Health> {
    let backend = state.orchestrator.backend();
    Json(api::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        backend: backend.kind().into(),
        accelerator: backend.accelerator(),
    })
}

fn namespace_view(ns: &NamespaceRow) -> api::Namespace {
    api::Namespace {
        name: ns.name.clone(),
        subnet: ns.subnet.to_string(),
        gateway: ns.gateway().to_string(),
    }
}

async fn me(State(state): State<AppState>, AuthUser(user): AuthUser) -> ApiResult<Json<api::Me>> {
    let store = state.store.clone();
    let uid = user.id;
    let ns = blocking(move || store.namespace_of(uid)).await??;
    Ok(Json(api::Me {
        user: user.name,
        namespace: ns.as_ref().map(namespace_view),
    }))
}

async fn my_namespace(state: &AppState, user: User) -> ApiResult<NamespaceRow> {
    let store = state.store.clone();
    Ok(blocking(move || store.ensure_namespace(&user)).await??)
}

async fn existing_namespace(state: &AppState, user: &User) -> ApiResult<Option<NamespaceRow>> {
    let store = state.store.clone();
    let uid = user.id;
    Ok(blocking(move || store.namespace_of(uid)).await??)
}

async fn ensure_namespace(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> ApiResult<Json<api::Namespace>> {
    let ns = my_namespace(&state, user).await?;
    Ok(Json(namespace_view(&ns)))
}

async fn images(
    State(state): State<AppState>,
    AuthUser(_): AuthUser,
) -> ApiResult<Json<Vec<api::ImageInfo>>> {
    let catalog = state.orchestrator.catalog().clone();
    let list = blocking(move || catalog.list().iter().map(|i| i.info()).collect()).await?;
    Ok(Json(list))
}

fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    if names::is_dns_label(name) {
        Ok(())
    } else {
        Err(ApiErr::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!("`{name}` is not a valid {kind} name"),
        )
        .hint("use 1–63 lowercase letters, digits and `-`, not starting or ending with `-` (it becomes a DNS label)"))
    }
}

async fn create_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(req): JsonBody<api::CreateCluster>,
) -> ApiResult<Response> {
    check_name("cluster", &req.name)?;
    check_name("image", &req.image)?;
    let bad_key = req.ssh_keys.iter().find(|k| !valid_ssh_public_key(k));
    if let Some(key) = bad_key {
        return Err(ApiErr::new(
            StatusCode::BAD_REQUEST,
            "invalid_ssh_key",
            format!(
                "`{}` is not an ssh public key",
                key.chars().take(40).collect::<String>()
            ),
        )
        .hint(
            "send `ssh-ed25519 AAAA… comment` lines (ed25519 or ECDSA, at most 256 bytes each)",
        ));
    }
    if req.ssh_keys.len() > MAX_SSH_KEYS {
        return Err(ApiErr::new(
            StatusCode::BAD_REQUEST,
            "invalid_ssh_key",
            format!("at most {MAX_SSH_KEYS} ssh keys per request"),
        ));
    }
    let ns = my_namespace(&state, user).await?;
    if !req.ssh_keys.is_empty() {
        let store = state.store.clone();
        let (nsid, keys) = (ns.id, req.ssh_keys.clone());
        blocking(move || store.add_ssh_keys(nsid, &keys, MAX_SSH_KEYS)).await??;
    }
    // Events after this one belong to this request: the client follows `/events?after=event_seq`.
    let seq_before = match state.store.cluster(ns.id, &req.name)? {
        Some(existing) => {
            // Notice a dead VM first, so its `failed` event comes before this request's progress.
            let orch = state.orchestrator.clone();
            let e = existing.clone();
            blocking(move || orch.refresh(&e)).await??;
            state.store.last_event_seq(existing.id)?
        }
        // A new cluster's events are numbered from 1.
        None => 0,
    };
    // `up` spawns background work on this runtime; its own blocking parts are short store reads.
    let (row, outcome) = state.orchestrator.up(&ns, &req.name, &req.image)?;
    let store = state.store.clone();
    let row = blocking(move || store.cluster_by_id(row.id))
        .await??
        .unwrap_or(row);
    let mut view = state.orchestrator.view(&ns, &row)?;
    view.event_seq = seq_before;
    let status = match outcome {
        UpOutcome::AlreadyReady => StatusCode::OK,
        UpOutcome::Created | UpOutcome::Resumed => StatusCode::ACCEPTED,
    };
    Ok((status, Json(view)).into_response())
}

async fn list_clusters(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> ApiResult<Json<Vec<api::Cluster>>> {
    let Some(ns) = existing_namespace(&state, &user).await? else {
        return Ok(Json(Vec::new()));
    };
    let store = state.store.clone();
    let nsid = ns.id;
    let rows = blocking(move || store.clusters_in(nsid)).await??;
    let mut out = Vec::new();
    for row in rows {
        out.push(state.orchestrator.view(&ns, &row)?);
    }
    Ok(Json(out))
}

async fn find_cluster(
    state: &AppState,
    user: &User,
    name: &str,
) -> ApiResult<(NamespaceRow, crate::server::store::ClusterRow)> {
    check_name("cluster", name)?;
    let ns = existing_namespace(state, user)
        .await?
        .ok_or_else(|| cluster_not_found(name))?;
    let store = state.store.clone();
    let (nsid, n) = (ns.id, name.to_string());
    let row = blocking(move || store.cluster(nsid, &n))
        .await??
        .ok_or_else(|| cluster_not_found(name))?;
    Ok((ns, row))
}

async fn get_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Json<api::Cluster>> {
    let (ns, row) = find_cluster(&state, &user, &name).await?;
    let orch = state.orchestrator.clone();
    let r = row.clone();
    blocking(move || orch.refresh(&r)).await??;
    let store = state.store.clone();
    let row = blocking(move || store.cluster_by_id(row.id))
        .await??
        .ok_or_else(|| cluster_not_found(&name))?;
    Ok(Json(state.orchestrator.view(&ns, &row)?))
}

async fn reset_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Response> {
    let (ns, row) = find_cluster(&state, &user, &name).await?;
    if matches!(row.state, ClusterState::Deleting) {
        return Err(ApiErr::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("cluster `{name}` is being deleted"),
        ));
    }
    let seq_before = state.store.last_event_seq(row.id)?;
    state.orchestrator.reset(&row)?;
    let store = state.store.clone();
    let row = blocking(move || store.cluster_by_id(row.id))
        .await??
        .ok_or_else(|| cluster_not_found(&name))?;
    let mut view = state.orchestrator.view(&ns, &row)?;
    view.event_seq = seq_before;
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
    let (ns, row) = find_cluster(&state, &user, &name).await?;
    check_name("VM", &vm)?;
    if req.command.trim().is_empty() {
        return Err(ApiErr::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the command is empty",
        ));
    }
    let orch = state.orchestrator.clone();
    let spec = blocking(move || orch.spec_of(&ns, &row, &vm)).await??;
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    let backend = state.orchestrator.backend().clone();
    tokio::task::spawn_blocking(move || {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut out = |bytes: &[u8]| {
            let line = serde_json::json!({ "out": b64.encode(bytes) }).to_string() + "\n";
            tx.blocking_send(line).is_ok()
        };
        let last = match backend.exec(&spec, &req.command, &mut out) {
            Ok(code) => serde_json::json!({ "exit": code }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let _ = tx.blocking_send(last.to_string() + "\n");
    });
    let body = axum::body::Body::from_stream(tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, Infallible>,
    ));
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(body)
        .map_err(ApiErr::internal)
}

async fn delete_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let (_ns, row) = find_cluster(&state, &user, &name).await?;
    state
        .orchestrator
        .spawn_delete(row.clone())
        .await
        .map_err(ApiErr::internal)??;
    let store = state.store.clone();
    let id = row.id;
    if let Some(after) = blocking(move || store.cluster_by_id(id)).await?? {
        return Err(ApiErr::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "delete_failed",
            after.reason.unwrap_or_else(|| "delete failed".into()),
        )
        .hint("run `fcdev down` again; the server log has details"));
    }
    Ok(Json(serde_json::json!({ "deleted": name })))
}

/// The cluster's view as the 202 of an operation that goes on in the background: `event_seq` is where its
/// events start.
async fn accepted(
    state: &AppState,
    ns: &NamespaceRow,
    id: i64,
    name: &str,
    seq_before: i64,
    status: StatusCode,
) -> ApiResult<Response> {
    let store = state.store.clone();
    let row = blocking(move || store.cluster_by_id(id))
        .await??
        .ok_or_else(|| cluster_not_found(name))?;
    let mut view = state.orchestrator.view(ns, &row)?;
    view.event_seq = seq_before;
    Ok((status, Json(view)).into_response())
}

async fn stop_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Response> {
    let (ns, row) = find_cluster(&state, &user, &name).await?;
    let seq_before = state.store.last_event_seq(row.id)?;
    let stopping = state.orchestrator.stop(&row)?;
    let status = if stopping {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    accepted(&state, &ns, row.id, &name, seq_before, status).await
}

async fn start_cluster(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Response> {
    let (ns, row) = find_cluster(&state, &user, &name).await?;
    let seq_before = state.store.last_event_seq(row.id)?;
    // `up` of the existing cluster: a stopped one resumes, a failed one is repaired, a ready one is left alone.
    let (_, outcome) = state.orchestrator.up(&ns, &row.name, &row.image)?;
    let status = match outcome {
        UpOutcome::AlreadyReady => StatusCode::OK,
        UpOutcome::Created | UpOutcome::Resumed => StatusCode::ACCEPTED,
    };
    accepted(&state, &ns, row.id, &name, seq_before, status).await
}

fn snapshot_view(row: &crate::server::store::SnapshotRow) -> api::Snapshot {
    api::Snapshot {
        name: row.name.clone(),
        cluster: row.cluster.clone(),
        image: row.image.clone(),
        size_bytes: row.size_bytes,
        created_at: row.created_at.clone(),
    }
}

async fn create_snapshot(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
    JsonBody(req): JsonBody<api::CreateSnapshot>,
) -> ApiResult<Response> {
    check_name("snapshot", &req.name)?;
    let (ns, row) = find_cluster(&state, &user, &name).await?;
    // A task of its own: a client that goes away must not leave the VMs paused half-way.
    let task = tokio::spawn(
        state
            .orchestrator
            .clone()
            .save_snapshot(ns, row.id, req.name),
    );
    let snap = task.await.map_err(ApiErr::internal)??;
    Ok((StatusCode::CREATED, Json(snapshot_view(&snap))).into_response())
}

async fn list_snapshots(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
) -> ApiResult<Json<Vec<api::Snapshot>>> {
    let (_ns, row) = find_cluster(&state, &user, &name).await?;
    let orch = state.orchestrator.clone();
    let rows = blocking(move || orch.snapshots(&row)).await??;
    Ok(Json(rows.iter().map(snapshot_view).collect()))
}

async fn delete_snapshot(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam((name, snapshot)): PathParam<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    check_name("snapshot", &snapshot)?;
    let (ns, row) = find_cluster(&state, &user, &name).await?;
    let task = tokio::spawn(
        state
            .orchestrator
            .clone()
            .delete_snapshot(ns, row, snapshot.clone()),
    );
    task.await.map_err(ApiErr::internal)??;
    Ok(Json(serde_json::json!({ "deleted": snapshot })))
}

async fn restore_snapshot(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    PathParam((name, snapshot)): PathParam<(String, String)>,
) -> ApiResult<Response> {
    check_name("snapshot", &snapshot)?;
    let (ns, row) = find_cluster(&state, &user, &name).await?;
    let seq_before = state.store.last_event_seq(row.id)?;
    state
        .orchestrator
        .restore_snapshot(&ns, &row, &snapshot)
        .await?;
    accepted(&state, &ns, row.id, &name, seq_before, StatusCode::ACCEPTED).await
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    after: i64,
}

/// Event streams one engineer may have open at once; one more is answered 429.
pub const MAX_STREAMS_PER_USER: usize = 16;

/// Open event streams per engineer.
#[derive(Default)]
pub struct StreamLimits {
    open: std::sync::Mutex<std::collections::HashMap<i64, usize>>,
}

/// One open stream, counted until it is dropped (the stream's task ends).
pub struct StreamPermit {
    limits: Arc<StreamLimits>,
    user_id: i64,
}

impl StreamLimits {
    fn acquire(self: &Arc<Self>, user_id: i64) -> Option<StreamPermit> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(user_id).or_default();
        if *n >= MAX_STREAMS_PER_USER {
            return None;
        }
        *n += 1;
        Some(StreamPermit {
            limits: self.clone(),
            user_id,
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.user_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

/// A cluster in a final state (or gone) produces no more events until someone acts on it.
fn is_final(cluster: &Option<crate::server::store::ClusterRow>) -> bool {
    cluster.as_ref().is_none_or(|c| !c.state.is_transient())
}

/// Server-sent events: every stored event after `?after=SEQ`, then live ones. The stream ends once the cluster is
/// ready, failed or deleted, at once when it already is; a client that goes away ends it at once too.
async fn cluster_events(
    State(state): State<AppState>,
    axum::Extension(limits): axum::Extension<Arc<StreamLimits>>,
    AuthUser(user): AuthUser,
    PathParam(name): PathParam<String>,
    QueryParams(q): QueryParams<EventsQuery>,
) -> ApiResult<Sse<impl futures::Stream<Item = Result<Event, Infallible>>>> {
    let (_ns, row) = find_cluster(&state, &user, &name).await?;
    let permit = limits.acquire(user.id).ok_or_else(too_many_streams)?;
    // Subscribe before reading the store, so no event falls between the two.
    let mut live = state.orchestrator.subscribe();
    let store = state.store.clone();
    let cid = row.id;
    // The state is read before the events: a final state's event is stored with it, so it is among `past`.
    let (current, past) = blocking(move || -> Result<_, StoreError> {
        let current = store.cluster_by_id(cid)?;
        Ok((current, store.events_after(cid, q.after)?))
    })
    .await??;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let cluster_name = row.name.clone();
    let store = state.store.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let to_event = |e: &crate::server::store::EventRow| {
            let ev = api::ClusterEvent {
                seq: e.seq,
                cluster: cluster_name.clone(),
                vm: e.vm.clone(),
                state: e.state.clone(),
                message: e.message.clone(),
                at: e.at.clone(),
            };
            Event::default()
                .id(e.seq.to_string())
                .json_data(&ev)
                .unwrap_or_default()
        };
        let is_end = |e: &crate::server::store::EventRow| {
            e.vm.is_none() && ClusterState::ends_stream(&e.state)
        };
        let reread = |store: Arc<Store>| async move {
            tokio::task::spawn_blocking(move || store.cluster_by_id(cid).ok().flatten())
                .await
                .ok()
                .flatten()
        };
        let mut last = q.after;
        let mut ended = false;
        for e in &past {
            last = e.seq;
            if tx.send(Ok(to_event(e))).await.is_err() {
                return;
            }
            ended = is_end(e);
        }
        if is_final(&current) {
            return;
        }
        // A stored terminal event ends the stream unless the cluster moved on since (a retry after failure).
        if ended && is_final(&reread(store.clone()).await) {
            return;
        }
        loop {
            let received = tokio::select! {
                // The client went away: end now, not at the next write.
                _ = tx.closed() => return,
                received = live.recv() => received,
            };
            match received {
                Ok(e) if e.cluster_id == cid && e.seq > last => {
                    last = e.seq;
                    if tx.send(Ok(to_event(&e))).await.is_err() || is_end(&e) {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Catch up from the store.
                    let s = store.clone();
                    let missed = tokio::task::spawn_blocking(move || s.events_after(cid, last))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    for e in missed {
                        last = e.seq;
                        if tx.send(Ok(to_event(&e))).await.is_err() || is_end(&e) {
                            return;
                        }
                    }
                }
                Err(_) => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
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

/// How often a followed console log is read for what was appended.
const CONSOLE_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// How often a follow checks that the cluster still exists (it ends when the cluster is deleted).
const CONSOLE_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// A VM's console log as `text/plain`: its last `?lines=N` lines (at most 10 000), and with `?follow=true` what is
/// appended after them, until the cluster is deleted or the client goes away. A follow counts as one of the
/// engineer's streams (like an event stream). An unknown VM is a 404 naming the cluster's VMs.
async fn vm_console(
    State(state): State<AppState>,
    axum::Extension(limits): axum::Extension<Arc<StreamLimits>>,
    AuthUser(user): AuthUser,
    PathParam((name, vm)): PathParam<(String, String)>,
    QueryParams(q): QueryParams<ConsoleQuery>,
) -> ApiResult<Response> {
    use crate::server::console;
    let (ns, row) = find_cluster(&state, &user, &name).await?;
    let store = state.store.clone();
    let cid = row.id;
    let vms = blocking(move || store.vms_of(cid)).await??;
    let Some(vm_row) = vms.iter().find(|v| v.name == vm).cloned() else {
        let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
        return Err(ApiErr::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no VM `{vm}` in cluster `{name}`; its VMs are: {}",
                names.join(", ")
            ),
        )
        .hint("`fcdev status` lists your clusters and their VMs"));
    };
    let orch = state.orchestrator.clone();
    let (ns2, row2) = (ns.clone(), row.clone());
    let path = blocking(move || orch.console_log(&ns2, &row2, &vm_row))
        .await??
        .ok_or_else(|| {
            ApiErr::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("VM `{vm}` has no console log"),
            )
        })?;
    let permit = if q.follow {
        Some(limits.acquire(user.id).ok_or_else(too_many_streams)?)
    } else {
        None
    };
    let p = path.clone();
    let lines = q.lines;
    let first = blocking(move || console::tail(&p, lines))
        .await?
        .map_err(ApiErr::internal)?;
    let text_plain = [(
        axum::http::header::CONTENT_TYPE,
        "text/plain; charset=utf-8",
    )];
    let Some(permit) = permit else {
        return Ok((text_plain, first.bytes).into_response());
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, Infallible>>(16);
    let store = state.store.clone();
    tokio::spawn(async move {
        let _permit = permit;
        if !first.bytes.is_empty() && tx.send(Ok(first.bytes)).await.is_err() {
            return;
        }
        let mut next = first.next;
        let mut checked = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(CONSOLE_POLL) => {}
            }
            if checked.elapsed() >= CONSOLE_CHECK {
                checked = tokio::time::Instant::now();
                let s = store.clone();
                let exists = tokio::task::spawn_blocking(move || s.cluster_by_id(cid))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|c| c.is_some());
                // Gone (a store error is not "gone": keep following).
                if exists == Some(false) {
                    return;
                }
            }
            let p = path.clone();
            let from = next;
            let Ok(Ok(chunk)) =
                tokio::task::spawn_blocking(move || console::read_from(&p, from)).await
            else {
                continue;
            };
            next = chunk.next;
            if !chunk.bytes.is_empty() && tx.send(Ok(chunk.bytes)).await.is_err() {
                return;
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((text_plain, body).into_response())
}

fn too_many_streams() -> ApiErr {
    ApiErr::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_streams",
        format!(
            "at most {MAX_STREAMS_PER_USER} streams (events and followed logs) may be open at once"
        ),
    )
    .hint("close other streams (`fcdev up`, `fcdev logs -f` in other terminals) and try again")
}

/// The longest ssh key line accepted (an ed25519 key with a comment is ~100 bytes).
const MAX_SSH_KEY_LEN: usize = 256;
/// Keys kept per namespace (the newest win): the guest gets them all on its kernel command line.
pub const MAX_SSH_KEYS: usize = 4;

/// One line `TYPE BASE64 [comment]` of a known key type, nothing that could break the guest's authorized_keys.
fn valid_ssh_public_key(key: &str) -> bool {
    use base64::Engine;
    let mut parts = key.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return false;
    };
    // Short key types only: every key rides on the guest's kernel command line (2 KB in all) at boot.
    key.len() <= MAX_SSH_KEY_LEN
        && !key.contains(['\n', '\r', '\0'])
        && matches!(
            kind,
            "ssh-ed25519" | "ecdsa-sha2-nistp256" | "ecdsa-sha2-nistp384"
        )
        && base64::engine::general_purpose::STANDARD
            .decode(blob)
            .is_ok()
}

/// 32 bytes of base64 and not a point of small order (with such a key anyone completes a handshake).
fn valid_public_key(key: &str) -> bool {
    crate::tunnel::PublicKey::from_base64(key).is_ok()
}

fn invalid_public_key() -> ApiErr {
    ApiErr::new(
        StatusCode::BAD_REQUEST,
        "invalid_public_key",
        "public_key must be a base64 x25519 public key (32 bytes, not a point of small order)",
    )
    .hint("`fcdev tunnel` generates the key pair for you; never send a private key")
}

async fn create_peer(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    JsonBody(req): JsonBody<api::CreatePeer>,
) -> ApiResult<Response> {
    check_name("peer", &req.name)?;
    if !valid_public_key(&req.public_key) {
        return Err(invalid_public_key());
    }
    let ns = my_namespace(&state, user).await?;
    let store = state.store.clone();
    let (ns2, name, key) = (
        ns.clone(),
        req.name.clone(),
        req.public_key.trim().to_string(),
    );
    let peer = blocking(move || store.add_peer(&ns2, &name, &key)).await??;
    if let Err(e) = state.hub.add_peer(HubPeerEntry {
        id: peer.id,
        public_key: peer.public_key.clone(),
        address: peer.address,
        subnet: ns.subnet,
    }) {
        return Err(match e {
            HubPeerError::InvalidKey(_) => {
                let store = state.store.clone();
                let id = peer.id;
                blocking(move || store.remove_peer(id)).await??;
                invalid_public_key()
            }
            HubPeerError::Refused(e) => ApiErr::internal(format!("the hub refused the peer: {e}")),
        });
    }
    let store = state.store.clone();
    let nsid = ns.id;
    let vms = blocking(move || store.vms_in_namespace(nsid)).await??;
    let hosts = vms
        .into_iter()
        .map(|(cluster, vm)| api::HostEntry {
            name: hostname(&vm.name, &cluster, &ns.name),
            address: vm.address.to_string(),
        })
        .collect();
    let config = api::PeerConfig {
        id: peer.id,
        name: peer.name,
        address: peer.address.to_string(),
        server_public_key: state.hub.public_key(),
        endpoint: state.hub.endpoint(),
        allowed_ips: vec![ns.subnet.to_string()],
        keepalive: 25,
        namespace: ns.name.clone(),
        dns_suffix: format!("{}.{}", ns.name, names::DNS_SUFFIX),
        hosts,
    };
    Ok((StatusCode::CREATED, Json(config)).into_response())
}

async fn list_peers(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> ApiResult<Json<Vec<api::Peer>>> {
    let Some(ns) = existing_namespace(&state, &user).await? else {
        return Ok(Json(Vec::new()));
    };
    let store = state.store.clone();
    let nsid = ns.id;
    let peers = blocking(move || store.peers_in(nsid)).await??;
    Ok(Json(
        peers
            .into_iter()
            .map(|p| {
                let c = state.hub.counters(p.id).unwrap_or_default();
                api::Peer {
                    id: p.id,
                    name: p.name,
                    public_key: p.public_key,
                    address: p.address.to_string(),
                    handshake_age_secs: c.handshake_age.map(|d| d.as_secs()),
                    rx_bytes: c.rx_bytes,
                    tx_bytes: c.tx_bytes,
                    dropped_packets: c.dropped_packets,
                    endpoint: c.endpoint,
                }
            })
            .collect(),
    ))
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
    let not_found = || {
        ApiErr::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("peer {id} not found"),
        )
    };
    let ns = existing_namespace(&state, &user)
        .await?
        .ok_or_else(not_found)?;
    let store = state.store.clone();
    let nsid = ns.id;
    if !blocking(move || store.delete_peer(nsid, id)).await?? {
        return Err(not_found());
    }
    state.hub.remove_peer(id);
    Ok(Json(serde_json::json!({ "deleted": id })))
}
