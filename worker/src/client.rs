//! How the worker talks to the coordinator's worker service: the client type, shared by the
//! daemon and the code that fetches a task's inputs (the blob cache, a command trial's files).

use cohort_proto::auth::BearerToken;
use cohort_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client of the coordinator's worker service, sending the worker's token.
pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, BearerToken>>;
