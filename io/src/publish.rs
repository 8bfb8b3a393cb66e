//! Durable file publication: write bytes to a temporary name with direct I/O, fdatasync,
//! rename into place, fsync the directory, and report the blake3 of exactly what was written.
//!
//! A reader never sees a partial file under the final name, and once `publish` returns the file
//! and its directory entry survive a power cut.

use std::path::{Path, PathBuf};

use glommio::io::{Directory, DmaFile};

/// Bytes per direct-I/O write; the whole file is streamed through buffers of this size.
const CHUNK_BYTES: usize = 1 << 20;

/// A file that is durably in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedFile {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub blake3: [u8; 32],
}

impl PublishedFile {
    pub fn blake3_hex(&self) -> String {
        blake3::Hash::from(self.blake3).to_hex().to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("create directory {path}: {source}")]
    CreateDirectory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("sync {path}: {source}")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rename {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; published files are immutable")]
    Exists { path: PathBuf },
    #[error("{path} has no parent directory or file name")]
    BadPath { path: PathBuf },
}

/// Publishes `bytes` at `path`. Missing parent directories are created and each new directory
/// entry is made durable in its parent. Fails if `path` already exists. Not cancellation-safe:
/// dropping the future may leave a temporary file, which [`remove_stale_temporaries`] cleans.
pub async fn publish(path: &Path, bytes: &[u8]) -> Result<PublishedFile, PublishError> {
    write_durable(path, bytes, false).await
}

/// Like [`publish`], but atomically replaces an existing file: readers see the old bytes or
/// the new ones, never a mix. For small state files (markers), not for data files.
pub async fn replace(path: &Path, bytes: &[u8]) -> Result<PublishedFile, PublishError> {
    write_durable(path, bytes, true).await
}

async fn write_durable(
    path: &Path,
    bytes: &[u8],
    overwrite: bool,
) -> Result<PublishedFile, PublishError> {
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => (parent, name.to_string_lossy().into_owned()),
        _ => {
            return Err(PublishError::BadPath {
                path: path.to_path_buf(),
            })
        }
    };
    create_dir_durable(parent).await?;
    if !overwrite && path.exists() {
        return Err(PublishError::Exists {
            path: path.to_path_buf(),
        });
    }
    let temporary = parent.join(format!(".{name}{TEMPORARY_SUFFIX}"));
    let io_error = |source: glommio::GlommioError<()>| std::io::Error::from(source);
    let write_error = |source| PublishError::Write {
        path: temporary.clone(),
        source,
    };

    let file = DmaFile::create(&temporary)
        .await
        .map_err(|e| write_error(io_error(e)))?;
    let mut offset = 0usize;
    while offset < bytes.len() {
        let chunk = &bytes[offset..(offset + CHUNK_BYTES).min(bytes.len())];
        let aligned = file.align_up(chunk.len() as u64) as usize;
        let mut buffer = file.alloc_dma_buffer(aligned);
        buffer.as_bytes_mut()[..chunk.len()].copy_from_slice(chunk);
        buffer.as_bytes_mut()[chunk.len()..].fill(0);
        let written = file
            .write_at(buffer, offset as u64)
            .await
            .map_err(|e| write_error(io_error(e)))?;
        assert!(written >= chunk.len(), "short direct write");
        offset += chunk.len();
    }
    // The last chunk was padded to the device alignment; cut the file back to its true size.
    file.truncate(bytes.len() as u64)
        .await
        .map_err(|e| write_error(io_error(e)))?;
    file.fdatasync().await.map_err(|e| PublishError::Sync {
        path: temporary.clone(),
        source: io_error(e),
    })?;
    file.close().await.map_err(|e| write_error(io_error(e)))?;

    glommio::io::rename(&temporary, path)
        .await
        .map_err(|e| PublishError::Rename {
            from: temporary.clone(),
            to: path.to_path_buf(),
            source: io_error(e),
        })?;
    sync_directory(parent).await?;

    Ok(PublishedFile {
        path: path.to_path_buf(),
        size_bytes: bytes.len() as u64,
        blake3: *blake3::hash(bytes).as_bytes(),
    })
}

/// Durably creates or replaces `path` with `bytes` using blocking I/O, for small state files
/// written off the shards (identity, Raft snapshots, log rewrites): the same temporary name,
/// fsync, rename and directory fsync as [`replace`], so a crash leaves the old file or the new
/// one and at most a temporary that [`remove_stale_temporaries`] cleans.
pub fn replace_blocking(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => (parent, name.to_string_lossy().into_owned()),
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} has no parent directory or file name", path.display()),
            ))
        }
    };
    let temporary = parent.join(format!(".{name}{TEMPORARY_SUFFIX}"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    std::fs::File::open(parent)?.sync_all()
}

/// Suffix of temporary files written by [`publish`]; they never hold committed data.
pub const TEMPORARY_SUFFIX: &str = ".tmp";

/// Creates `path` and any missing ancestors, fsyncing each parent whose entries changed.
pub async fn create_dir_durable(path: &Path) -> Result<(), PublishError> {
    if path.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut cursor = Some(path);
    while let Some(dir) = cursor {
        if dir.is_dir() {
            break;
        }
        missing.push(dir.to_path_buf());
        cursor = dir.parent();
    }
    for dir in missing.iter().rev() {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(PublishError::CreateDirectory {
                    path: dir.clone(),
                    source,
                })
            }
        }
        if let Some(parent) = dir.parent() {
            sync_directory(parent).await?;
        }
    }
    Ok(())
}

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
pub async fn sync_directory(path: &Path) -> Result<(), PublishError> {
    let sync_error = |source: glommio::GlommioError<()>| PublishError::Sync {
        path: path.to_path_buf(),
        source: std::io::Error::from(source),
    };
    let directory = Directory::open(path).await.map_err(sync_error)?;
    directory.sync().await.map_err(sync_error)?;
    directory.close().await.map_err(sync_error)?;
    Ok(())
}

/// Removes temporaries left by publications that a crash interrupted, below `root`.
/// Returns how many were removed.
pub fn remove_stale_temporaries(root: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let file_type = entry.file_type()?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if name.starts_with('.') && name.ends_with(TEMPORARY_SUFFIX) {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// blake3 of a file's contents, read with ordinary buffered I/O (for verification off the hot path).
pub fn hash_file(path: &Path) -> std::io::Result<([u8; 32], u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path)?;
    let size = std::io::copy(&mut file, &mut hasher)?;
    Ok((*hasher.finalize().as_bytes(), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: std::future::Future<Output = ()> + 'static>(future: F) {
        crate::runtime::raise_memlock_limit();
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(1 << 20)
            .make()
            .unwrap()
            .run(future);
    }

    // Checks that a published file has exactly the bytes given (sizes that are and are not
    // multiples of the device alignment, and larger than one chunk), that the reported blake3
    // matches the file on disk, and that no temporary is left behind.
    #[test]
    fn publish_writes_exact_bytes_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        run(async move {
            for (index, size) in [0usize, 1, 4095, 4096, 4097, CHUNK_BYTES * 2 + 17]
                .into_iter()
                .enumerate()
            {
                let bytes: Vec<u8> = (0..size).map(|i| (i * 31 + index) as u8).collect();
                let path = root.join(format!("a/b/{index}.bin"));
                let published = publish(&path, &bytes).await.unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), bytes);
                assert_eq!(published.size_bytes, size as u64);
                let (hash, on_disk) = hash_file(&path).unwrap();
                assert_eq!(hash, published.blake3);
                assert_eq!(on_disk, size as u64);
            }
            assert_eq!(remove_stale_temporaries(&root).unwrap(), 0);
        });
    }

    // Checks that publishing over an existing file is refused: files are immutable.
    #[test]
    fn publish_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        run(async move {
            publish(&path, b"one").await.unwrap();
            let error = publish(&path, b"two").await.unwrap_err();
            assert!(matches!(error, PublishError::Exists { .. }), "{error}");
            assert_eq!(std::fs::read(&path).unwrap(), b"one");
        });
    }

    // Checks that replace swaps the contents of an existing file and creates a missing one.
    #[test]
    fn replace_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("marker");
        run(async move {
            replace(&path, b"1").await.unwrap();
            replace(&path, b"22").await.unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"22");
        });
    }

    // Checks that temporaries from an interrupted publication are found and removed.
    #[test]
    fn stale_temporaries_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("d/e")).unwrap();
        std::fs::write(dir.path().join("d/e/.f.parquet.tmp"), b"partial").unwrap();
        std::fs::write(dir.path().join("d/e/f.parquet"), b"kept").unwrap();
        assert_eq!(remove_stale_temporaries(dir.path()).unwrap(), 1);
        assert!(dir.path().join("d/e/f.parquet").exists());
    }
}
