//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod cluster;
pub mod daemon;
pub mod fixture;
pub mod loopdev;
pub mod netns;
pub mod node;
pub mod notify;
pub mod proxy;
pub mod rawtar;
pub mod registry;
pub mod usermgr;
pub mod vm;
