//! MQTT 5 conformance: server-to-client topic aliases, request/response (issue 13, item 10).
