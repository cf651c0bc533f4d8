//! Which ranks of a gang share a host, derived from the rendezvous alone: two ranks share a host
//! when their collective addresses (`GangSettings::peers`) name the same host. No setting is
//! needed; a host reachable under two names (127.0.0.1 for one rank, a LAN address for another)
//! counts as two hosts, which is correct, only slower (those ranks talk over TCP).

use std::net::SocketAddr;

/// The gang's ranks grouped by host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The ranks on each host, ascending; hosts ordered by their lowest rank, which leads them.
    pub hosts: Vec<Vec<usize>>,
    /// Each rank's host, by rank.
    pub host_of: Vec<usize>,
}

/// The host part of a `name:port` address.
fn host_part(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _port)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A canonical key for an address's host: the IP's canonical text for an `ip:port` address (two
/// spellings of one IPv6 address agree), the lowercased name otherwise.
fn host_key(address: &str) -> String {
    match address.parse::<SocketAddr>() {
        Ok(socket) => socket.ip().to_string(),
        Err(_) => host_part(address).to_ascii_lowercase(),
    }
}

impl Topology {
    /// Groups ranks by the host of their address in `peers` (indexed by rank).
    pub fn from_peers(peers: &[String]) -> Self {
        let mut keys: Vec<String> = Vec::new();
        let mut hosts: Vec<Vec<usize>> = Vec::new();
        let mut host_of = Vec::with_capacity(peers.len());
        for (rank, address) in peers.iter().enumerate() {
            let key = host_key(address);
            let host = match keys.iter().position(|known| *known == key) {
                Some(host) => host,
                None => {
                    keys.push(key);
                    hosts.push(Vec::new());
                    hosts.len() - 1
                }
            };
            hosts[host].push(rank);
            host_of.push(host);
        }
        Self { hosts, host_of }
    }

    /// Whether no two ranks share a host (nothing to gain from shared memory).
    pub fn all_apart(&self) -> bool {
        self.hosts.iter().all(|ranks| ranks.len() == 1)
    }

    /// `rank`'s index among the ranks of its host (0 for the host's leader).
    pub fn local_rank(&self, rank: usize) -> usize {
        self.hosts[self.host_of[rank]].iter().position(|&member| member == rank).expect("rank on its host")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(addresses: &[&str]) -> Vec<String> {
        addresses.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn ranks_group_by_the_host_of_their_address() {
        let topology = Topology::from_peers(&peers(&["127.0.0.2:9000", "127.0.0.1:9001", "127.0.0.2:9002", "127.0.0.1:9003"]));
        assert_eq!(topology.hosts, vec![vec![0, 2], vec![1, 3]]);
        assert_eq!(topology.host_of, vec![0, 1, 0, 1]);
        assert_eq!((topology.local_rank(2), topology.local_rank(1)), (1, 0));
        assert!(!topology.all_apart());
    }

    #[test]
    fn names_and_ipv6_addresses_compare_by_host() {
        let topology = Topology::from_peers(&peers(&["[::1]:1", "[0:0::1]:2", "Node-A:3", "node-a:4", "node-b:5"]));
        assert_eq!(topology.hosts, vec![vec![0, 1], vec![2, 3], vec![4]]);
        // The same machine under two addresses counts as two hosts (TCP between them).
        assert!(Topology::from_peers(&peers(&["127.0.0.1:1", "10.0.0.5:2"])).all_apart());
    }
}
