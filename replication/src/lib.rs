//! shale-replication
