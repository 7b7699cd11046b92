//! longshore brings container images onto CRI-O nodes without a registry.
//!
//! A bundle (an OCI image layout with a `bundle.json` that commits to it) is read from a
//! directory, a tar stream or removable media, verified digest by digest, and copied into
//! the node's containers-storage with `skopeo copy`. The modules below each own one part
//! of that path; `cli` ties them to the `longshore` command.

pub mod api;
pub mod bundle;
pub mod cache;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod crio;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod events;
pub mod fetch;
pub mod install;
pub mod media;
pub mod oci;
pub mod paths;
pub mod process;
pub mod progress;
pub mod registry;
pub mod release;
pub mod report;
pub mod sets;
pub mod share;
pub mod state;
pub mod store;
pub mod systemd;
pub mod untrusted;
