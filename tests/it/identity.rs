//! Sessions belong to identities: takeover refused across identities, client id patterns, resumed subscriptions re-checked (issue 13, item 1).
