//! Many hosts behind one control plane, through the real binary on loopback: `fcdev server host add/list/revoke`
//! on both stores, `fcdev server --role control` on PostgreSQL, and agents (`--role agent`) that register,
//! heartbeat, are refused (wrong or revoked token, a name another live agent holds) and go `lost` when killed.

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::process::Command;

use common::{fcdev_bin, json};

/// `fcdev server host …` with these store arguments (`--data-dir D` or `--database URL`).
fn host_cmd(at: &[&str], args: &[&str]) -> std::process::Output {
    Command::new(fcdev_bin())
        .args(["server", "host"])
        .args(args)
        .args(at)
        .env_remove("FCDEV_DATABASE")
        .env_remove("FCDEV_DATA_DIR")
        .output()
        .expect("run fcdev server host")
}

fn add_host(at: &[&str], name: &str) -> String {
    let out = host_cmd(at, &["add", name, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out.stdout);
    assert_eq!(v["name"], name);
    v["token"].as_str().expect("a token").to_string()
}

fn hosts(at: &[&str]) -> serde_json::Value {
    let out = host_cmd(at, &["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&out.stdout)
}

fn host<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in {list}"))
}

/// add, list, a second add of the name, revoke, revoke again, revoke of an unknown host.
fn host_admin_commands_work(at: &[&str]) {
    let token = add_host(at, "h1");
    assert!(token.starts_with("fch_") && token.len() == 68, "{token}");
    let token2 = add_host(at, "h2");
    assert_ne!(token, token2);
    let list = hosts(at);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert_eq!(host(&list, "h1")["state"], "new");
    assert_eq!(host(&list, "h1")["capacity"], serde_json::Value::Null);
    // Only the hash is stored: the token is nowhere in what list shows.
    assert!(!list.to_string().contains(&token[4..]), "{list}");

    let again = host_cmd(at, &["add", "h1"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let bad = host_cmd(at, &["add", "Bad_Name"]);
    assert!(!bad.status.success());

    let out = host_cmd(at, &["revoke", "h1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(host(&hosts(at), "h1")["state"], "revoked");
    assert_eq!(host(&hosts(at), "h2")["state"], "new");
    assert!(
        host_cmd(at, &["revoke", "h1"]).status.success(),
        "twice is fine"
    );
    let unknown = host_cmd(at, &["revoke", "nope"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no host `nope`"));
}

#[test]
fn host_add_list_revoke_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let at = ["--data-dir", d.to_str().unwrap()];
    host_admin_commands_work(&at);
    assert!(d.join("state.db").exists());
}

#[test]
fn host_add_list_revoke_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    let url = pg::shared().database();
    let at = ["--data-dir", d.to_str().unwrap(), "--database", &url];
    host_admin_commands_work(&at);
    assert!(!d.join("state.db").exists(), "nothing went to SQLite");
}
