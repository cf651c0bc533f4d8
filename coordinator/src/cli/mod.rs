//! The user's commands: thin clients of `cohort.v1.ClientService`.

pub mod local;
pub mod results;
pub mod submit;
pub mod watch;

use std::time::Duration;

use anyhow::Context;
use cohort_proto::v1::client_service_client::ClientServiceClient;
use tonic::transport::{Channel, Endpoint};

/// Connects to the coordinator at `url`.
pub async fn connect(url: &str) -> anyhow::Result<ClientServiceClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid coordinator url {url:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))?;
    Ok(ClientServiceClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
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
