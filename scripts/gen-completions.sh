#!/usr/bin/env bash
# Regenerate the committed shell completions from the CLI definition (a test fails when they are stale).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
bin=target/debug/fcdev
$bin completions bash > completions/fcdev.bash
$bin completions zsh > completions/_fcdev
$bin completions fish > completions/fcdev.fish
$bin completions elvish > completions/fcdev.elv
$bin completions powershell > completions/_fcdev.ps1
echo "completions/ regenerated"
