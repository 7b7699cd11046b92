//! OCI and containers/image vocabulary: image references and the rules they follow.

pub mod reference;
