//! Security end to end: every RPC needs a bearer token, a worker token cannot submit, tokens
//! never reach the logs, and the whole cluster runs over TLS with certificates made here.

use std::process::Command;

use cohort_cluster_tests::{binary, mnist_sample, temp_dir, Cluster};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

fn sweep() -> String {
    format!(
        "name = \"secure\"\n[dataset]\nformat = \"idx\"\npath = \"{}\"\ntrain_limit = 300\n[model]\nkind = \"dae\"\n[cv]\nfolds = 2\nepochs = 1\nbatch_size = 32\n",
        mnist_sample()
    )
}

#[test]
fn tokens_are_required_and_roles_enforced() {
    let mut cluster = Cluster::start();
    let path = cluster.dir.path().join("sweep.toml");
    std::fs::write(&path, sweep()).unwrap();
    let path = path.to_string_lossy().into_owned();

    // No token at all.
    let output = Command::new(binary("coordinator")).args(["--coordinator", &cluster.url(), "status"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing bearer token"), "{}", String::from_utf8_lossy(&output.stderr));
    // A wrong token.
    let wrong = cluster.dir.path().join("wrong.token");
    std::fs::write(&wrong, "guessed\n").unwrap();
    let output = cluster.client_with_token(&wrong, &["submit", &path]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("invalid bearer token"), "{}", String::from_utf8_lossy(&output.stderr));
    // The worker token opens the worker service only.
    let output = cluster.client_with_token(&cluster.worker_token(), &["submit", &path]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("a worker token cannot use the client service"));
    // Nothing was submitted by any of them.
    assert_eq!(cluster.client_ok(&["status", "--format", "json"]).trim(), "[]");

    // With the right tokens the sweep runs, and no token shows up in any log.
    cluster.add_worker("w0");
    let sweep_id = cluster.client_ok(&["submit", &path]).trim().to_string();
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "120"]).trim(), "succeeded");
    for process in &cluster.processes {
        let log = std::fs::read_to_string(&process.log).unwrap();
        assert!(!log.contains("client-token-for-tests") && !log.contains("worker-token-for-tests"), "{} logs a token", process.label);
    }
}

/// A CA and a certificate for "localhost" signed by it, written as ca.pem, server.pem, server.key.
fn write_certificates(dir: &std::path::Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "cohort test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&server_key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
}

#[test]
fn the_cluster_runs_over_tls() {
    let dir = temp_dir();
    write_certificates(dir.path());
    let cert = dir.path().join("server.pem").to_string_lossy().into_owned();
    let key = dir.path().join("server.key").to_string_lossy().into_owned();
    let mut cluster = Cluster::start_in(dir, &["--tls-cert", &cert, "--tls-key", &key]);
    assert!(cluster.url().starts_with("https://"));
    cluster.add_worker("w0");
    let sweep_id = cluster.submit("sweep.toml", &sweep());
    assert_eq!(cluster.client_ok(&["wait", &sweep_id, "--timeout", "120"]).trim(), "succeeded");

    // Plain text to the TLS port does not get through.
    let plain = format!("http://127.0.0.1:{}", cluster.address.port());
    let output = Command::new(binary("coordinator"))
        .args(["--coordinator", &plain, "--token-file", &cluster.client_token().to_string_lossy(), "status"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "plain text was served");
}
