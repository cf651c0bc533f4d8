//! A corpus of bad sweep files (`tests/bad-sweeps/*.toml`): each is refused by `coordinator
//! submit` with the error its first line (`# expect: …`) names, and nothing is submitted.

use cohort_cluster_tests::{repo_root, Cluster};

#[test]
fn every_bad_sweep_is_refused_with_its_error_and_nothing_is_submitted() {
    let cluster = Cluster::start();
    let folder = repo_root().join("tests/bad-sweeps");
    let mut files: Vec<_> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 10, "the corpus is in place: {files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks its # expect line", file.display()));
        let output = cluster.client(&["submit", &file.to_string_lossy()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{} was accepted", file.display());
        assert!(stderr.contains(expected), "{}: expected {expected:?} in:\n{stderr}", file.display());
        assert!(output.stdout.is_empty(), "{}: printed a sweep id", file.display());
    }
    let status = cluster.client_ok(&["status", "--format", "json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&status).unwrap(), serde_json::json!([]));
}
