//! `fcdev ssh-config [--remove] [--file PATH]`: ssh config entries for every VM of my clusters, inside a marked
//! block of ~/.ssh/config, so `ssh n1.<namespace>.fcdev`, scp, rsync and VS Code Remote-SSH work with no other
//! step. The ProxyCommand is `fcdev ssh --stdio` (it uses the running tunnel or starts a shared background one)
//! and the host keys come from the server (`fcdev known-hosts` as KnownHostsCommand), so a reset never warns and
//! a wrong key is refused. Lines outside the block are never touched; the file before a change is kept as
//! `<file>.fcdev.bak`.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::api;
use crate::cli::{ssh, CliError, Context, ExitKind};

#[derive(Debug, clap::Args)]
pub struct SshConfigArgs {
    /// The ssh config file (default: ~/.ssh/config).
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Remove the block instead.
    #[arg(long)]
    pub remove: bool,
    /// Print the block instead of writing it.
    #[arg(long, conflicts_with = "remove")]
    pub dry_run: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Outcome {
    file: String,
    hosts: Vec<String>,
    changed: bool,
    removed: bool,
}

fn begin_marker(profile: &str) -> String {
    format!("# >>> fcdev profile {profile}: written by `fcdev ssh-config`, removed by `fcdev ssh-config --remove` >>>")
}

fn end_marker(profile: &str) -> String {
    format!("# <<< fcdev profile {profile} <<<")
}

/// The default file: ~/.ssh/config.
pub fn default_file() -> Result<PathBuf, CliError> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .or_else(|| directories::BaseDirs::new().map(|d| d.home_dir().to_path_buf()))
        .ok_or_else(|| {
            CliError::new(ExitKind::Failure, "no home folder").hint("pass --file PATH")
        })?;
    Ok(home.join(".ssh").join("config"))
}

/// The block for these VM host names.
pub fn render(ctx: &Context, hosts: &[String]) -> Result<String, CliError> {
    let me = ssh::self_command(ctx)?;
    let key = ssh::key_path(ctx);
    let mut b = begin_marker(&ctx.profile_name);
    b.push('\n');
    if hosts.is_empty() {
        b.push_str("# (no VMs yet: run `fcdev up`, then `fcdev ssh-config` again)\n");
    } else {
        b.push_str(&format!("Host {}\n", hosts.join(" ")));
        b.push_str("    User root\n");
        b.push_str(&format!("    IdentityFile \"{}\"\n", key.display()));
        b.push_str("    IdentitiesOnly yes\n");
        b.push_str(&format!("    ProxyCommand {me} ssh --stdio %h --port %p\n"));
        for opt in ssh::host_key_options(&me) {
            if let Some((k, v)) = opt.split_once('=') {
                b.push_str(&format!("    {k} {v}\n"));
            }
        }
    }
    b.push_str(&end_marker(&ctx.profile_name));
    b.push('\n');
    Ok(b)
}

/// `text` with the profile's block replaced by `block` (or removed when None), every other line as it was.
/// Returns None when the block's markers are broken (a begin without an end).
pub fn splice(text: &str, profile: &str, block: Option<&str>) -> Option<String> {
    crate::cli::marked::splice(text, &begin_marker(profile), &end_marker(profile), block)
}

/// The host names of every VM of my clusters.
pub async fn vm_hosts(client: &crate::client::ApiClient) -> Result<Vec<String>, CliError> {
    let clusters: Vec<api::Cluster> = client.get("/clusters").await?;
    Ok(clusters
        .into_iter()
        .flat_map(|c| c.vms)
        .map(|v| v.hostname)
        .collect())
}

/// Whether `file` holds the block as it would be written now (for `fcdev doctor`). None: no block at all.
pub async fn is_current(ctx: &Context, file: &Path) -> Result<Option<bool>, CliError> {
    let (_, client) = ctx.client()?;
    let text = std::fs::read_to_string(file).unwrap_or_default();
    if !text
        .lines()
        .any(|l| l.trim_end() == begin_marker(&ctx.profile_name))
    {
        return Ok(None);
    }
    let block = render(ctx, &vm_hosts(&client).await?)?;
    Ok(Some(
        splice(&text, &ctx.profile_name, Some(&block)).as_deref() == Some(&text),
    ))
}

fn io_error(path: &Path, e: std::io::Error) -> CliError {
    CliError::new(ExitKind::Failure, format!("{}: {e}", path.display()))
}

/// Write `text` to `path` through a temp file and a rename, keeping the old file's mode (new files 0600).
fn replace_file(path: &Path, text: &str) -> Result<(), CliError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o600);
    let tmp = path.with_extension(format!("fcdev-tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| io_error(&tmp, e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(path, e)
    })
}

pub async fn run(args: SshConfigArgs, ctx: Context) -> Result<(), CliError> {
    let file = match &args.file {
        Some(f) => f.clone(),
        None => default_file()?,
    };
    let hosts = if args.remove {
        Vec::new()
    } else {
        let (_, client) = ctx.client()?;
        // The key the VMs trust (made now when missing; `fcdev up` hands it to the VMs).
        if ssh::ensure_key(&ctx).is_none() {
            eprintln!("note: no fcdev ssh key (install openssh-client for ssh-keygen, then run `fcdev up`)");
        }
        vm_hosts(&client).await?
    };
    let block = if args.remove {
        None
    } else {
        Some(render(&ctx, &hosts)?)
    };
    if args.dry_run {
        print!("{}", block.unwrap_or_default());
        return Ok(());
    }
    let old = match std::fs::read_to_string(&file) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error(&file, e)),
    };
    let text = old.clone().unwrap_or_default();
    let new = splice(&text, &ctx.profile_name, block.as_deref()).ok_or_else(|| {
        CliError::new(
            ExitKind::Failure,
            format!(
                "{}: the fcdev block of profile `{}` has a begin marker but no end marker",
                file.display(),
                ctx.profile_name
            ),
        )
        .hint(format!(
            "fix the file by hand (the end marker is `{}`); nothing was changed",
            end_marker(&ctx.profile_name)
        ))
    })?;
    let changed = new != text && !(old.is_none() && args.remove);
    if changed {
        if let Some(dir) = file.parent() {
            if !dir.exists() {
                crate::config::create_private_dir(dir).map_err(|e| io_error(dir, e))?;
            }
        }
        if let Some(old) = &old {
            let backup = PathBuf::from(format!("{}.fcdev.bak", file.display()));
            replace_file(&backup, old)?;
        }
        replace_file(&file, &new)?;
    }
    let outcome = Outcome {
        file: file.display().to_string(),
        hosts: hosts.clone(),
        changed,
        removed: args.remove,
    };
    if args.json {
        crate::cli::output::print_json(&outcome);
        return Ok(());
    }
    match (args.remove, changed) {
        (true, true) => println!("Removed the fcdev block from {}.", file.display()),
        (true, false) => println!("No fcdev block in {}: nothing to remove.", file.display()),
        (false, false) => println!(
            "{} is already current ({} VMs).",
            file.display(),
            hosts.len()
        ),
        (false, true) => {
            println!("Wrote {} VMs to {}:", hosts.len(), file.display());
            for h in &hosts {
                println!("  ssh {h}");
            }
            if old.is_some() {
                println!("(the previous file is {}.fcdev.bak)", file.display());
            }
            println!("No tunnel needed: ssh starts one in the background and it ends when idle. Run this again after `fcdev up` of a new cluster.");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: &str = "# >>> fcdev profile p: written by `fcdev ssh-config`, removed by `fcdev ssh-config --remove` >>>\nHost a\n# <<< fcdev profile p <<<\n";

    #[test]
    fn splice_appends_replaces_and_removes_leaving_other_lines() {
        let mine = "Host work\n    User me\n";
        let added = splice(mine, "p", Some(BLOCK)).unwrap();
        assert_eq!(added, format!("{mine}\n{BLOCK}"));
        let other = added.replace("Host a", "Host b");
        let replaced = splice(&other, "p", Some(BLOCK)).unwrap();
        assert_eq!(replaced, added);
        assert_eq!(
            splice(&added, "p", Some(BLOCK)).unwrap(),
            added,
            "idempotent"
        );
        let removed = splice(&added, "p", None).unwrap();
        assert_eq!(removed, mine);
        let after = format!("{added}Host later\n");
        assert_eq!(
            splice(&after, "p", None).unwrap(),
            format!("{mine}\nHost later\n")
        );
    }

    #[test]
    fn a_block_without_its_end_marker_is_left_alone() {
        let broken = "Host x\n# >>> fcdev profile p: written by `fcdev ssh-config`, removed by `fcdev ssh-config --remove` >>>\nHost a\n";
        assert!(splice(broken, "p", Some(BLOCK)).is_none());
        assert!(splice(broken, "p", None).is_none());
    }

    #[test]
    fn another_profiles_block_is_not_touched() {
        let q = BLOCK.replace("profile p", "profile q");
        let text = format!("Host x\n\n{q}");
        let added = splice(&text, "p", Some(BLOCK)).unwrap();
        assert!(added.starts_with(&text));
        assert_eq!(splice(&added, "p", None).unwrap(), text);
    }
}
