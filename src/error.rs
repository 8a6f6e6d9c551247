//! Stable error codes and their mapping to every wire: HTTP status, gRPC code, MQTT reason.
//!
//! Subsystems keep their own `thiserror` enums; at the edge each error becomes an [`ErrorCode`]
//! plus a human message. The code string is part of the public contract: scripts match on it.

use std::fmt;

/// A machine-readable error category, stable across releases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is malformed or a field is out of range.
    InvalidArgument,
    /// The payload is not the JSON the contract describes.
    MalformedPayload,
    /// The payload is larger than the configured limit.
    PayloadTooLarge,
    /// No or wrong credentials.
    Unauthenticated,
    /// Credentials are fine but the action is not allowed (topic of another orb, wrong tenant).
    PermissionDenied,
    /// The named resource does not exist (or belongs to another tenant: the answer is the same).
    NotFound,
    /// The resource exists already.
    AlreadyExists,
    /// The orb is decommissioned and takes no more traffic.
    Decommissioned,
    /// The MQTT topic is not one the platform serves.
    TopicInvalid,
    /// A queue or quota is full; retry later.
    Overloaded,
    /// The server is starting or draining.
    Unavailable,
    /// The feature exists in the contract but not in this build yet.
    NotImplemented,
    /// A bug or an I/O failure on our side.
    Internal,
    /// What was asked for is no longer kept (an event id older than the retention).
    OutOfRange,
    /// The target is in a state that does not allow this (a finished export canceled).
    FailedPrecondition,
    /// Too many messages or connections per second; slow down.
    RateLimited,
}

impl ErrorCode {
    /// The stable string used in problem documents, metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::MalformedPayload => "malformed_payload",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Decommissioned => "orb_decommissioned",
            ErrorCode::TopicInvalid => "topic_invalid",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotImplemented => "not_implemented",
            ErrorCode::Internal => "internal",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::RateLimited => "rate_limited",
        }
    }

    /// HTTP status for REST answers.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument | ErrorCode::MalformedPayload => 400,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied | ErrorCode::Decommissioned => 403,
            ErrorCode::NotFound | ErrorCode::TopicInvalid => 404,
            ErrorCode::AlreadyExists => 409,
            ErrorCode::Overloaded | ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::NotImplemented => 501,
            ErrorCode::Internal => 500,
            ErrorCode::OutOfRange => 410,
            ErrorCode::FailedPrecondition => 409,
        }
    }

    /// gRPC status code number (`tonic::Code` as i32).
    pub fn grpc_code(self) -> i32 {
        match self {
            ErrorCode::InvalidArgument
            | ErrorCode::MalformedPayload
            | ErrorCode::PayloadTooLarge
            | ErrorCode::TopicInvalid => 3,
            ErrorCode::NotFound => 5,
            ErrorCode::AlreadyExists => 6,
            ErrorCode::PermissionDenied => 7,
            ErrorCode::Overloaded | ErrorCode::RateLimited => 8,
            ErrorCode::Decommissioned => 9,
            ErrorCode::NotImplemented => 12,
            ErrorCode::Internal => 13,
            ErrorCode::Unavailable => 14,
            ErrorCode::Unauthenticated => 16,
            ErrorCode::OutOfRange => 11,
            ErrorCode::FailedPrecondition => 9,
        }
    }

    /// MQTT v5 reason code for a refused PUBLISH (PUBACK reason).
    pub fn mqtt5_puback_reason(self) -> u8 {
        match self {
            ErrorCode::MalformedPayload | ErrorCode::PayloadTooLarge | ErrorCode::InvalidArgument => 0x99,
            ErrorCode::Unauthenticated | ErrorCode::PermissionDenied | ErrorCode::Decommissioned => 0x87,
            ErrorCode::TopicInvalid | ErrorCode::NotFound => 0x90,
            ErrorCode::Overloaded => 0x97,
            // PUBACK has no rate code: a publish over the rate ends the connection with
            // DISCONNECT 0x96 instead (see `net::mqtt`); this answer is for completeness.
            ErrorCode::RateLimited => 0x97,
            ErrorCode::AlreadyExists
            | ErrorCode::Unavailable
            | ErrorCode::NotImplemented
            | ErrorCode::Internal
            | ErrorCode::OutOfRange
            | ErrorCode::FailedPrecondition => 0x80,
        }
    }

    /// The label used for this code in `orbmanager_refusals_total{reason=...}`.
    pub fn metric_index(self) -> usize {
        self as usize
    }

    /// Every code, in `metric_index` order.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::InvalidArgument,
        ErrorCode::MalformedPayload,
        ErrorCode::PayloadTooLarge,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::Decommissioned,
        ErrorCode::TopicInvalid,
        ErrorCode::Overloaded,
        ErrorCode::Unavailable,
        ErrorCode::NotImplemented,
        ErrorCode::Internal,
        ErrorCode::OutOfRange,
        ErrorCode::FailedPrecondition,
        ErrorCode::RateLimited,
    ];
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as it leaves the system: a code and a message meant for the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into() }
    }

    pub fn internal(err: impl fmt::Display) -> Self {
        ApiError::new(ErrorCode::Internal, err.to_string())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_metric_index_order_and_codes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.metric_index(), i);
            assert!(seen.insert(code.as_str()), "duplicate code string {}", code.as_str());
        }
    }

    #[test]
    fn refusal_mappings_follow_the_mqtt5_spec() {
        assert_eq!(ErrorCode::MalformedPayload.mqtt5_puback_reason(), 0x99);
        assert_eq!(ErrorCode::PermissionDenied.mqtt5_puback_reason(), 0x87);
        assert_eq!(ErrorCode::TopicInvalid.mqtt5_puback_reason(), 0x90);
        assert_eq!(ErrorCode::Overloaded.mqtt5_puback_reason(), 0x97);
        assert_eq!(ErrorCode::Unauthenticated.http_status(), 401);
        assert_eq!(ErrorCode::NotFound.grpc_code(), 5);
    }
}
