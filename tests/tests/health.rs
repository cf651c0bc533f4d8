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
