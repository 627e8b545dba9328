//! `fcdev up`: ensure the namespace, create (or resume/repair) the cluster, follow it until every VM is ready.

use crate::api;
use crate::cli::output::{print_json, vm_table};
use crate::cli::{progress, CliError, Context};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The image to build the cluster from (default: the profile's image, `tiny`).
    #[arg(long)]
    pub image: Option<String>,
    /// The cluster's name (default: the profile's cluster, `dev`).
    #[arg(long)]
    pub name: Option<String>,
    /// Run everything on this machine: start (or reuse) a local `fcdev server --dev`, log in, build the default
    /// image if missing, then bring the cluster up.
    #[arg(long)]
    #[cfg_attr(not(feature = "server"), arg(hide = true))]
    pub local: bool,
    /// With --local: the port of the local server's API.
    #[arg(long, default_value_t = crate::api::DEV_API_PORT, requires = "local")]
    #[cfg_attr(not(feature = "server"), arg(hide = true))]
    pub local_port: u16,
    /// Return once the server accepted the request, without waiting for the VMs.
    #[arg(long)]
    pub no_wait: bool,
    /// Print the cluster as JSON (no progress bars).
    #[arg(long)]
    pub json: bool,
}

/// `--local`: a local server (the full build only).
#[cfg(feature = "server")]
async fn local(ctx: Context, args: &UpArgs) -> Result<Context, CliError> {
    crate::cli::server::local::ensure(ctx, args.local_port, !args.json).await
}

#[cfg(not(feature = "server"))]
async fn local(_ctx: Context, _args: &UpArgs) -> Result<Context, CliError> {
    Err(crate::cli::host_only::refuse("up --local"))
}

pub async fn run(args: UpArgs, ctx: Context) -> Result<(), CliError> {
    let ctx = if args.local {
        local(ctx, &args).await?
    } else {
        ctx
    };
    let (profile, client) = ctx.client()?;
    let name = args.name.unwrap_or(profile.cluster);
    let image = args.image.unwrap_or(profile.image);
    let ns: api::Namespace = client.put("/namespace", &serde_json::json!({})).await?;
    let req = api::CreateCluster {
        name: name.clone(),
        image,
        ssh_keys: match crate::cli::ssh::ensure_key(&ctx) {
            Some(key) => vec![key],
            None => {
                if !args.json {
                    eprintln!("warning: no ssh-keygen here (Debian: openssh-client): `fcdev ssh` will not work");
                }
                Vec::new()
            }
        },
    };
    let cluster: api::Cluster = client.post("/clusters", &req).await?;
    let cluster = if cluster.state == api::ClusterState::Ready {
        if !args.json {
            println!("Cluster `{name}` in namespace `{}` is already up.", ns.name);
        }
        cluster
    } else if args.no_wait {
        if !args.json {
            println!(
                "Cluster `{name}` is {}; follow it with `fcdev status`.",
                cluster.state.as_str()
            );
        }
        cluster
    } else {
        use std::io::IsTerminal;
        let quiet = args.json || !std::io::stderr().is_terminal();
        progress::follow(&client, &cluster, quiet).await?
    };
    if args.json {
        print_json(&cluster);
    } else {
        print!("\n{}", vm_table(&cluster));
    }
    if args.no_wait {
        return Ok(());
    }
    progress::ensure_ready(&cluster)?;
    if !args.json {
        let first = cluster.vms.first().map(|v| v.name.as_str()).unwrap_or("n1");
        println!("\nNamespace {} ({}). Next:", ns.name, ns.subnet);
        let steps = [
            (
                "fcdev tunnel".to_string(),
                "reach the VMs from here (TUN with root, else a SOCKS5 proxy)".to_string(),
            ),
            (
                format!("fcdev tunnel -L 8080:{first}:80"),
                "or forward one port: curl http://127.0.0.1:8080".to_string(),
            ),
            (
                format!("fcdev ssh {first}"),
                "a shell in the VM".to_string(),
            ),
        ];
        let width = steps.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
        for (command, what) in steps {
            println!("  {command:<width$}  # {what}");
        }
    }
    Ok(())
}
