//! `fcdev images`: the prepared images of the server.

use crate::api;
use crate::cli::output::{print_json, table};
use crate::cli::{CliError, Context};

#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ImagesArgs, ctx: Context) -> Result<(), CliError> {
    let (_, client) = ctx.client()?;
    let images: Vec<api::ImageInfo> = client.get("/images").await?;
    if args.json {
        print_json(&images);
        return Ok(());
    }
    if images.is_empty() {
        println!("The server has no images yet (operator: `fcdev image build tiny`).");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.vms
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                if i.has_snapshot { "yes" } else { "no" }.to_string(),
                i.description.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["IMAGE", "VMS", "SNAPSHOT", "DESCRIPTION"], &rows)
    );
    Ok(())
}
