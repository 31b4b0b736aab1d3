//! Pathological inputs that must not stall other clients (issue 13, item 5).
