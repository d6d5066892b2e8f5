//! The worker binary on its own: it speaks only the JSON protocol of `gpt::worker`, and
//! anything else is a one-line error with exit code 2. (This test is also what makes
//! `cargo test --workspace` build the worker that the root package's tests start.)

use assert_cmd::Command;

#[test]
fn the_worker_refuses_anything_but_a_request() {
    let out = Command::cargo_bin("cachemoney-gpt")
        .unwrap()
        .write_stdin("not json\n")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("cachemoney-gpt: ")
            && stderr.contains("(this program is started by `cachemoney run`)"),
        "{stderr}"
    );
}
