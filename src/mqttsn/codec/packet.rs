//! The MQTT-SN 1.2 messages as Rust values (spec §5.4), one variant per message type.

use bytes::Bytes;

/// The message types (spec §5.2.2, table 3).
pub mod msg_type {
    pub const ADVERTISE: u8 = 0x00;
    pub const SEARCHGW: u8 = 0x01;
    pub const GWINFO: u8 = 0x02;
    pub const CONNECT: u8 = 0x04;
    pub const CONNACK: u8 = 0x05;
    pub const WILLTOPICREQ: u8 = 0x06;
    pub const WILLTOPIC: u8 = 0x07;
    pub const WILLMSGREQ: u8 = 0x08;
    pub const WILLMSG: u8 = 0x09;
    pub const REGISTER: u8 = 0x0A;
    pub const REGACK: u8 = 0x0B;
    pub const PUBLISH: u8 = 0x0C;
    pub const PUBACK: u8 = 0x0D;
    pub const PUBCOMP: u8 = 0x0E;
    pub const PUBREC: u8 = 0x0F;
    pub const PUBREL: u8 = 0x10;
    pub const SUBSCRIBE: u8 = 0x12;
    pub const SUBACK: u8 = 0x13;
    pub const UNSUBSCRIBE: u8 = 0x14;
    pub const UNSUBACK: u8 = 0x15;
    pub const PINGREQ: u8 = 0x16;
    pub const PINGRESP: u8 = 0x17;
    pub const DISCONNECT: u8 = 0x18;
    pub const WILLTOPICUPD: u8 = 0x1A;
    pub const WILLTOPICRESP: u8 = 0x1B;
    pub const WILLMSGUPD: u8 = 0x1C;
    pub const WILLMSGRESP: u8 = 0x1D;
    pub const ENCAPSULATED: u8 = 0xFE;
}

/// A return code (spec §5.3.10): 0x00 accepted, 0x01 rejected: congestion, 0x02 rejected:
/// invalid topic id, 0x03 rejected: not supported; other values are reserved and kept as
/// they came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReturnCode(pub u8);

impl ReturnCode {
    pub const ACCEPTED: ReturnCode = ReturnCode(0x00);
    pub const CONGESTION: ReturnCode = ReturnCode(0x01);
    pub const INVALID_TOPIC_ID: ReturnCode = ReturnCode(0x02);
    pub const NOT_SUPPORTED: ReturnCode = ReturnCode(0x03);
}

/// The QoS flag (spec §5.3.4): MQTT-SN adds -1, "publish without connection".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnQos {
    #[default]
    Zero,
    One,
    Two,
    /// QoS -1 (0b11): a PUBLISH from a client that is not connected, to a predefined topic id
    /// or a short topic name.
    MinusOne,
}

impl SnQos {
    /// The two QoS bits (6-5) of the flags byte.
    pub fn bits(self) -> u8 {
        match self {
            SnQos::Zero => 0b00,
            SnQos::One => 0b01,
            SnQos::Two => 0b10,
            SnQos::MinusOne => 0b11,
        }
    }

    pub fn from_bits(bits: u8) -> SnQos {
        match bits & 0b11 {
            0b00 => SnQos::Zero,
            0b01 => SnQos::One,
            0b10 => SnQos::Two,
            _ => SnQos::MinusOne,
        }
    }

    /// As MQTT's QoS (-1 is delivered as 0).
    pub fn mqtt(self) -> crate::mqtt::codec::QoS {
        use crate::mqtt::codec::QoS;
        match self {
            SnQos::One => QoS::AtLeastOnce,
            SnQos::Two => QoS::ExactlyOnce,
            SnQos::Zero | SnQos::MinusOne => QoS::AtMostOnce,
        }
    }

    pub fn from_mqtt(q: crate::mqtt::codec::QoS) -> SnQos {
        use crate::mqtt::codec::QoS;
        match q {
            QoS::AtMostOnce => SnQos::Zero,
            QoS::AtLeastOnce => SnQos::One,
            QoS::ExactlyOnce => SnQos::Two,
        }
    }
}

/// How a PUBLISH, SUBACK or REGACK names its topic: the 2-byte TopicId field and the topic id
/// type of the flags (spec §5.3.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicRef {
    /// A topic id registered on this connection (REGISTER/REGACK), type 0b00.
    Normal(u16),
    /// A predefined topic id (`mqttsn.predefined_topics`), type 0b01.
    Predefined(u16),
    /// A two-byte short topic name carried in place of the id, type 0b10.
    Short([u8; 2]),
}

impl TopicRef {
    /// The topic id type bits (1-0).
    pub fn type_bits(self) -> u8 {
        match self {
            TopicRef::Normal(_) => 0b00,
            TopicRef::Predefined(_) => 0b01,
            TopicRef::Short(_) => 0b10,
        }
    }

    /// The two bytes of the TopicId field.
    pub fn id_bytes(self) -> [u8; 2] {
        match self {
            TopicRef::Normal(id) | TopicRef::Predefined(id) => id.to_be_bytes(),
            TopicRef::Short(s) => s,
        }
    }
}

/// What a SUBSCRIBE or UNSUBSCRIBE names (spec §5.4.15): a topic name or filter (type 0b00),
/// a predefined topic id (0b01) or a short topic name (0b10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicSpec {
    Name(String),
    Predefined(u16),
    Short([u8; 2]),
}

impl TopicSpec {
    pub fn type_bits(&self) -> u8 {
        match self {
            TopicSpec::Name(_) => 0b00,
            TopicSpec::Predefined(_) => 0b01,
            TopicSpec::Short(_) => 0b10,
        }
    }
}

/// CONNECT (spec §5.4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The client asks for the will exchange (WILLTOPICREQ/WILLMSGREQ) before CONNACK.
    pub will: bool,
    pub clean_session: bool,
    /// The keep alive duration, seconds.
    pub duration: u16,
    /// 1-23 characters per the spec (we accept what `mqttsn.max_client_id_length` allows).
    pub client_id: String,
}

/// The will topic of WILLTOPIC / WILLTOPICUPD (spec §5.4.7): absent in an empty message,
/// which deletes the will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WillTopic {
    pub qos: SnQos,
    pub retain: bool,
    pub topic: String,
}

/// PUBLISH (spec §5.4.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: SnQos,
    pub retain: bool,
    pub topic: TopicRef,
    /// 0 for QoS 0 and -1.
    pub msg_id: u16,
    pub data: Bytes,
}

/// SUBSCRIBE (spec §5.4.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub dup: bool,
    /// The QoS asked for.
    pub qos: SnQos,
    pub msg_id: u16,
    pub topic: TopicSpec,
}

/// One MQTT-SN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Advertise {
        gw_id: u8,
        duration: u16,
    },
    SearchGw {
        radius: u8,
    },
    /// GwAdd is present only when a client answers for a gateway.
    GwInfo {
        gw_id: u8,
        gw_add: Bytes,
    },
    Connect(Connect),
    ConnAck {
        code: ReturnCode,
    },
    WillTopicReq,
    WillTopic(Option<WillTopic>),
    WillMsgReq,
    WillMsg(Bytes),
    Register {
        topic_id: u16,
        msg_id: u16,
        topic_name: String,
    },
    RegAck {
        topic_id: u16,
        msg_id: u16,
        code: ReturnCode,
    },
    Publish(Publish),
    PubAck {
        topic_id: u16,
        msg_id: u16,
        code: ReturnCode,
    },
    PubComp {
        msg_id: u16,
    },
    PubRec {
        msg_id: u16,
    },
    PubRel {
        msg_id: u16,
    },
    Subscribe(Subscribe),
    SubAck {
        qos: SnQos,
        topic_id: u16,
        msg_id: u16,
        code: ReturnCode,
    },
    Unsubscribe {
        msg_id: u16,
        topic: TopicSpec,
    },
    UnsubAck {
        msg_id: u16,
    },
    /// A sleeping client wakes with its client id (spec §6.14).
    PingReq {
        client_id: Option<String>,
    },
    PingResp,
    /// With a duration: the client goes to sleep (spec §6.14).
    Disconnect {
        duration: Option<u16>,
    },
    WillTopicUpd(Option<WillTopic>),
    WillTopicResp {
        code: ReturnCode,
    },
    WillMsgUpd(Bytes),
    WillMsgResp {
        code: ReturnCode,
    },
    /// A message relayed by a forwarder (spec §5.5): radius, the wireless node id, and the
    /// encapsulated MQTT-SN message as it came.
    Encapsulated {
        radius: u8,
        node_id: Bytes,
        inner: Bytes,
    },
}

impl Packet {
    /// The message type byte.
    pub fn msg_type(&self) -> u8 {
        use msg_type::*;
        match self {
            Packet::Advertise { .. } => ADVERTISE,
            Packet::SearchGw { .. } => SEARCHGW,
            Packet::GwInfo { .. } => GWINFO,
            Packet::Connect(_) => CONNECT,
            Packet::ConnAck { .. } => CONNACK,
            Packet::WillTopicReq => WILLTOPICREQ,
            Packet::WillTopic(_) => WILLTOPIC,
            Packet::WillMsgReq => WILLMSGREQ,
            Packet::WillMsg(_) => WILLMSG,
            Packet::Register { .. } => REGISTER,
            Packet::RegAck { .. } => REGACK,
            Packet::Publish(_) => PUBLISH,
            Packet::PubAck { .. } => PUBACK,
            Packet::PubComp { .. } => PUBCOMP,
            Packet::PubRec { .. } => PUBREC,
            Packet::PubRel { .. } => PUBREL,
            Packet::Subscribe(_) => SUBSCRIBE,
            Packet::SubAck { .. } => SUBACK,
            Packet::Unsubscribe { .. } => UNSUBSCRIBE,
            Packet::UnsubAck { .. } => UNSUBACK,
            Packet::PingReq { .. } => PINGREQ,
            Packet::PingResp => PINGRESP,
            Packet::Disconnect { .. } => DISCONNECT,
            Packet::WillTopicUpd(_) => WILLTOPICUPD,
            Packet::WillTopicResp { .. } => WILLTOPICRESP,
            Packet::WillMsgUpd(_) => WILLMSGUPD,
            Packet::WillMsgResp { .. } => WILLMSGRESP,
            Packet::Encapsulated { .. } => ENCAPSULATED,
        }
    }

    /// The message's name, for logs and metrics.
    pub fn name(&self) -> &'static str {
        type_name(self.msg_type())
    }
}

/// The name of message type `t` ("unknown" for a type not in the spec).
pub fn type_name(t: u8) -> &'static str {
    use msg_type::*;
    match t {
        ADVERTISE => "ADVERTISE",
        SEARCHGW => "SEARCHGW",
        GWINFO => "GWINFO",
        CONNECT => "CONNECT",
        CONNACK => "CONNACK",
        WILLTOPICREQ => "WILLTOPICREQ",
        WILLTOPIC => "WILLTOPIC",
        WILLMSGREQ => "WILLMSGREQ",
        WILLMSG => "WILLMSG",
        REGISTER => "REGISTER",
        REGACK => "REGACK",
        PUBLISH => "PUBLISH",
        PUBACK => "PUBACK",
        PUBCOMP => "PUBCOMP",
        PUBREC => "PUBREC",
        PUBREL => "PUBREL",
        SUBSCRIBE => "SUBSCRIBE",
        SUBACK => "SUBACK",
        UNSUBSCRIBE => "UNSUBSCRIBE",
        UNSUBACK => "UNSUBACK",
        PINGREQ => "PINGREQ",
        PINGRESP => "PINGRESP",
        DISCONNECT => "DISCONNECT",
        WILLTOPICUPD => "WILLTOPICUPD",
        WILLTOPICRESP => "WILLTOPICRESP",
        WILLMSGUPD => "WILLMSGUPD",
        WILLMSGRESP => "WILLMSGRESP",
        ENCAPSULATED => "ENCAPSULATED",
        _ => "unknown",
    }
}
