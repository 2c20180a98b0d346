//! Artefact intake: a box's `ArtifactChunk`s become files under the artefact store and rows in
//! the database. Every chunk is checked against a hostile box: the build must run on this box
//! under the chunk's lease; the path and build id must be safe file names; the file's size may
//! not change between chunks; the build's artefacts stay within the count and byte caps; a
//! chunk may neither pass the file's size nor leave a hole. A refused chunk is dropped (and
//! acked, so the box does not send it forever) with a warning and a box violation metric.

use hive_proto::v1::ArtifactChunk;

use crate::artifacts::{check_build_id, check_path, MAX_FILES};
use crate::state::Hive;
use crate::store::{now_ms, ArtifactTarget};

/// Stores one chunk; `Err` says why it was refused.
pub async fn store_chunk(hive: &Hive, box_id: &str, c: &ArtifactChunk) -> Result<(), String> {
    check_build_id(&c.build_id).map_err(|e| e.to_string())?;
    check_path(&c.path).map_err(|e| e.to_string())?;
    let store = &hive.store;
    let err = |e: crate::store::StoreError| e.to_string();
    if store
        .artifact_target(&c.build_id, box_id, &c.lease_id)
        .await
        .map_err(err)?
        != ArtifactTarget::Ok
    {
        return Err(format!(
            "build {} does not run on box {box_id} under lease {:?}",
            c.build_id, c.lease_id
        ));
    }
    let cap = hive.artifacts.cap_bytes;
    if c.size > cap {
        return Err(format!(
            "{}: {} bytes is over the cap of {cap} bytes per build",
            c.path, c.size
        ));
    }
    let mut new = false;
    let row = match store.artifact(&c.build_id, &c.path).await.map_err(err)? {
        Some(row) => row,
        None => {
            if c.offset != 0 {
                return Err(format!(
                    "{}: a first piece at offset {} (a hole)",
                    c.path, c.offset
                ));
            }
            new = true;
            let (n, bytes) = store.artifact_totals(&c.build_id).await.map_err(err)?;
            if n >= MAX_FILES {
                return Err(format!(
                    "{}: the build has {MAX_FILES} artifacts already",
                    c.path
                ));
            }
            if bytes.saturating_add(c.size) > cap {
                return Err(format!(
                    "{}: {} more bytes would pass the cap of {cap} bytes per build",
                    c.path, c.size
                ));
            }
            store
                .insert_artifact(&c.build_id, &c.path, c.size, now_ms())
                .await
                .map_err(err)?;
            match store.artifact(&c.build_id, &c.path).await.map_err(err)? {
                Some(row) => row,
                None => return Err(format!("{}: row vanished", c.path)),
            }
        }
    };
    if row.size != c.size {
        return Err(format!(
            "{}: the size changed from {} to {} bytes",
            c.path, row.size, c.size
        ));
    }
    let (files, c2) = (hive.artifacts.clone(), c.clone());
    let stored = tokio::task::spawn_blocking(move || {
        let n = files.write(&c2.build_id, &c2.path, c2.size, c2.offset, &c2.data)?;
        let hash = if n == c2.size {
            Some(files.sha256(&c2.build_id, &c2.path)?)
        } else {
            None
        };
        Ok::<_, crate::artifacts::ArtifactError>((n, hash))
    })
    .await
    .map_err(|e| format!("artifact write task: {e}"))?;
    let stored = match stored {
        Ok(s) => s,
        Err(e) => {
            if new {
                // Nothing of it was written: no row for it either.
                store
                    .delete_artifact(&c.build_id, &c.path)
                    .await
                    .map_err(err)?;
            }
            return Err(hive_sys::error_chain(&e));
        }
    };
    if stored.0 > row.stored_bytes || (stored.1.is_some() && !row.complete) {
        store
            .set_artifact_stored(&c.build_id, &c.path, stored.0, stored.1.as_deref())
            .await
            .map_err(err)?;
    }
    Ok(())
}
