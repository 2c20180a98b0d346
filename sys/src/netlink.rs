//! rtnetlink look-ups every network set-up starts with.

use futures::TryStreamExt;
use rtnetlink::Handle;

/// The index of link `name` in the namespace of `handle`'s socket; `None` if there is none.
pub async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        // The kernel answers a lookup by name of a missing link with ENODEV.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e),
    }
}
