//! The API client: bearer token, retries with backoff on connect errors, and errors mapped from the server's
//! JSON error body.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{self, ErrorBody};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the fcdev server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{}", .error.message)]
    Api {
        status: StatusCode,
        error: api::ApiError,
    },
    #[error("the server at {url} answered with something that is not fcdev's API ({reason})")]
    BadResponse { url: String, reason: String },
}

impl ClientError {
    pub fn hint(&self) -> Option<String> {
        match self {
            ClientError::Unreachable { .. } => Some(
                "is `fcdev server` running there? Check the URL with `fcdev login --server URL`, or run `fcdev up --local` for a local server".into(),
            ),
            ClientError::Api { error, .. } => error.hint.clone(),
            ClientError::BadResponse { .. } => {
                Some("check the server URL in your profile (`fcdev login --server URL`)".into())
            }
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: &str, token: Option<String>) -> ApiClient {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("fcdev/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}{}", self.base, api::API_PREFIX, path)
    }

    /// Send a request; connect errors are retried 3 times with backoff (the server may be restarting).
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&(dyn erased::Body + Sync)>,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(path);
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            let mut req = self.http.request(method.clone(), &url);
            if let Some(token) = &self.token {
                req = req.bearer_auth(token);
            }
            if let Some(body) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_json());
            }
            match req.send().await {
                Ok(resp) => {
                    self.note_version(&resp);
                    return Ok(resp);
                }
                Err(e) if e.is_connect() && attempt < 3 => {
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => {
                    return Err(ClientError::Unreachable {
                        url: self.base.clone(),
                        reason: root_cause(&e),
                    })
                }
            }
        }
    }

    /// Says once per process when the server runs another minor version than this client.
    fn note_version(&self, resp: &reqwest::Response) {
        let Some(server) = resp
            .headers()
            .get(api::VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
        else {
            return;
        };
        if let Some(warning) = skew_warning(env!("CARGO_PKG_VERSION"), server, &self.base) {
            if !VERSION_NOTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                eprintln!("{warning}");
            }
        }
    }

    async fn decode<T: DeserializeOwned>(&self, resp: reqwest::Response) -> Result<T, ClientError> {
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(&e),
        })?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse {
                url: self.base.clone(),
                reason: e.to_string(),
            })
        } else {
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => Err(ClientError::Api {
                    status,
                    error: body.error,
                }),
                Err(_) => Err(ClientError::BadResponse {
                    url: self.base.clone(),
                    reason: format!("HTTP {status}"),
                }),
            }
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.send(Method::GET, path, None).await?;
        self.decode(resp).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self.send(Method::DELETE, path, None).await?;
        self.decode(resp).await
    }

    pub async fn post<B: Serialize + Sync, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let resp = self.send(Method::POST, path, Some(body)).await?;
        self.decode(resp).await
    }

    pub async fn put<B: Serialize + Sync, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let resp = self.send(Method::PUT, path, Some(body)).await?;
        self.decode(resp).await
    }

    /// GET a byte stream (a console log), calling `on_chunk` with each piece as it arrives until the server
    /// ends it or `on_chunk` returns false. An error status is decoded like any other answer.
    pub async fn stream_bytes<F>(&self, path: &str, mut on_chunk: F) -> Result<(), ClientError>
    where
        F: FnMut(&[u8]) -> bool,
    {
        use futures::StreamExt;
        let resp = self.send(Method::GET, path, None).await?;
        if !resp.status().is_success() {
            return self.decode::<serde_json::Value>(resp).await.map(|_| ());
        }
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            })?;
            if !on_chunk(&chunk) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// POST `body` and follow an NDJSON answer, calling `on_line` with each line until it returns false or the
    /// server closes the stream (`fcdev exec`).
    pub async fn post_lines<B, F>(
        &self,
        path: &str,
        body: &B,
        mut on_line: F,
    ) -> Result<(), ClientError>
    where
        B: Serialize + Sync,
        F: FnMut(&str) -> bool,
    {
        let resp = self.send(Method::POST, path, Some(body)).await?;
        self.frames(resp, b"\n", |raw| {
            let line = String::from_utf8_lossy(raw);
            line.trim().is_empty() || on_line(line.trim())
        })
        .await
    }

    /// Read a streamed answer frame by frame (frames end with `sep`), calling `on_frame` with each until it
    /// returns false or the server closes the stream. Bytes, not text: a multi-byte character may be split
    /// across chunks. An error status is decoded into its error.
    async fn frames<F>(
        &self,
        resp: reqwest::Response,
        sep: &[u8],
        mut on_frame: F,
    ) -> Result<(), ClientError>
    where
        F: FnMut(&[u8]) -> bool,
    {
        use futures::StreamExt;
        if !resp.status().is_success() {
            return self.decode::<serde_json::Value>(resp).await.map(|_| ());
        }
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            })?;
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.windows(sep.len()).position(|w| w == sep) {
                let raw: Vec<u8> = buf.drain(..end + sep.len()).collect();
                if !on_frame(&raw) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Follow a server-sent-events stream, calling `on_event` with each `data:` payload until it returns false or
    /// the server closes the stream.
    pub async fn follow_events<F>(&self, path: &str, mut on_event: F) -> Result<(), ClientError>
    where
        F: FnMut(&str) -> bool,
    {
        let resp = self.send(Method::GET, path, None).await?;
        // Frames end at a blank line.
        self.frames(resp, b"\n\n", |raw| {
            let frame = String::from_utf8_lossy(raw);
            let data: Vec<&str> = frame
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect();
            data.is_empty() || on_event(&data.join("\n"))
        })
        .await
    }
}

/// Set once the version skew was reported (or is reported elsewhere, as by `fcdev doctor`).
static VERSION_NOTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keep the version-skew warning for this process to oneself (a command that reports it its own way).
pub fn quiet_version_warning() {
    VERSION_NOTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The warning for a server of another major or minor version, if it is one.
pub fn skew_warning(ours: &str, server: &str, url: &str) -> Option<String> {
    (api::minor_version(ours) != api::minor_version(server)).then(|| {
        format!(
            "warning: this fcdev is {ours} and the server at {url} runs {server}: another version of the API may \
             differ; install fcdev {server} here (`fcdev doctor` checks the setup)"
        )
    })
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Object-safe JSON bodies, so `send` can take any serializable body.
mod erased {
    pub trait Body {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Body for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn skew_is_another_minor_or_major_version() {
        assert!(super::skew_warning("0.1.0", "0.1.7", "u").is_none());
        let w = super::skew_warning("0.1.0", "0.2.0", "http://h:7070").unwrap();
        assert!(w.contains("0.2.0") && w.contains("http://h:7070"), "{w}");
        assert!(super::skew_warning("1.1.0", "0.1.0", "u").is_some());
    }
}
