//! Errors of the CLI: what went wrong, what to do next, and the exit code (README.md documents them).

use crate::client::ClientError;
use crate::config::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// 1: anything else.
    Failure,
    /// 2: bad command line or a question that cannot be asked.
    Usage,
    /// 3: not logged in, or the token was refused.
    NotLoggedIn,
    /// 4: the thing named does not exist (cluster, image, VM, peer).
    NotFound,
    /// 5: conflicts with what exists (name taken with another image, …).
    Conflict,
    /// 6: the server cannot be reached.
    Unreachable,
    /// 7: the operation ran and failed (a cluster that did not become ready).
    OperationFailed,
    /// 8: the request was refused as invalid (bad name, bad body).
    Invalid,
}

impl ExitKind {
    pub fn code(self) -> i32 {
        match self {
            ExitKind::Failure => 1,
            ExitKind::Usage => 2,
            ExitKind::NotLoggedIn => 3,
            ExitKind::NotFound => 4,
            ExitKind::Conflict => 5,
            ExitKind::Unreachable => 6,
            ExitKind::OperationFailed => 7,
            ExitKind::Invalid => 8,
        }
    }
}

#[derive(Debug)]
pub struct CliError {
    pub kind: ExitKind,
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    pub fn new(kind: ExitKind, message: impl Into<String>) -> Self {
        CliError {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn print(&self) {
        eprintln!("error: {}", self.message);
        if let Some(hint) = &self.hint {
            eprintln!("hint: {hint}");
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::new(ExitKind::Failure, e.to_string())
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        let hint = e.hint();
        let kind = match &e {
            ClientError::Unreachable { .. } => ExitKind::Unreachable,
            ClientError::BadResponse { .. } => ExitKind::Failure,
            ClientError::Api { status, .. } => match status.as_u16() {
                401 | 403 => ExitKind::NotLoggedIn,
                404 => ExitKind::NotFound,
                409 => ExitKind::Conflict,
                400 | 415 | 422 => ExitKind::Invalid,
                _ => ExitKind::Failure,
            },
        };
        let mut err = CliError::new(kind, e.to_string());
        err.hint = hint;
        err
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<CliError>() {
            Ok(cli) => cli,
            Err(e) => CliError::new(ExitKind::Failure, format!("{e:#}")),
        }
    }
}

impl std::error::Error for CliError {}
