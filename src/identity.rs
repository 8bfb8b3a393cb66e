//! The node's identity on disk: `_system/identity` holds `{node_id, cluster_id}` from the first
//! start, so a data directory can never be started as another node or joined to another
//! cluster by a configuration mistake.
//!
//! A standalone node records no cluster id; its directory can become the first node of a
//! cluster (`cluster.bootstrap = true`) without re-ingesting, and from then on it belongs to that
//! cluster. Thread: used once at start-up, before any other thread touches the directory.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// Name of the identity file inside `_system`.
pub const IDENTITY_FILE: &str = "identity";

/// Format version of the identity file.
const IDENTITY_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub version: u32,
    pub node_id: u64,
    /// None for a node that has only ever run standalone.
    pub cluster_id: Option<String>,
}

/// Reads the identity (writing it on the first start) and checks it against the configuration.
/// `has_data` says whether the directory already holds a manifest (an older node without an
/// identity file, or a standalone node becoming a cluster's first node).
pub fn load_or_create(
    system_dir: &Path,
    config: &Config,
    has_data: bool,
) -> anyhow::Result<Identity> {
    let path = system_dir.join(IDENTITY_FILE);
    let wanted_cluster = config
        .cluster
        .enabled
        .then(|| config.cluster.cluster_id.clone());
    let stored = match std::fs::read(&path) {
        Ok(bytes) => Some(
            serde_json::from_slice::<Identity>(&bytes)
                .with_context(|| format!("parse {}", path.display()))?,
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(error).with_context(|| format!("read {}", path.display())),
    };
    let identity = match stored {
        Some(stored) => {
            if stored.version != IDENTITY_VERSION {
                bail!(
                    "{} has format version {}; this shale reads version {IDENTITY_VERSION}",
                    path.display(),
                    stored.version
                );
            }
            if stored.node_id != config.node.id {
                bail!(
                    "this data directory belongs to node {} but node.id is {}: a node id is \
                     bound to its data directory",
                    stored.node_id,
                    config.node.id
                );
            }
            match (&stored.cluster_id, &wanted_cluster) {
                (Some(stored_cluster), Some(wanted)) if stored_cluster != wanted => bail!(
                    "this data directory belongs to cluster {stored_cluster:?}, not \
                     {wanted:?} (cluster.cluster_id)"
                ),
                (Some(stored_cluster), None) => bail!(
                    "this data directory belongs to cluster {stored_cluster:?}: set \
                     cluster.enabled = true and its cluster settings"
                ),
                (None, Some(wanted)) => {
                    if !config.cluster.bootstrap && has_data {
                        bail!(
                            "a standalone data directory can only become the first node of a \
                             cluster (cluster.bootstrap = true); to join cluster {wanted:?}, \
                             start this node on an empty data directory"
                        );
                    }
                    Identity {
                        cluster_id: Some(wanted.clone()),
                        ..stored
                    }
                }
                _ => return Ok(stored),
            }
        }
        None => {
            if wanted_cluster.is_some() && !config.cluster.bootstrap && has_data {
                bail!(
                    "{} holds data but no identity: only the first node of a cluster \
                     (cluster.bootstrap = true) may start from an existing data directory",
                    system_dir.display()
                );
            }
            Identity {
                version: IDENTITY_VERSION,
                node_id: config.node.id,
                cluster_id: wanted_cluster,
            }
        }
    };
    let bytes = serde_json::to_vec_pretty(&identity).context("serialise identity")?;
    shale_io::publish::replace_blocking(&path, &bytes)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(node_id: u64, cluster: Option<(&str, bool)>) -> Config {
        let mut config = Config::default();
        config.node.id = node_id;
        if let Some((cluster_id, bootstrap)) = cluster {
            config.cluster.enabled = true;
            config.cluster.cluster_id = cluster_id.to_string();
            config.cluster.bootstrap = bootstrap;
        }
        config
    }

    // Checks the rules that keep a data directory bound to one node and one cluster: the
    // first start records the identity; another node id, another cluster, or a standalone
    // start of a cluster member is refused; a standalone directory becomes a cluster's first
    // node only with bootstrap; the stored sample of format 1 reads.
    #[test]
    fn identity_binds_node_and_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path();
        let first = load_or_create(system, &config(1, None), false).unwrap();
        assert_eq!(first.cluster_id, None);
        assert!(load_or_create(system, &config(2, None), true).is_err());
        // A standalone node with data cannot join another cluster as a non-bootstrap node.
        let error = load_or_create(system, &config(1, Some(("prod", false))), true).unwrap_err();
        assert!(error.to_string().contains("first node"), "{error}");
        let joined = load_or_create(system, &config(1, Some(("prod", true))), true).unwrap();
        assert_eq!(joined.cluster_id.as_deref(), Some("prod"));
        let error = load_or_create(system, &config(1, Some(("test", true))), true).unwrap_err();
        assert!(error.to_string().contains("belongs to cluster"), "{error}");
        assert!(load_or_create(system, &config(1, None), true).is_err());
        let again = load_or_create(system, &config(1, Some(("prod", false))), true).unwrap();
        assert_eq!(again, joined);

        let sample = br#"{"version":1,"node_id":7,"cluster_id":"prod"}"#;
        let stored: Identity = serde_json::from_slice(sample).unwrap();
        assert_eq!(stored.node_id, 7);
        assert_eq!(stored.cluster_id.as_deref(), Some("prod"));
    }
}
