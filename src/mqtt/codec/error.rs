//! The codec's error types: why a packet could not be decoded ([`DecodeError`]) or encoded
//! ([`EncodeError`]), with the MQTT 5 reason code and a metric label for each.

use super::packet::ReasonCode;

/// Why the bytes at the front of the buffer are not an acceptable MQTT packet. Every variant
/// means the connection must be closed; [`DecodeError::reason_code`] says what to put in the
/// CONNACK (before the session is up) or DISCONNECT (MQTT 5) that precedes the close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not follow the packet grammar (bad flags, truncated field, trailing bytes,
    /// invalid UTF-8, ...).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Well-formed, but a value the protocol forbids (zero packet id, first packet not a
    /// CONNECT, ...).
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// The whole packet (fixed header included) would exceed the maximum packet size.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max}")]
    PacketTooLarge {
        /// Size of the whole packet as announced by its fixed header.
        size: usize,
        /// The limit it was checked against.
        max: usize,
    },
    /// A CONNECT with a protocol level other than 4 or 5 (e.g. 3 for MQTT 3.1 "MQIsdp").
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    /// A CONNECT whose protocol name is neither "MQTT" nor "MQIsdp".
    #[error("invalid protocol name")]
    InvalidProtocolName,
    /// A PUBLISH or will topic name containing a wildcard ('+' or '#'), or an empty will topic.
    #[error("invalid topic name: {0}")]
    TopicNameInvalid(&'static str),
    /// A property identifier that MQTT 5 does not define.
    #[error("unknown property identifier {0:#04x}")]
    UnknownProperty(u32),
    /// A defined property on a packet type that may not carry it.
    #[error("property {id:#04x} is not allowed on {packet}")]
    PropertyNotAllowed {
        /// The property identifier.
        id: u8,
        /// The packet type name (or "will properties").
        packet: &'static str,
    },
    /// A single-valued property given more than once.
    #[error("duplicate property {0:#04x}")]
    DuplicateProperty(u8),
    /// A property value the spec forbids (zero receive maximum, boolean greater than 1, ...).
    #[error("invalid value for property {0:#04x}")]
    InvalidPropertyValue(u8),
    /// A reason code that the spec does not list for this packet type.
    #[error("reason code {code:#04x} is not valid in {packet}")]
    InvalidReasonCode {
        /// The packet type name.
        packet: &'static str,
        /// The code received.
        code: u8,
    },
}

impl DecodeError {
    /// The MQTT 5 reason code to report in CONNACK or DISCONNECT before closing.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::Malformed(_) | DecodeError::UnknownProperty(_) => {
                ReasonCode::MALFORMED_PACKET
            }
            DecodeError::ProtocolError(_)
            | DecodeError::PropertyNotAllowed { .. }
            | DecodeError::DuplicateProperty(_)
            | DecodeError::InvalidPropertyValue(_)
            | DecodeError::InvalidReasonCode { .. } => ReasonCode::PROTOCOL_ERROR,
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion(_) | DecodeError::InvalidProtocolName => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            DecodeError::TopicNameInvalid(_) => ReasonCode::TOPIC_NAME_INVALID,
        }
    }

    /// A short, static label for metrics: "malformed", "protocol_error", "packet_too_large",
    /// "unsupported_protocol" or "topic_name_invalid".
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Malformed(_) | DecodeError::UnknownProperty(_) => "malformed",
            DecodeError::ProtocolError(_)
            | DecodeError::PropertyNotAllowed { .. }
            | DecodeError::DuplicateProperty(_)
            | DecodeError::InvalidPropertyValue(_)
            | DecodeError::InvalidReasonCode { .. } => "protocol_error",
            DecodeError::PacketTooLarge { .. } => "packet_too_large",
            DecodeError::UnsupportedProtocolVersion(_) | DecodeError::InvalidProtocolName => {
                "unsupported_protocol"
            }
            DecodeError::TopicNameInvalid(_) => "topic_name_invalid",
        }
    }
}

/// Why a packet could not be encoded. Encoding failures are bugs or limits on our side (nothing
/// is written to the buffer when one occurs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field longer than 65535 bytes.
    #[error("{field} is {len} bytes, more than 65535")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The remaining length would exceed 268_435_455 bytes.
    #[error("remaining length {0} exceeds 268435455")]
    PacketTooLarge(usize),
    /// A packet identifier of 0 where a non-zero one is required, or a non-zero one where none
    /// may be sent (QoS 0 PUBLISH).
    #[error("invalid packet identifier: {0}")]
    InvalidPacketId(&'static str),
    /// A PUBLISH or will topic name that is empty (without a topic alias) or holds a wildcard.
    #[error("invalid topic name: {0}")]
    InvalidTopicName(&'static str),
    /// A property value the spec forbids (zero where non-zero is required, boolean > 1, ...).
    #[error("invalid property: {0}")]
    InvalidProperty(&'static str),
    /// Anything else the packet model allows but the wire format (of this version) does not.
    #[error("cannot encode: {0}")]
    Invalid(&'static str),
}

impl EncodeError {
    /// The MQTT 5 reason code to report if the packet that failed was an answer we owed.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            EncodeError::PacketTooLarge(_) => ReasonCode::PACKET_TOO_LARGE,
            _ => ReasonCode::UNSPECIFIED_ERROR,
        }
    }

    /// A short, static label for metrics: "field_too_long", "packet_too_large",
    /// "invalid_packet_id", "invalid_topic_name", "invalid_property" or "invalid".
    pub fn kind(&self) -> &'static str {
        match self {
            EncodeError::FieldTooLong { .. } => "field_too_long",
            EncodeError::PacketTooLarge(_) => "packet_too_large",
            EncodeError::InvalidPacketId(_) => "invalid_packet_id",
            EncodeError::InvalidTopicName(_) => "invalid_topic_name",
            EncodeError::InvalidProperty(_) => "invalid_property",
            EncodeError::Invalid(_) => "invalid",
        }
    }
}
