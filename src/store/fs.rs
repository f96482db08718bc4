//! The filesystem blob store: file bodies and thumbnails under `storage.data_dir`, for the
//! zero-setup default (one replica, no S3).

use std::{
    io,
    path::{Path, PathBuf},
};

use async_trait::async_trait;

use crate::{error::BoxError, health::DependencyCheck};

#[derive(Debug, Clone)]
pub struct FsBlobStore {
    root: PathBuf,
}

impl FsBlobStore {
    /// Opens (creating if needed) the store rooted at `root`.
    pub async fn open(root: &Path) -> io::Result<Self> {
        tokio::fs::create_dir_all(root).await?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[async_trait]
impl DependencyCheck for FsBlobStore {
    fn name(&self) -> &'static str {
        "blob-store"
    }

    /// The store is up when its root is a writable directory (recreated if it went missing).
    async fn check(&self) -> Result<(), BoxError> {
        tokio::fs::create_dir_all(&self.root).await?;
        let probe = self.root.join(".health-probe");
        tokio::fs::write(&probe, b"ok").await?;
        tokio::fs::remove_file(&probe).await?;
        Ok(())
    }
}
