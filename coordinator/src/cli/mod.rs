//! The user's commands: thin clients of `cohort.v1.ClientService`.

pub mod follow;
pub mod generate;
pub mod hash_cache;
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
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {} (--coordinator or COHORT_COORDINATOR)", options.url))?;
    Ok(ClientServiceClient::with_interceptor(channel, token).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
}

/// A call the coordinator refused or could not answer, as a client command reports it: the
/// status's message, with its code kept for the hint at the binary's edge.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    /// The gRPC code.
    pub code: tonic::Code,
    /// What the coordinator said (or the code's description when it said nothing).
    pub message: String,
}

impl RpcError {
    /// True when the coordinator refused the credentials (none, wrong, or a worker's token).
    pub fn is_credentials(&self) -> bool {
        matches!(self.code, tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
    }
}

/// Converts a refused call into the command's error.
pub fn rpc_error(status: tonic::Status) -> anyhow::Error {
    let message = if status.message().is_empty() { status.code().description().to_string() } else { status.message().to_string() };
    anyhow::Error::new(RpcError { code: status.code(), message })
}

/// The hint a refused credential gets at the binary's edge, if the error is one.
pub fn credentials_hint(error: &anyhow::Error) -> Option<&'static str> {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<RpcError>())
        .any(RpcError::is_credentials)
        .then_some("hint: client commands need the client token: give its file with --token-file or COHORT_TOKEN_FILE")
}

/// Prints rows as columns padded to their widest cell; `right` marks the columns aligned right
/// (numbers). The last column is not padded.
pub fn print_columns(header: &[&str], rows: &[Vec<String>], right: &[bool]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(index, cell)| match (right.get(index).copied().unwrap_or(false), index == last) {
                (true, _) => format!("{cell:>width$}", width = widths[index]),
                (false, true) => cell.to_string(),
                (false, false) => format!("{cell:<width$}", width = widths[index]),
            })
            .collect();
        println!("{}", padded.join("  "));
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Prints rows as CSV with a header, quoting every cell that needs it.
pub fn print_csv_rows(header: &[&str], rows: &[Vec<String>]) {
    let quote = |cell: &str| {
        if cell.contains([',', '"', '\n']) {
            format!("\"{}\"", cell.replace('"', "\"\""))
        } else {
            cell.to_string()
        }
    };
    println!("{}", header.join(","));
    for row in rows {
        println!("{}", row.iter().map(|cell| quote(cell)).collect::<Vec<_>>().join(","));
    }
}

/// Output format of commands that print data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Table,
    /// JSON for programs.
    Json,
    /// CSV: `results` one row per (trial, epoch, metric); `status`, `workers`, `checkpoints`
    /// one row per line of their table.
    Csv,
}
