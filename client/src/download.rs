//! Downloads that continue from the offset reached after the stream breaks, checked against
//! the file's SHA-256.

use std::{path::Path, sync::Arc};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::{Client, error::Error, pb, upload::hex};

/// Progress reports of a download: `(bytes received, total)`.
pub type DownloadProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A finished download.
#[derive(Debug, Clone)]
pub struct DownloadOutcome {
    /// The file's metadata.
    pub file: pb::FileInfo,
    /// How many times the stream was continued (with `offset`) after breaking.
    pub resumptions: u32,
}

impl Client {
    /// Streams the file's content into `writer`, from the start, continuing from the offset
    /// reached when the stream breaks or the service restarts; the bytes written are checked
    /// against the file's SHA-256 ([`Error::ChecksumMismatch`] otherwise).
    ///
    /// ```no_run
    /// # async fn example(client: svcmsg_client::Client) -> Result<(), svcmsg_client::Error> {
    /// let mut bytes = Vec::new();
    /// let outcome = client.download("FILE_ID", &mut bytes, None).await?;
    /// assert_eq!(bytes.len() as i64, outcome.file.size_bytes);
    /// # Ok(()) }
    /// ```
    pub async fn download(
        &self,
        file_id: &str,
        writer: &mut (impl AsyncWrite + Unpin + ?Sized),
        progress: Option<DownloadProgress>,
    ) -> Result<DownloadOutcome, Error> {
        let file = self.file(file_id).await?;
        let size = file.size_bytes.max(0) as u64;
        let report = |position| {
            if let Some(progress) = &progress {
                progress(position, size);
            }
        };
        let reconnect = self.reconnect_policy().clone();
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        let mut resumptions = 0;
        let mut failures = 0;
        report(0);
        loop {
            let before = offset;
            match self
                .download_from(file_id, offset, writer, &mut hasher, &report)
                .await
            {
                Ok(end) => {
                    offset = end;
                    if offset >= size {
                        break;
                    }
                    // The stream ended early without an error: continue like after a break.
                }
                Err((end, error)) => {
                    offset = end;
                    let transient = error
                        .status()
                        .is_some_and(|status| status.is_transport_failure());
                    if !transient {
                        return Err(error);
                    }
                    if offset > before {
                        failures = 0;
                    }
                    failures += 1;
                    if reconnect.gives_up_after(failures) {
                        return Err(error);
                    }
                    tokio::time::sleep(reconnect.backoff(failures)).await;
                }
            }
            resumptions += 1;
        }
        writer
            .flush()
            .await
            .map_err(|e| Error::io("cannot write the download", e))?;
        let actual = hex(&hasher.finalize());
        if !actual.eq_ignore_ascii_case(&file.sha256) {
            return Err(Error::ChecksumMismatch {
                expected: file.sha256.clone(),
                actual,
            });
        }
        Ok(DownloadOutcome { file, resumptions })
    }

    /// Downloads the file to `path`, through `<path>.part` (renamed once complete and checked,
    /// removed on failure), so `path` never holds a partial file.
    pub async fn download_to_path(
        &self,
        file_id: &str,
        path: impl AsRef<Path>,
        progress: Option<DownloadProgress>,
    ) -> Result<DownloadOutcome, Error> {
        let path = path.as_ref();
        let mut partial = path.as_os_str().to_owned();
        partial.push(".part");
        let partial = std::path::PathBuf::from(partial);
        let file = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| Error::io(format!("cannot create {}", partial.display()), e))?;
        let mut writer = tokio::io::BufWriter::new(file);
        let outcome = self.download(file_id, &mut writer, progress).await;
        if outcome.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
            return outcome;
        }
        tokio::fs::rename(&partial, path)
            .await
            .map_err(|e| Error::io(format!("cannot rename to {}", path.display()), e))?;
        outcome
    }

    /// One DownloadFile stream from `offset`; returns the offset reached (with the error, if
    /// the stream failed).
    async fn download_from(
        &self,
        file_id: &str,
        offset: u64,
        writer: &mut (impl AsyncWrite + Unpin + ?Sized),
        hasher: &mut Sha256,
        report: &impl Fn(u64),
    ) -> Result<u64, (u64, Error)> {
        let mut position = offset;
        let request = self
            .request(pb::DownloadFileRequest {
                file_id: file_id.to_owned(),
                offset: offset as i64,
            })
            .map_err(|error| (position, error))?;
        let mut stream = self
            .files
            .clone()
            .download_file(request)
            .await
            .map_err(|status| (position, Error::from(status)))?
            .into_inner();
        while let Some(message) = stream.next().await {
            let chunk = message
                .map_err(|status| (position, Error::from(status)))?
                .chunk;
            writer
                .write_all(&chunk)
                .await
                .map_err(|e| (position, Error::io("cannot write the download", e)))?;
            hasher.update(&chunk);
            position += chunk.len() as u64;
            report(position);
        }
        Ok(position)
    }
}
