//! `fcdev exec` through a control plane: the laptop's request becomes a session in this process's memory for the
//! cluster's host; that host's agent takes it at its long poll (`GET /v1/agent/execs`), runs the command with
//! its own orchestrator and backend as a single-host server does, and posts the output back piece by piece
//! (`POST /v1/agent/execs/{id}`, numbered), ending with the exit code or an error. The control plane hands each
//! piece to the laptop's stream as it comes, in the single-host format.
//!
//! Sessions are ephemeral and live only here: a control plane restart ends them (the laptop's stream breaks,
//! the agent's next post is answered 410 and it stops the command). The agent only ever calls out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::api;
use crate::server::service::{ExecLine, Service, ServiceError, ServiceResult};
use crate::server::store::HostRow;

/// How long a session waits for its agent to take it (the agent long-polls: normally at once).
pub const PICKUP_WITHIN: Duration = Duration::from_secs(15);
/// How long a taken session may go without a post from its agent (it posts a keepalive every
/// `AGENT_KEEPALIVE` while the command runs silently).
pub const SILENT_AGENT: Duration = Duration::from_secs(20);
/// How often an agent posts an empty piece while the command prints nothing.
pub const AGENT_KEEPALIVE: Duration = Duration::from_secs(5);
/// How often the sessions are checked for the two limits above and for laptops that left.
const CHECK: Duration = Duration::from_millis(250);

struct Session {
    host_id: i64,
    host_name: String,
    job: api::AgentExec,
    tx: mpsc::Sender<ExecLine>,
    taken: bool,
    next_seq: u64,
    /// When it was made, then when its agent last posted.
    heard: Instant,
}

/// The sessions of a control plane, by id.
#[derive(Default)]
pub struct ExecRelay {
    sessions: Mutex<HashMap<String, Session>>,
    /// Wakes the agents' long polls when a session is added.
    added: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn session_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl ExecRelay {
    /// A new session for `host`: the receiver gets the output, then the exit code or an error; dropping it ends
    /// the session (the agent's next post is answered 410 and it stops the command).
    pub fn open(
        self: &Arc<Self>,
        host: &HostRow,
        user: String,
        cluster: String,
        vm: String,
        command: String,
    ) -> mpsc::Receiver<ExecLine> {
        let (tx, rx) = mpsc::channel(64);
        let id = session_id();
        lock(&self.sessions).insert(
            id.clone(),
            Session {
                host_id: host.id,
                host_name: host.name.clone(),
                job: api::AgentExec {
                    id: id.clone(),
                    user,
                    cluster,
                    vm,
                    command,
                },
                tx,
                taken: false,
                next_seq: 0,
                heard: Instant::now(),
            },
        );
        self.added.notify_waiters();
        let this = self.clone();
        tokio::spawn(async move { this.watch(id).await });
        rx
    }

    /// Ends the session when its laptop left, its agent does not take it, or its agent falls silent.
    async fn watch(&self, id: String) {
        loop {
            tokio::time::sleep(CHECK).await;
            let (tx, why) = {
                let mut sessions = lock(&self.sessions);
                let Some(s) = sessions.get(&id) else {
                    return;
                };
                let why = if s.tx.is_closed() {
                    None
                } else if !s.taken && s.heard.elapsed() >= PICKUP_WITHIN {
                    Some(format!(
                        "the agent of host {} did not take the command within {} s",
                        s.host_name,
                        PICKUP_WITHIN.as_secs()
                    ))
                } else if s.taken && s.heard.elapsed() >= SILENT_AGENT {
                    Some(format!(
                        "the agent of host {} stopped answering (nothing for {} s)",
                        s.host_name,
                        SILENT_AGENT.as_secs()
                    ))
                } else {
                    continue;
                };
                let Some(s) = sessions.remove(&id) else {
                    return;
                };
                (s.tx, why)
            };
            if let Some(why) = why {
                let _ = tx.send(ExecLine::Error(why)).await;
            }
            return;
        }
    }

    /// The sessions waiting for this host, each handed out once; waits up to `wait` for one.
    pub async fn take(&self, host_id: i64, wait: Duration) -> Vec<api::AgentExec> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let added = self.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            let taken: Vec<api::AgentExec> = lock(&self.sessions)
                .values_mut()
                .filter(|s| s.host_id == host_id && !s.taken && !s.tx.is_closed())
                .map(|s| {
                    s.taken = true;
                    s.heard = Instant::now();
                    s.job.clone()
                })
                .collect();
            if !taken.is_empty() || tokio::time::Instant::now() >= deadline {
                return taken;
            }
            tokio::select! {
                _ = added => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// A piece of a session's answer from the agent of `host_id`.
    pub async fn post(
        &self,
        host_id: i64,
        id: &str,
        piece: api::AgentExecOutput,
    ) -> ServiceResult<()> {
        let gone = || ServiceError::ExecGone(id.to_string());
        let (tx, line) = {
            let mut sessions = lock(&self.sessions);
            let s = sessions.get_mut(id).ok_or_else(gone)?;
            if s.host_id != host_id || !s.taken {
                return Err(ServiceError::NotYourExec(id.to_string()));
            }
            if s.tx.is_closed() {
                sessions.remove(id);
                return Err(gone());
            }
            s.heard = Instant::now();
            if piece.seq < s.next_seq {
                // A retry of a piece already taken.
                return Ok(());
            }
            if piece.seq > s.next_seq {
                let expected = s.next_seq;
                sessions.remove(id);
                return Err(ServiceError::ExecGone(format!(
                    "{id} (piece {} came before piece {expected})",
                    piece.seq
                )));
            }
            s.next_seq += 1;
            let line = match piece.line {
                api::ExecLine::Out { out } => {
                    use base64::Engine;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(out)
                        .map_err(|_| ServiceError::BadExecOutput)?;
                    if bytes.is_empty() {
                        // A keepalive: the laptop is still there.
                        return Ok(());
                    }
                    ExecLine::Out(bytes)
                }
                api::ExecLine::Exit { exit } => ExecLine::Exit(exit),
                api::ExecLine::Error { error } => ExecLine::Error(error),
            };
            let tx = if matches!(line, ExecLine::Out(_)) {
                s.tx.clone()
            } else {
                // The end: the laptop's stream ends once this is sent.
                sessions.remove(id).map(|s| s.tx).ok_or_else(gone)?
            };
            (tx, line)
        };
        if tx.send(line).await.is_err() {
            lock(&self.sessions).remove(id);
            return Err(gone());
        }
        Ok(())
    }
}

impl Service {
    /// `fcdev exec` on a control plane: the cluster must be on a live host and have the VM; the command runs
    /// there through the host's agent.
    pub(crate) async fn control_exec(
        &self,
        user: crate::server::store::User,
        name: String,
        vm: String,
        command: String,
    ) -> ServiceResult<mpsc::Receiver<ExecLine>> {
        let user_name = user.name.clone();
        let (host, cluster) = self
            .blocking(move |s| {
                let (ns, row) = s.find_cluster(&user, &name)?;
                let host = s.live_host_of(&ns, &row, "no command can run there")?;
                let view = s.stored_view(&ns, &row)?;
                if !view.vms.iter().any(|v| v.name == vm) {
                    return Err(ServiceError::NoSuchVm {
                        known: view
                            .vms
                            .iter()
                            .map(|v| v.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        vm,
                        cluster: name,
                    });
                }
                Ok((host, (row.name, vm)))
            })
            .await?;
        Ok(self
            .exec_relay()
            .open(&host, user_name, cluster.0, cluster.1, command))
    }

    /// `GET /v1/agent/execs`: the exec sessions waiting for this host (a long poll).
    pub async fn agent_execs(&self, host: HostRow, wait_secs: u64) -> api::AgentExecs {
        let wait = Duration::from_secs(wait_secs.min(crate::server::control::MAX_WORK_WAIT_SECS));
        api::AgentExecs {
            execs: self.exec_relay().take(host.id, wait).await,
        }
    }

    /// `POST /v1/agent/execs/{id}`: a piece of a session's answer.
    pub async fn agent_exec_output(
        &self,
        host: HostRow,
        id: String,
        piece: api::AgentExecOutput,
    ) -> ServiceResult<()> {
        self.exec_relay().post(host.id, &id, piece).await
    }
}
