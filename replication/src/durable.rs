//! Synchronous durable file replacement for files the control thread owns (the Raft log when it
//! is rewritten, manifest snapshots): write a temporary, fsync it, rename it into place, fsync the
//! directory. A crash leaves either the old file or the new one, plus at most a stale temporary.

use std::fs;
use std::fs::File;
use std::io;
use std::path::Path;
use std::path::PathBuf;

/// Suffix of temporaries; anything ending in it is garbage after a crash.
pub(crate) const TEMPORARY_SUFFIX: &str = shale_io::publish::TEMPORARY_SUFFIX;

/// Durably replaces (or creates) `dir/name` with `bytes` and returns its path: shale-io's
/// one durable publish, in its blocking form.
pub(crate) fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let target = dir.join(name);
    shale_io::publish::replace_blocking(&target, bytes)?;
    Ok(target)
}

/// Makes the directory's entries (creations, renames, removals) durable.
pub(crate) fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes temporaries left in `dir` by a crash; returns how many were removed.
pub(crate) fn remove_temporaries(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(TEMPORARY_SUFFIX)
        {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_directory(dir)?;
    }
    Ok(removed)
}
