//! Follow a cluster's progress events with one indicatif spinner per VM, until it is ready or failed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api;
use crate::cli::{CliError, ExitKind};
use crate::client::ApiClient;

/// Follow `/clusters/{name}/events?after=SEQ` and return the cluster's final view. `quiet` hides the bars.
pub async fn follow(
    client: &ApiClient,
    start: &api::Cluster,
    quiet: bool,
) -> Result<api::Cluster, CliError> {
    let multi = MultiProgress::new();
    if quiet {
        multi.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{spinner:.cyan} {prefix:<4} {wide_msg} {elapsed:>4}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let header = multi.add(ProgressBar::new_spinner());
    header.set_style(style.clone());
    header.set_prefix(start.name.clone());
    header.set_message(start.state.as_str().to_string());
    header.enable_steady_tick(Duration::from_millis(100));
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    for vm in &start.vms {
        let bar = multi.add(ProgressBar::new_spinner());
        bar.set_style(style.clone());
        bar.set_prefix(vm.name.clone());
        bar.set_message(
            vm.detail
                .clone()
                .unwrap_or_else(|| vm.state.as_str().to_string()),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bars.insert(vm.name.clone(), bar);
    }
    let started = Instant::now();
    let mut finished = false;
    // The stream may drop (server restart): reconnect and read on from the last event seen.
    let mut after = start.event_seq;
    let deadline = Instant::now() + Duration::from_secs(30 * 60);
    for _attempt in 0..30 {
        if Instant::now() > deadline {
            break;
        }
        let p = format!("/clusters/{}/events?after={after}", start.name);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let followed = client.follow_events(&p, |data| {
            let Ok(ev) = serde_json::from_str::<api::ClusterEvent>(data) else {
                return true;
            };
            after = ev.seq;
            match &ev.vm {
                Some(vm) => {
                    if let Some(bar) = bars.get(vm) {
                        if ev.state == "ready" || ev.state == "failed" {
                            bar.finish_with_message(ev.message.clone());
                        } else {
                            bar.set_message(ev.message.clone());
                        }
                    }
                    true
                }
                None => {
                    header.set_message(ev.message.clone());
                    let end = api::ClusterState::ends_stream(&ev.state);
                    finished |= end;
                    !end
                }
            }
        });
        // The stream stays open (keep-alives) while the server works: bound the whole wait.
        let result = match tokio::time::timeout(remaining, followed).await {
            Ok(result) => result,
            Err(_) => break,
        };
        if finished {
            // An ending event may be a late one of an earlier request (a control plane records its agents'
            // reports after the fact): the cluster's own state says whether this one is over.
            let now: api::Cluster = client.get(&format!("/clusters/{}", start.name)).await?;
            if !now.state.is_transient() {
                break;
            }
            finished = false;
            continue;
        }
        match result {
            Ok(()) => {}
            Err(crate::client::ClientError::Unreachable { .. }) => {
                header.set_message("server unreachable, retrying".to_string());
            }
            Err(e) => {
                header.abandon();
                return Err(e.into());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for bar in bars.values() {
        if !bar.is_finished() {
            bar.finish();
        }
    }
    header.finish_with_message(format!("done in {:.1}s", started.elapsed().as_secs_f64()));
    let cluster: api::Cluster = client.get(&format!("/clusters/{}", start.name)).await?;
    if !finished && cluster.state.is_transient() {
        return Err(CliError::new(
            ExitKind::OperationFailed,
            format!(
                "lost track of cluster `{}` (still {})",
                cluster.name,
                cluster.state.as_str()
            ),
        )
        .hint("`fcdev status` shows where it is; `fcdev up` follows it again"));
    }
    Ok(cluster)
}

/// Turn a failed cluster into an error that says why and what to do.
pub fn ensure_ready(cluster: &api::Cluster) -> Result<(), CliError> {
    ensure_state(cluster, api::ClusterState::Ready)
}

/// Turn a cluster that did not end in `want` into an error that says why and what to do.
pub fn ensure_state(cluster: &api::Cluster, want: api::ClusterState) -> Result<(), CliError> {
    if cluster.state == want {
        return Ok(());
    }
    let reason = cluster
        .reason
        .clone()
        .unwrap_or_else(|| format!("the cluster is {}", cluster.state.as_str()));
    Err(CliError::new(
        ExitKind::OperationFailed,
        format!(
            "cluster `{}` is {}: {reason}",
            cluster.name,
            cluster.state.as_str()
        ),
    )
    .hint("run `fcdev up` again to retry; `fcdev down` removes the cluster"))
}

/// A spinner with the elapsed time on stderr while `work` runs (a request the server answers when done, e.g. a
/// snapshot save); hidden when `quiet`. Shown only once the work took more than a second.
pub async fn spin<T>(message: &str, quiet: bool, work: impl std::future::Future<Output = T>) -> T {
    let bar = ProgressBar::new_spinner();
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{spinner:.cyan} {wide_msg} {elapsed:>4}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_message(message.to_string());
    tokio::pin!(work);
    let out = tokio::select! {
        out = &mut work => out,
        _ = tokio::time::sleep(Duration::from_secs(1)) => {
            bar.enable_steady_tick(Duration::from_millis(100));
            work.await
        }
    };
    bar.finish_and_clear();
    out
}
