//! How a client carries its API token on `hive.v1.ControlPlane` calls: the metadata entry
//! `authorization: Bearer <token>`, added to every request by the [`Bearer`] interceptor.
//!
//! ```ignore
//! let channel = Endpoint::from_static("http://127.0.0.1:50051").connect().await?;
//! let mut api = ControlPlaneClient::with_interceptor(channel, Bearer::new(&token)?);
//! ```

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key the token travels in.
pub const METADATA_KEY: &str = "authorization";

/// Adds `authorization: Bearer <token>` to every request (nothing when it holds no token, so
/// the server's UNAUTHENTICATED answer says what to do).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

// Never print the token.
impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(***)"
        } else {
            "Bearer(none)"
        })
    }
}

/// A token that cannot travel in a header.
#[derive(Debug, thiserror::Error)]
#[error(
    "the API token holds characters a header cannot carry (expected printable ASCII, e.g. hvt_...)"
)]
pub struct BadToken;

impl Bearer {
    /// Carries `token` (surrounding whitespace, e.g. a file's newline, is dropped); an empty
    /// token is no token.
    pub fn new(token: &str) -> Result<Self, BadToken> {
        let token = token.trim();
        if token.is_empty() {
            return Ok(Self(None));
        }
        let mut value: MetadataValue<Ascii> =
            format!("Bearer {token}").parse().map_err(|_| BadToken)?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// Carries no token.
    pub fn none() -> Self {
        Self(None)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert(METADATA_KEY, v.clone());
        }
        Ok(request)
    }
}
