//! Pulling from registries as CRI-O would (issue: pre-loading from slow registries).
//!
//! So far: [`conf`], which of a node's registries and mirrors a reference is pulled from,
//! read from `registries.conf` and its drop-ins the way containers/image reads them; and
//! [`auth`], the credentials for a repository from the node's pull secret and auth files.
//! [`client`] fetches blobs into the cache, resuming at the byte.

pub mod auth;
pub mod client;
pub mod conf;
pub mod policy;
pub mod tls;
