//! What the engine reports while it works, for whoever listens: the daemon turns it into
//! D-Bus signals, the command line into a progress bar. The engine depends on this and
//! never on the D-Bus layer.

/// One step of a copy (an image copied into the store) or of a fetch.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The bundle's name.
    pub bundle: String,
    /// The image just copied.
    pub image: String,
    /// Bytes copied so far.
    pub done: u64,
    /// Bytes to copy in all.
    pub total: u64,
    /// Images copied and to copy, where known (not carried by the D-Bus signal).
    pub images: Option<(usize, usize)>,
    /// A fetch from registries, not a copy: `bundle` is then `set NAME` and `image` says
    /// how the fetch goes ("fetching, about 3 min left").
    pub fetching: bool,
}

/// Where the engine sends its [`Progress`].
pub type ProgressSender = tokio::sync::mpsc::UnboundedSender<Progress>;
