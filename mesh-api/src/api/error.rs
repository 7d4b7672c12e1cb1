//! What went wrong, as every API call reports it: a class scripts can
//! branch on (`meshctl` maps it to its exit code) and a message for the
//! operator.

use serde::{Deserialize, Serialize};

/// What went wrong, in a form scripts can branch on (`meshctl` maps it to
/// its exit code) plus a message for the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The class of failure.
    pub kind: ErrorKind,
    /// What was wrong and what to do about it.
    pub message: String,
}

/// Classes of API failure.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input was malformed (exit code 2).
    InvalidArgument,
    /// The named object does not exist (exit code 3).
    NotFound,
    /// The request is valid but the cluster's state forbids it (exit code 4).
    FailedPrecondition,
    /// The caller may not do this (exit code 5).
    PermissionDenied,
    /// This node is autolocked and must be unlocked first (exit code 6).
    Locked,
    /// No leader or manager could be reached; retrying may help (exit code 7).
    Unavailable,
    /// A bug or a local I/O failure (exit code 1).
    Internal,
}

impl ApiError {
    /// Builds an error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    /// Malformed input.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Unknown object.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Forbidden by the cluster's state.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }

    /// Not allowed for this caller.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, message)
    }

    /// Cannot reach what is needed.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// Local failure.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The exit code `meshctl` uses for this error.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Internal => 1,
            ErrorKind::InvalidArgument => 2,
            ErrorKind::NotFound => 3,
            ErrorKind::FailedPrecondition => 4,
            ErrorKind::PermissionDenied => 5,
            ErrorKind::Locked => 6,
            ErrorKind::Unavailable => 7,
        }
    }
}

/// Result of an API call.
pub type ApiResult<T> = Result<T, ApiError>;

/// Operator input that does not parse or does not pass a check: what was
/// wrong and what to do about it, as `meshctl` prints it. The parsers and
/// checks of this layer return it; the cluster API answers it as
/// [`ErrorKind::Invalid`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// An [`Invalid`] from a `format!` message.
#[macro_export]
macro_rules! invalid {
    ($($message:tt)*) => {
        $crate::api::error::Invalid(format!($($message)*))
    };
}

/// What a reason carried as text converts from and to: a message makes
/// one, it gives its message back, and it reads as one.
macro_rules! text_reason {
    ($name:ident) => {
        impl From<String> for $name {
            fn from(message: String) -> $name {
                $name(message)
            }
        }

        impl From<&str> for $name {
            fn from(message: &str) -> $name {
                $name(message.to_string())
            }
        }

        impl From<$name> for String {
            fn from(reason: $name) -> String {
                reason.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
    };
}
pub(crate) use text_reason;

text_reason!(Invalid);

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> ApiError {
        ApiError::invalid(invalid.0)
    }
}
