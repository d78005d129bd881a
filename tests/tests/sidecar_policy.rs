//! `trustline-sidecar policy check|explain` on the shipped example policies (the commands in docs/policy.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/policies")
}

fn sidecar(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(trustline_tests::bin("trustline-sidecar"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_documented_examples_check_and_explain_as_docs_say() {
    let dir = examples();
    let d = dir.to_str().unwrap();
    let (code, out, err) = sidecar(&["policy", "check", d]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 policies valid"), "{out}");

    let explain = |from: &str, method: &str, path: &str, headers: &[&str]| {
        let mut args = vec![
            "policy", "explain", "--dir", d, "--from", from, "--method", method, "--path", path,
        ];
        for h in headers {
            args.push("--header");
            args.push(h);
        }
        sidecar(&args)
    };
    let (code, out, _) = explain(
        "spiffe://example.org/frontend",
        "POST",
        "/payments/42",
        &["x-env=prod"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ALLOW: ALLOW policy \"payments-from-frontend\" rule #0 matched"),
        "{out}"
    );
    let (code, out, _) = explain("spiffe://example.org/frontend", "POST", "/payments/42", &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("default deny"), "{out}");
    let (code, out, _) = explain("spiffe://example.org/batch", "GET", "/healthz", &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rule #1 matched"), "{out}");
    let (code, out, _) = explain(
        "spiffe://example.org/frontend",
        "GET",
        "/admin/users",
        &["x-env=prod"],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("DENY policy \"no-admin\" rule #0 matched"), "{out}");
    let (code, out, _) = explain(
        "spiffe://example.org/frontend",
        "POST",
        "/payments/42/refund",
        &["x-env=prod"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("AUDIT: marked by policy \"audit-refunds\" rule #0"),
        "{out}"
    );
}

#[test]
fn an_invalid_file_is_refused_with_file_line_column_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(examples()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        tmp.path().join("40-typo.yaml"),
        "name: typo\naction: ALLOW\nrules:\n  - from:\n      - source:\n          principal: [\"spiffe://example.org/x\"]\n",
    )
    .unwrap();
    let (code, _, err) = sidecar(&["policy", "check", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("Error: ") && err.contains("40-typo.yaml:6:11:") && err.contains("principal"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one readable line: {err}");
}
