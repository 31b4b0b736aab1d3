//! The store under a full disk (issue 13, item 8).
