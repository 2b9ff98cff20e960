//! The `vqx` binary, run as a user runs it, and what it printed.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `vqx args…` to completion.
pub fn vqx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vqx"))
        .args(args)
        .output()
        .expect("run vqx")
}

/// What vqx printed on stdout (UTF-8, or the test fails).
pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("vqx's stdout is UTF-8")
}

/// What vqx printed on stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails unless vqx succeeded; returns (stdout, stderr).
pub fn ok(o: &Output) -> (String, String) {
    let err = stderr(o);
    assert!(
        o.status.success(),
        "exit {:?}; stderr: {err}",
        o.status.code()
    );
    (stdout(o), err)
}

/// Fails unless vqx exited with 1 and printed one `error: ...` message containing every needle;
/// returns that message.
pub fn expect_error(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit status; stderr: {err}");
    assert!(err.starts_with("error: "), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    err
}

/// A path as a command-line argument.
pub fn arg(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}
