//! vu-bench runs a workload against a real backend and prints JSON.

use std::process::Command;

#[test]
fn prints_json_for_an_fs_workload_against_virtiofsd() {
    if tests::require_program("virtiofsd", "cargo install virtiofsd --locked").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vu-bench"))
        .args([
            "fs-lookup-getattr",
            "--backend",
            "virtiofsd",
            "--seconds",
            "0.3",
            "--dirs",
            "3",
            "--files",
            "10",
            "--rounds",
            "2",
        ])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vu-bench failed:\n{stderr}");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stderr}"));
    assert_eq!(v["workload"], "fs-lookup-getattr");
    let r = &v["results"][0];
    assert_eq!(r["name"], "virtiofsd");
    assert!(r["requests"].as_u64().unwrap() > 10, "{r}");
    assert!(r["requests_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["p50_us"].as_f64().unwrap() > 0.0);
    assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap());
    assert_eq!(v["rounds"].as_array().unwrap().len(), 2);
    assert_eq!(v["ratios"][0]["requests_per_s"], 1.0);
}

#[test]
fn unknown_backend_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_vu-bench"))
        .args([
            "fs-lookup-getattr",
            "--backend",
            "nonsense",
            "--seconds",
            "0.1",
        ])
        .arg("--dir")
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("neither a preset"), "{err}");
}
