//! The pipeline document on disk: one file, the only copy of the state. Every change is
//! appended as an incremental save and synced to disk before it counts; now and then the
//! whole document is written to a new file that replaces the old one. Loading reads the file
//! back into one document: changes are applied in their causal order whatever order they
//! were appended in, so a restart cannot replay them wrongly.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use automerge::AutoCommit;

/// Why the file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DocFileError {
    #[error("failed to read or write {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a pipeline document")]
    Corrupt {
        path: String,
        #[source]
        source: Box<automerge::AutomergeError>,
    },
}

/// The document's file.
pub struct DocFile {
    path: PathBuf,
}

impl DocFile {
    pub fn new(path: &Path) -> DocFile {
        DocFile {
            path: path.to_path_buf(),
        }
    }

    fn io(&self, source: std::io::Error) -> DocFileError {
        DocFileError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// The document as stored; an empty one when there is no file yet.
    pub fn load(&self) -> Result<AutoCommit, DocFileError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AutoCommit::new()),
            Err(e) => return Err(self.io(e)),
        };
        AutoCommit::load(&bytes).map_err(|source| DocFileError::Corrupt {
            path: self.path.display().to_string(),
            source: Box::new(source),
        })
    }

    /// Appends what changed in `doc` since the last save; returns the bytes written.
    pub fn append(&self, doc: &mut AutoCommit) -> Result<usize, DocFileError> {
        let chunk = doc.save_incremental();
        if chunk.is_empty() {
            return Ok(0);
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        f.write_all(&chunk).map_err(|e| self.io(e))?;
        f.sync_data().map_err(|e| self.io(e))?;
        Ok(chunk.len())
    }

    /// Rewrites the file as the whole document (smaller than the appended history).
    pub fn compact(&self, doc: &mut AutoCommit) -> Result<u64, DocFileError> {
        let bytes = doc.save();
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(|e| self.io(e))?;
        f.write_all(&bytes).map_err(|e| self.io(e))?;
        f.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        Ok(bytes.len() as u64)
    }
}
