//! The probe port serves the gRPC health protocol (grpc.health.v1) without credentials, as
//! Kubernetes' gRPC probes (deploy/k8s) expect, while every other RPC needs a token.

use cohort_cluster_tests::Cluster;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test]
async fn the_coordinator_port_serves_health_without_a_token() {
    let cluster = Cluster::start();
    let channel = tonic::transport::Endpoint::from_shared(cluster.url()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "cohort.v1.ClientService", "cohort.v1.WorkerService"] {
        let response = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "{service:?}");
    }
}

/// SIGTERM (a pod being stopped): the coordinator stops accepting, finishes in-flight requests,
/// folds its write-ahead log into the database file and exits cleanly.
#[test]
fn the_coordinator_drains_and_flushes_on_sigterm() {
    let mut cluster = Cluster::start();
    assert_eq!(cluster.client_ok(&["status", "--format", "json"]).trim(), "[]");
    cluster.signal("coordinator", "TERM");
    let coordinator = cluster.processes.iter_mut().find(|p| p.label == "coordinator").unwrap();
    let status = coordinator.child.wait().unwrap();
    assert!(status.success(), "clean exit: {status}");
    let wal = cluster.dir.path().join("coordinator/state.db-wal");
    let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_bytes, 0, "the write-ahead log was folded into the database");
    let log = std::fs::read_to_string(&coordinator.log).unwrap();
    assert!(log.contains("database flushed"), "{log}");
}
