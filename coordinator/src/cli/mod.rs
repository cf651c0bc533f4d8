//! The user's commands: thin clients of `cohort.v1.ClientService`.

pub mod local;
pub mod logs;
pub mod report;
pub mod results;
pub mod submit;
pub mod watch;

use anyhow::Context;
use cohort_proto::auth::{BearerToken, ConnectOptions};
use cohort_proto::v1::client_service_client::ClientServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A client of the coordinator's client service, sending the user's token.
pub type Client = ClientServiceClient<InterceptedService<Channel, BearerToken>>;

/// Connects to the coordinator.
pub async fn connect(options: &ConnectOptions) -> anyhow::Result<Client> {
    let endpoint = options.endpoint()?;
    let token = BearerToken::from_file(options.token_file.as_deref())?;
    let channel = endpoint.connect().await.with_context(|| format!("cannot reach the coordinator at {}", options.url))?;
    Ok(ClientServiceClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
}

/// Output format of commands that print data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Table,
    /// JSON for programs.
    Json,
    /// CSV, one row per (trial, epoch, metric) (results only).
    Csv,
}
