//! `fcdev exec VM -- CMD…`: run a command in a VM through the server and the VM's guest agent (no tunnel), its
//! output streamed as it comes; exits with the command's exit code.

use std::io::Write;

use base64::Engine;

use crate::api;
use crate::cli::{CliError, Context, ExitKind};

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The cluster (default: the profile's cluster).
    #[arg(long)]
    pub name: Option<String>,
    /// The VM (`n1`, `f1`, …).
    pub vm: String,
    /// The command and its arguments (after `--`); run by `sh -c` in the VM, so one quoted argument may be a
    /// whole shell line.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// One argument as the guest's shell reads it back: quoted unless it is plain.
fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// The shell line for `sh -c`: a single argument is a shell line of its own; several are quoted words.
pub fn command_line(args: &[String]) -> String {
    match args {
        [one] => one.clone(),
        many => many
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

pub async fn run(args: ExecArgs, ctx: Context) -> Result<(), CliError> {
    let (profile, client) = ctx.client()?;
    let name = args.name.unwrap_or(profile.cluster);
    let req = api::ExecRequest {
        command: command_line(&args.command),
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut stdout = std::io::stdout();
    let mut result: Option<Result<i32, String>> = None;
    let mut bad = None;
    client
        .post_lines(
            &format!("/clusters/{name}/vms/{}/exec", args.vm),
            &req,
            |line| match serde_json::from_str::<api::ExecLine>(line) {
                Ok(api::ExecLine::Out { out }) => {
                    if let Ok(bytes) = b64.decode(out) {
                        let _ = stdout.write_all(&bytes);
                        let _ = stdout.flush();
                    }
                    true
                }
                Ok(api::ExecLine::Exit { exit }) => {
                    result = Some(Ok(exit));
                    false
                }
                Ok(api::ExecLine::Error { error }) => {
                    result = Some(Err(error));
                    false
                }
                Err(e) => {
                    bad = Some(e.to_string());
                    false
                }
            },
        )
        .await?;
    match (result, bad) {
        (Some(Ok(0)), _) => Ok(()),
        (Some(Ok(code)), _) => std::process::exit(code.clamp(1, 255)),
        (Some(Err(error)), _) => Err(CliError::new(
            ExitKind::OperationFailed,
            format!("exec in {}: {error}", args.vm),
        )
        .hint("`fcdev status` shows whether the VM runs; `fcdev logs` its console")),
        (None, Some(e)) => Err(CliError::new(
            ExitKind::Failure,
            format!("exec: bad answer from the server: {e}"),
        )),
        (None, None) => Err(CliError::new(
            ExitKind::Failure,
            "exec: the server ended the stream before the command's exit code",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_argument_is_a_shell_line_and_several_are_quoted_words() {
        assert_eq!(
            command_line(&["echo $HOME | wc -c".into()]),
            "echo $HOME | wc -c"
        );
        assert_eq!(
            command_line(&["printf".into(), "%s\\n".into(), "it's here".into()]),
            "printf '%s\\n' 'it'\\''s here'"
        );
    }
}
