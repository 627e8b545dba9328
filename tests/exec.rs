//! `fcdev exec VM -- CMD`: a command run in a real VM through the server and the guest agent, with no tunnel;
//! its output streams as it comes and its exit code is fcdev's. Needs root, /dev/net/tun and qemu: a missing
//! piece fails the test, it never skips. Every packet stays inside namespaces this test creates.

mod lab;
mod netns;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lab::*;

#[test]
fn exec_streams_output_as_it_comes_and_returns_the_exit_code() {
    let lab = TinyLab::start("xhost", "xalice", "192.168.83");
    let alice = lab.alice();
    alice.ok(&["up", "--json"]);

    // A command printing a line a second: the first line arrives long before the command ends.
    let t0 = Instant::now();
    let mut child = alice
        .fcdev(&[
            "exec",
            "n1",
            "--",
            "for i in 1 2 3; do echo tick$i; sleep 1; done; exit 7",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fcdev exec");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 6];
    stdout.read_exact(&mut first).expect("the first line");
    let first_at = t0.elapsed();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("the rest");
    let status = child.wait().expect("exec exits");
    let all_at = t0.elapsed();
    assert_eq!(&first, b"tick1\n");
    assert_eq!(rest, "tick2\ntick3\n");
    assert_eq!(
        status.code(),
        Some(7),
        "fcdev exec exits with the command's code"
    );
    assert!(
        all_at - first_at >= Duration::from_millis(1500),
        "output streamed: first line at {first_at:?}, end at {all_at:?}"
    );

    // Several arguments are words, quoted for the guest's shell; success is exit 0.
    let out = alice.ok(&["exec", "f1", "--", "printf", "%s|", "it's", "two words"]);
    assert_eq!(out, "it's|two words|");

    // An unknown VM: a clear error naming the VMs there are, exit 4 (not found).
    let bad = alice
        .fcdev(&["exec", "zz9", "--", "true"])
        .output()
        .expect("fcdev exec");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(4), "{err}");
    assert!(err.contains("n1, f1, m1"), "{err}");
    alice.ok(&["down", "--yes"]);
}
