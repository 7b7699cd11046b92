//! One classification of failures. The exit codes of the command line and the named
//! D-Bus errors of the API are both derived from it, so an error means the same thing
//! whichever way it reaches a person.

use crate::bundle::Rejected;
use crate::store::NoSpace;

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input was refused: malformed, lying about itself, or not what was required.
    Rejected,
    /// The work does not fit in the free space.
    NoSpace,
    /// A bundle or set asked for by name is not known.
    NotFound,
    /// The work was abandoned before it finished (the device went away, the daemon is
    /// stopping).
    Abandoned,
    /// Anything else; the message says what.
    Failed,
}

/// A bundle or set asked for by name that is not known.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// Exit code for input that was refused (malformed, lying, or not what was required).
pub const EXIT_REJECTED: u8 = 3;
/// Exit code for an import that does not fit in the free space.
pub const EXIT_NO_SPACE: u8 = 4;

/// The prefix of the API's error names.
pub const DBUS_ERROR_PREFIX: &str = "io.longshore.Longshore1.Error.";

impl ErrorKind {
    /// Every kind, in the order [`ErrorKind::of`] tries them.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::Rejected,
        ErrorKind::Abandoned,
        ErrorKind::NoSpace,
        ErrorKind::NotFound,
        ErrorKind::Failed,
    ];

    /// Classifies an error by the typed causes in its chain.
    pub fn of(e: &anyhow::Error) -> ErrorKind {
        let any = |is: fn(&(dyn std::error::Error + 'static)) -> bool| e.chain().any(is);
        if any(|c| c.is::<Rejected>()) {
            ErrorKind::Rejected
        } else if crate::cancel::is_cancelled(e) {
            ErrorKind::Abandoned
        } else if any(|c| c.is::<NoSpace>()) {
            ErrorKind::NoSpace
        } else if any(|c| c.is::<NotFound>()) {
            ErrorKind::NotFound
        } else {
            ErrorKind::Failed
        }
    }

    /// The command line's exit code (docs/cli.md): 3 refused, 4 no space, 1 otherwise.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Rejected => EXIT_REJECTED,
            ErrorKind::NoSpace => EXIT_NO_SPACE,
            ErrorKind::NotFound | ErrorKind::Abandoned | ErrorKind::Failed => 1,
        }
    }

    /// The last element of its D-Bus error name.
    pub fn dbus_suffix(self) -> &'static str {
        match self {
            ErrorKind::Rejected => "Rejected",
            ErrorKind::NoSpace => "NoSpace",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::Abandoned => "Abandoned",
            ErrorKind::Failed => "Failed",
        }
    }

    /// The kind a D-Bus error name stands for; a name not of the API is `Failed`.
    pub fn from_dbus_name(name: &str) -> ErrorKind {
        let suffix = name.strip_prefix(DBUS_ERROR_PREFIX).unwrap_or("");
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.dbus_suffix() == suffix)
            .unwrap_or(ErrorKind::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_causes_classify_wherever_they_are_in_the_chain() {
        let nf = anyhow::Error::new(NotFound("no set named \"x\"".into())).context("removing");
        assert_eq!(ErrorKind::of(&nf), ErrorKind::NotFound);
        // The words alone do not make it NotFound: only the type does.
        let words = anyhow::anyhow!("no set named \"x\"");
        assert_eq!(ErrorKind::of(&words), ErrorKind::Failed);
        assert_eq!(ErrorKind::of(&nf).exit_code(), 1);
    }

    #[test]
    fn dbus_names_round_trip() {
        for k in ErrorKind::ALL {
            let name = format!("{DBUS_ERROR_PREFIX}{}", k.dbus_suffix());
            assert_eq!(ErrorKind::from_dbus_name(&name), k);
        }
        assert_eq!(
            ErrorKind::from_dbus_name("org.freedesktop.DBus.Error.AccessDenied"),
            ErrorKind::Failed
        );
    }
}
